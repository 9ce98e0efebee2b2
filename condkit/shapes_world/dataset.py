"""The shapes world's datasets: (render, caption, spec) triples, the training sets the library's
methods are run on here, and the world's word list.

- `ShapesDataset`: a deterministic torch dataset; item i depends only on (seed, i).
- `adapter_dataset(size, seed)`: what `condkit train adapter` trains on, as a function of the
  pipeline's resolution (`run_adapter_training(..., dataset=adapter_dataset(2000))`).
- `long_caption_pairs(count, seed)`: scenes with a long and a short caption, for Long-CLIP
  fine-tuning (`train_long_clip(method, long_caption_pairs(4096), config)`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils.data

from . import captions
from .captions import STYLES, TOKEN_PATTERN, describe
from .scenes import MAX_OBJECTS, render, sample_scene
from .vocabulary import BACKGROUNDS, COLOURS, RELATIONS, SHAPES


def objects_for_style(style: str, rng: np.random.Generator) -> int:
    """How many objects a training scene for a caption style has."""
    if style == "short":
        return 1
    if style == "compositional":
        return 2
    if style == "long":
        return int(rng.integers(2, MAX_OBJECTS + 1))
    raise ValueError(f"Unknown caption style {style!r}; expected one of {list(STYLES)}.")


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural shapes-world samples; item ``i`` depends only on ``(seed, i)``.

    Each item is ``dict(image=PIL.Image, caption=str, spec=Spec, style=str)``.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        resolution: int = 64,
        styles: tuple[str, ...] = ("short", "compositional", "long"),
        style_weights: tuple[float, ...] = (0.4, 0.4, 0.2),
        allow_held_out: bool = False,
    ) -> None:
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}.")
        unknown = [style for style in styles if style not in STYLES]
        if unknown or not styles:
            raise ValueError(f"Unknown caption styles {unknown or list(styles)}; expected some of {list(STYLES)}.")
        if len(style_weights) != len(styles):
            raise ValueError(f"style_weights has {len(style_weights)} entries for {len(styles)} styles; expected one per style.")
        weights = np.asarray(style_weights, dtype=np.float64)
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"style_weights must be non-negative and not all zero, got {tuple(style_weights)}.")
        self.length = length
        self.seed = seed
        self.resolution = resolution
        self.styles = tuple(styles)
        self.style_probabilities = weights / weights.sum()
        self.allow_held_out = allow_held_out

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a ShapesDataset of length {self.length}.")
        rng = np.random.default_rng([self.seed, index])
        style = self.styles[int(rng.choice(len(self.styles), p=self.style_probabilities))]
        scene = sample_scene(rng, objects_for_style(style, rng), allow_held_out=self.allow_held_out)
        caption = describe(scene, style, rng)
        return {
            "image": render(scene, self.resolution),
            "caption": caption.text,
            "spec": caption.spec,
            "style": style,
        }


ADAPTER_STYLES: tuple[str, ...] = ("short", "compositional")
ADAPTER_STYLE_WEIGHTS: tuple[float, ...] = (0.3, 0.7)


def adapter_dataset(size: int, seed: int = 0) -> Callable[[int], ShapesDataset]:
    """The adapters' training data as a function of the training resolution in pixels.

    ShapesDataset captions without held-out combinations, weighted towards two-object
    ("compositional") captions, the category the adapters are meant to improve. Rendered at the
    pipeline's own resolution, which `run_adapter_training` knows once it has loaded the pipeline.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"dataset_size must be a positive integer, got {size!r}")
    return functools.partial(ShapesDataset, size, seed, styles=ADAPTER_STYLES, style_weights=ADAPTER_STYLE_WEIGHTS,
                             allow_held_out=False)


def long_caption_pairs(count: int, seed: int = 0, resolution: int = 64) -> list[dict[str, Any]]:
    """Shapes-world scenes, each with a long caption and a short compositional one, images in [-1, 1]."""
    pairs = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng, objects_for_style("long", rng))
        pixels = np.asarray(render(scene, resolution).convert("RGB"), dtype=np.float32)
        pairs.append(
            {
                "image": torch.from_numpy(pixels).permute(2, 0, 1).div(127.5).sub(1.0),
                "long_caption": describe(scene, "long", rng).text,
                "short_caption": describe(scene, "compositional", rng).text,
            }
        )
    return pairs

def world_words() -> list[str]:
    """Every word and punctuation token any caption can contain, sorted, lowercase."""
    texts: list[str] = [*COLOURS, *SHAPES, *BACKGROUNDS, *RELATIONS, "a", "an", "the", "background"]
    texts += [word for words in captions.SIZE_WORDS.values() for word in words]
    texts += [phrase for phrases in captions.POSITION_PHRASES.values() for phrase in phrases]
    texts += list(captions.NUMBER_WORDS.values())
    texts += list(captions.FILLER_SENTENCES)
    templates = [
        *captions.SHORT_TEMPLATES,
        *captions.COMPOSITIONAL_RELATION_TEMPLATES,
        captions.COMPOSITIONAL_PAIR_TEMPLATE,
        captions.BACKGROUND_SUFFIX,
        *captions.COUNT_TEMPLATES,
        *captions.SINGLE_COUNT_TEMPLATES,
        *captions.BACKGROUND_TEMPLATES,
        *captions.PLACED_TEMPLATES,
        *captions.UNPLACED_TEMPLATES,
        *captions.RELATIVE_TEMPLATES,
        *captions.RELATION_TEMPLATES,
    ]
    texts += [re.sub(r"\{\w+\}", " ", template) for template in templates]
    return sorted({token for text in texts for token in TOKEN_PATTERN.findall(text)})
