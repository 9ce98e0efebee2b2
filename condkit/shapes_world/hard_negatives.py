"""Hard negative captions: a caption with one fact changed, so that it no longer fits its image.

Contrastive training on (image, caption) pairs alone lets a text encoder treat a caption as a
bag of words. Adding captions that reuse the same words with the colours swapped between
objects, the shapes swapped between objects, one shape changed, or a relation flipped (NegCLIP's
swaps, done on the world's closed grammar) forces it to encode which attribute belongs to which
object. A perturbation that leaves the described scene the same ("a red circle and a blue circle"
with its colours swapped) is no negative, so every candidate is parsed back and kept only when
its meaning differs from the caption's.
"""

from __future__ import annotations

import random
import re

from .captions import Spec, parse_caption
from .vocabulary import COLOURS, SHAPES

_COLOUR_PATTERN = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE_PATTERN = re.compile(r"\b(" + "|".join(SHAPES) + r")(es|s)?\b")
_OBJECT_PATTERN = re.compile(r"\b(?:(" + "|".join(COLOURS) + r") )?(" + "|".join(SHAPES) + r")(es|s)?\b")
_OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom", "bottom": "top"}
_RELATION_PATTERN = re.compile(r"\b(" + "|".join(_OPPOSITES) + r")\b")


def swap_colours(caption: str, rng: random.Random) -> str | None:
    """Exchange two different colour words everywhere; with only one colour, replace it everywhere by another."""
    distinct = sorted({m.group(1) for m in _COLOUR_PATTERN.finditer(caption)})
    if len(distinct) >= 2:
        first, second = rng.sample(distinct, 2)
        swapped = {first: second, second: first}
    elif len(distinct) == 1:
        swapped = {distinct[0]: rng.choice([c for c in COLOURS if c != distinct[0]])}
    else:
        return None
    return _COLOUR_PATTERN.sub(lambda m: swapped.get(m.group(1), m.group(1)), caption)


def swap_shapes(caption: str, rng: random.Random) -> str | None:
    """Exchange two different shape words everywhere (keeping singular or plural); None with fewer than two shapes."""
    matches = list(_SHAPE_PATTERN.finditer(caption))
    distinct = sorted({m.group(1) for m in matches})
    if len(distinct) < 2:
        return None
    first, second = rng.sample(distinct, 2)
    swapped = {first: second, second: first}

    def replace(match: re.Match) -> str:
        shape = swapped.get(match.group(1), match.group(1))
        return shape + ("es" if shape.endswith("s") else "s") if match.group(2) else shape

    return _SHAPE_PATTERN.sub(replace, caption)


def change_shape(caption: str, rng: random.Random) -> str | None:
    """Replace one object's shape by a different shape, keeping singular or plural.

    The object is a shape word with its colour; every mention of that colour and shape changes, so
    later references ("the red circle") still name it. A shape without a colour changes alone.
    """
    matches = list(_OBJECT_PATTERN.finditer(caption))
    if not matches:
        return None
    target = rng.choice(matches)
    replacement = rng.choice([s for s in SHAPES if s != target.group(2)])

    def replace(match: re.Match) -> str:
        same_object = match.group(1, 2) == target.group(1, 2) if target.group(1) else match.start() == target.start()
        if not same_object:
            return match.group(0)
        plural = ("es" if replacement.endswith("s") else "s") if match.group(3) else ""
        return (f"{match.group(1)} " if match.group(1) else "") + replacement + plural

    return _OBJECT_PATTERN.sub(replace, caption)


def flip_relation(caption: str, rng: random.Random) -> str | None:
    """Turn one spatial word into its opposite (left/right, above/below, top/bottom)."""
    matches = list(_RELATION_PATTERN.finditer(caption))
    if not matches:
        return None
    target = rng.choice(matches)
    return caption[: target.start()] + _OPPOSITES[target.group(1)] + caption[target.end() :]


PERTURBATIONS = {"colour": swap_colours, "shape": change_shape, "relation": flip_relation}
# The perturbations training draws from; PERTURBATIONS are the ones the CLIP stage reports on.
TRAINING_PERTURBATIONS = {**PERTURBATIONS, "shape swap": swap_shapes}


def _meaning(spec: Spec) -> tuple:
    """What a spec asserts, independent of the order in which its caption introduces the objects."""
    def described(index: int) -> tuple:
        obj = spec.objects[index]
        return (obj.shape or "", obj.colour or "", obj.size or "", obj.position or "")

    objects = tuple(sorted(described(i) for i in range(len(spec.objects))))
    relations = tuple(sorted((described(i), relation, described(j)) for i, relation, j in spec.relations))
    return objects, relations, spec.background or "", spec.count or 0


def changes_meaning(caption: str, negative: str) -> bool:
    """Whether `negative` is a readable caption of a different scene than `caption`'s."""
    if negative == caption:
        return False
    try:
        return _meaning(parse_caption(negative)) != _meaning(parse_caption(caption))
    except ValueError:
        return False


def hard_negatives(caption: str, rng: random.Random, count: int = 1) -> list[str]:
    """Up to `count` perturbed captions, each from a different perturbation, each describing another scene."""
    perturbations = list(TRAINING_PERTURBATIONS.values())
    rng.shuffle(perturbations)
    negatives: list[str] = []
    for perturb in perturbations:
        negative = perturb(caption, rng)
        if negative is not None and negative not in negatives and changes_meaning(caption, negative):
            negatives.append(negative)
            if len(negatives) == count:
                break
    return negatives


def hard_negative(caption: str, rng: random.Random) -> str | None:
    """One perturbed caption that describes another scene than `caption`, or None when nothing can be changed."""
    negatives = hard_negatives(caption, rng, 1)
    return negatives[0] if negatives else None
