"""Long-CLIP's (image, long caption, short caption) triples from your own images and captions.

    data = load_training_data(data="photos/", caption_column="text", text_columns=["short"])
    pairs = LongCaptionPairs(data, short_caption_column="short", image_size=224, mean=..., std=...)
    train_long_clip(method, pairs, config)

The long caption is the data's caption. The short one comes from `short_caption_column` (a second
key of metadata.jsonl or column of a dataset); where there is none — no such column, or an empty
value in a row — it is the long caption's first sentence, as Long-CLIP builds its short captions
(the text up to the first ". "). An image whose long caption is a single sentence thus trains both
branches on the same text.

Images are resized so the shorter side is `image_size`, centre-cropped square and normalised with
the vision tower's `mean` and `std`: the CLIP folder's preprocessor_config.json values where it has
one (`clip_normalization`), else 0.5/0.5, i.e. pixels in [-1, 1], the shapes world's convention.
Items are built when the loop asks for them, so images are not all held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .augment import Augmentation
from .data import TrainingData

SHAPES_WORLD_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def first_sentence(caption: str) -> str:
    """The text up to the first ". " (the whole caption when there is none), Long-CLIP's short caption."""
    head, separator, _ = caption.partition(". ")
    return head + "." if separator else caption


def clip_normalization(clip_dir: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the CLIP folder's preprocessor_config.json, else the shapes world's 0.5/0.5."""
    path = Path(clip_dir) / "preprocessor_config.json"
    if not path.is_file():
        return SHAPES_WORLD_NORMALIZATION
    try:
        config = json.loads(path.read_text())
        return tuple(map(float, config["image_mean"])), tuple(map(float, config["image_std"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{str(path)!r} has no usable image_mean/image_std ({type(error).__name__}: {error})") from None


class LongCaptionPairs(Sequence):
    """{"image": (3, S, S) normalised tensor, "long_caption", "short_caption"} items of a TrainingData."""

    def __init__(
        self,
        data: TrainingData,
        *,
        image_size: int,
        short_caption_column: str | None = None,
        mean: Sequence[float] = SHAPES_WORLD_NORMALIZATION[0],
        std: Sequence[float] = SHAPES_WORLD_NORMALIZATION[1],
    ) -> None:
        if short_caption_column is not None and short_caption_column not in data.texts:
            raise ValueError(f"column {short_caption_column!r} was not loaded with the data; pass it in text_columns")
        self.data = data
        self.augmentation = Augmentation(image_size)
        self.image_size = image_size
        shorts = data.texts.get(short_caption_column, [""] * len(data)) if short_caption_column else [""] * len(data)
        self.long_captions = list(data.captions)
        self.short_captions = [short or first_sentence(long) for short, long in zip(shorts, self.long_captions)]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        image = self.data[index]["image"]
        view = self.augmentation.view(image.size, (self.image_size, self.image_size))
        unit = (self.augmentation.pixels(image, view) + 1.0) / 2.0
        return {"image": (unit - self.mean) / self.std, "long_caption": self.long_captions[index],
                "short_caption": self.short_captions[index]}
