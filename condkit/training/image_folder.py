"""Kept for compatibility: a folder of training images is now read by `condkit.training.data`.

`ImageFolder(folder)` is `folder_dataset(folder, caption_required=False)`: every image in the
folder (and its subfolders), sorted, with the captions of same-name .txt/.caption files or of a
metadata.jsonl where there are any ("" where not), all decoded once up front to fail early.
"""

from __future__ import annotations

import os

from .data import IMAGE_SUFFIXES, TrainingData, folder_dataset

__all__ = ["IMAGE_SUFFIXES", "ImageFolder"]


def ImageFolder(folder: str | os.PathLike, caption: str = "") -> TrainingData:  # noqa: N802 - the old class name
    """The folder's images; `caption` stands in for a missing caption (default "": textual inversion's templates)."""
    data = folder_dataset(folder, caption_required=False)
    if caption:
        data = TrainingData(data.source, data._entries, [text or caption for text in data.captions], data.skipped)
    return data
