"""Hard negative captions: a caption with one fact changed, so that it no longer fits its image.

Contrastive training on (image, caption) pairs alone lets a text encoder treat a caption as a
bag of words. Adding captions that reuse the same words with the colours swapped between
objects, one shape changed, or a relation flipped forces it to encode which attribute belongs
to which object.
"""

from __future__ import annotations

import random
import re

from .vocabulary import COLOURS, SHAPES

_COLOUR_PATTERN = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE_PATTERN = re.compile(r"\b(" + "|".join(SHAPES) + r")(es|s)?\b")
_OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom", "bottom": "top"}
_RELATION_PATTERN = re.compile(r"\b(" + "|".join(_OPPOSITES) + r")\b")


def swap_colours(caption: str, rng: random.Random) -> str | None:
    """Exchange two different colour words; with only one colour, replace it by another."""
    matches = list(_COLOUR_PATTERN.finditer(caption))
    distinct = sorted({m.group(1) for m in matches})
    if len(distinct) >= 2:
        first, second = rng.sample(distinct, 2)
        swapped = {first: second, second: first}
        return _COLOUR_PATTERN.sub(lambda m: swapped.get(m.group(1), m.group(1)), caption)
    if len(distinct) == 1:
        replacement = rng.choice([c for c in COLOURS if c != distinct[0]])
        target = rng.choice(matches)
        return caption[: target.start()] + replacement + caption[target.end() :]
    return None


def change_shape(caption: str, rng: random.Random) -> str | None:
    """Replace one shape word by a different shape, keeping singular or plural."""
    matches = list(_SHAPE_PATTERN.finditer(caption))
    if not matches:
        return None
    target = rng.choice(matches)
    replacement = rng.choice([s for s in SHAPES if s != target.group(1)])
    if target.group(2):
        replacement += "es" if replacement.endswith("s") else "s"
    return caption[: target.start()] + replacement + caption[target.end() :]


def flip_relation(caption: str, rng: random.Random) -> str | None:
    """Turn one spatial word into its opposite (left/right, above/below, top/bottom)."""
    matches = list(_RELATION_PATTERN.finditer(caption))
    if not matches:
        return None
    target = rng.choice(matches)
    return caption[: target.start()] + _OPPOSITES[target.group(1)] + caption[target.end() :]


PERTURBATIONS = {"colour": swap_colours, "shape": change_shape, "relation": flip_relation}


def hard_negative(caption: str, rng: random.Random) -> str | None:
    """One perturbed caption that differs from `caption`, or None when nothing can be changed."""
    perturbations = list(PERTURBATIONS.values())
    rng.shuffle(perturbations)
    for perturb in perturbations:
        negative = perturb(caption, rng)
        if negative is not None and negative != caption:
            return negative
    return None
