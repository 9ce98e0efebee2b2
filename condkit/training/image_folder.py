"""A folder of training images as a dataset of (image, caption) pairs, validated up front."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFolder:
    """Every image directly inside `folder`, sorted by name; all are opened once to fail early."""

    def __init__(self, folder: str | Path, caption: str = "") -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {str(self.folder)!r} does not exist")
        self.paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"no images found in {str(self.folder)!r}; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
        self.caption = caption
        self.images = [self._open(path) for path in self.paths]

    @staticmethod
    def _open(path: Path) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {str(path)!r}: {error}") from None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return self.images[index], self.caption
