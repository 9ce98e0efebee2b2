"""The shapes world's adapter training data written as a folder dataset anyone can train on.

    export_dataset("shapes_data/", count=2000, seed=0, resolution=64)
    data = folder_dataset("shapes_data/")            # condkit.training.data; or --data shapes_data/

The folder holds item i of `adapter_dataset(count, seed)(resolution)` — what `condkit train
adapter` trains on by default — as `NNNNNN.png` (lossless, so pixels come back exactly: the world
renders uint8 RGB) plus one `metadata.jsonl` line {"file_name", "text" (the caption), "style"}, the
Hugging Face imagefolder layout (`datasets.load_dataset(folder)` reads it too). File names sort in
item order, so training from the folder sees the same items in the same order as training from
the built-in source, and gives bit-identical weights with the same seed and resolution.

The folder is written completely or not at all (a staging folder moved into place); an existing
non-empty folder is refused unless overwrite=True.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from condkit.files import write_folder_atomically
from condkit.training.data import METADATA_FILE

from .dataset import adapter_dataset

__all__ = ["export_dataset"]


def export_dataset(
    folder: str | os.PathLike,
    count: int,
    seed: int = 0,
    resolution: int = 64,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `count` adapter training items (seed `seed`, `resolution` pixels square) to `folder`; returns it."""
    for name, value, least in (("count", count, 1), ("seed", seed, 0), ("resolution", resolution, 8)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"{str(folder)!r} exists and is not a folder; choose a new one")
        if any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{str(folder)!r} is not empty; choose a new folder or pass overwrite=True")
    items = adapter_dataset(count, seed)(resolution)
    digits = max(6, len(str(count - 1)))

    def write(staging: Path) -> None:
        lines = []
        for index in range(count):
            item = items[index]
            name = f"{index:0{digits}d}.png"
            item["image"].save(staging / name, format="PNG")
            lines.append(json.dumps({"file_name": name, "text": item["caption"], "style": item["style"]}))
        (staging / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")

    return write_folder_atomically(folder, write)
