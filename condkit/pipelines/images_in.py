"""Input images for img2img, inpainting and ControlNet, read and checked before any model loads.

Each is decoded fully on reading (PIL opens lazily), so a truncated file fails here with one line
naming the flag and the file, not halfway through a generation.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


def read_image(path: str, flag: str, mode: str = "RGB") -> Image.Image:
    """The image at `path` in `mode` ("RGB"; "L" for masks); ValueError/FileNotFoundError naming `flag` and the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path!r}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{flag} {path!r} is not a readable image ({reason})") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{flag} {path!r} has more pixels than PIL's safety limit") from None
