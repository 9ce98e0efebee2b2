"""Captions of shapes-world scenes, each paired with a structured spec of exactly what the text asserts.

Three styles:

- ``short``: one object, colour and shape, sometimes its size ("a small red circle").
- ``compositional``: two objects joined by a spatial relation ("a red circle to the left of a blue
  square"), sometimes with the background ("... on a gray background").
- ``long``: neutral filler sentences first, then the object count, the background, every object with
  sizes and positions, and relations between objects, so informative details often come after the
  77th CLIP token.

The grammar is regular enough that ``parse_caption`` recovers the spec of any generated caption
exactly; ``scene_for_spec`` goes the other way and samples a scene that satisfies a spec.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .scenes import (
    EDGE_MARGIN,
    HELD_OUT,
    Scene,
    SceneObject,
    boxes_are_apart,
    radius_fraction,
)
from .vocabulary import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES

STYLES: tuple[str, ...] = ("short", "compositional", "long")

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium",),
    "large": ("large", "big"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

# A caption names an object's position only when its centre is this close to the region centre,
# and a relation only when the centres differ by this much along the relation's axis; both are
# well clear of the scorer's tolerances, so every assertion survives blur and detection jitter.
POSITION_ASSERT_RADIUS = 0.08
RELATION_ASSERT_MARGIN = 0.15

FILLER_SENTENCES: tuple[str, ...] = (
    "this is a simple digital drawing made of flat shapes.",
    "the picture is clean and sharp, with no texture or shading.",
    "it was made for a short study of how models read long descriptions.",
    "every shape is drawn with a single flat colour and crisp edges.",
    "nothing in the picture casts a shadow, and there is no text.",
    "the drawing has no frame, no border and no noise.",
    "the shapes do not touch or overlap each other.",
    "it is a plain flat illustration, drawn by a computer program.",
    "read the whole description, because the important details come later.",
    "there is no person, animal or plant in this image.",
    "all of the shapes keep their usual proportions and are not rotated.",
    "the lighting is even, and the colours are bright and saturated.",
    "this description is long on purpose and gives each detail in turn.",
    "the image is tiny and drawn in a calm, tidy way.",
)

SHORT_TEMPLATES: tuple[str, ...] = ("{np}", "{np}", "a picture of {np}", "an image of {np}")
COMPOSITIONAL_RELATION_TEMPLATES: tuple[str, ...] = ("{a} {rel} {b}", "{a} is {rel} {b}")
COMPOSITIONAL_PAIR_TEMPLATE = "{a} and {b}"
BACKGROUND_SUFFIX = " on a {bg} background"
COUNT_TEMPLATES: tuple[str, ...] = (
    "there are {n} shapes in total.",
    "the image contains {n} objects.",
    "in all, {n} shapes are drawn.",
)
SINGLE_COUNT_TEMPLATES: tuple[str, ...] = ("there is only one shape.", "the image contains one object.")
BACKGROUND_TEMPLATES: tuple[str, ...] = (
    "the background is {bg}.",
    "everything sits on a plain {bg} background.",
    "the scene has a {bg} background.",
)
PLACED_TEMPLATES: tuple[str, ...] = (
    "{np} is {pos}.",
    "{pos}, there is {np}.",
    "{np} can be seen {pos}.",
    "there is {np} {pos}.",
)
UNPLACED_TEMPLATES: tuple[str, ...] = ("there is {np}.", "we can see {np}.", "the image shows {np}.")
RELATIVE_TEMPLATES: tuple[str, ...] = ("{np} is {rel} {ref}.", "{rel} {ref}, there is {np}.")
RELATION_TEMPLATES: tuple[str, ...] = ("{a} is {rel} {b}.", "seen from here, {a} is {rel} {b}.")


@dataclass
class ObjectRequirement:
    shape: str | None
    colour: str | None
    size: str | None
    position: str | None
    first_char: int


@dataclass
class Spec:
    objects: list[ObjectRequirement] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    background: str | None = None
    count: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "objects": [asdict(obj) for obj in self.objects],
            "relations": [list(relation) for relation in self.relations],
            "background": self.background,
            "count": self.count,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Spec":
        return cls(
            objects=[ObjectRequirement(**obj) for obj in data["objects"]],
            relations=[(int(i), str(relation), int(j)) for i, relation, j in data["relations"]],
            background=data.get("background"),
            count=data.get("count"),
        )


@dataclass
class Caption:
    text: str
    spec: Spec


# One CLIP-like token per word or punctuation mark.
TOKEN_PATTERN = re.compile(r"[a-z]+|[^\sa-z]")


def approx_clip_token_count(text: str) -> int:
    """Approximate CLIP token count: words plus punctuation marks plus the start and end tokens."""
    return len(TOKEN_PATTERN.findall(text.lower())) + 2


def approx_token_index(text: str, char_offset: int) -> int:
    """Approximate index, counting the start token as 0, of the token that begins at ``char_offset``."""
    return len(TOKEN_PATTERN.findall(text[:char_offset].lower())) + 1


# ---------------------------------------------------------------------------------------------
# Facts about a scene that a caption may assert.


def position_of(x: float, y: float, radius: float = POSITION_ASSERT_RADIUS) -> str | None:
    """The named region whose centre lies within ``radius`` of (x, y), if any."""
    for name, (centre_x, centre_y) in POSITIONS.items():
        if np.hypot(x - centre_x, y - centre_y) <= radius:
            return name
    return None


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Whether centre ``a`` is ``relation`` centre ``b``, with at least ``margin`` to spare."""
    if relation == "to the left of":
        return b[0] - a[0] >= margin
    if relation == "to the right of":
        return a[0] - b[0] >= margin
    if relation == "above":
        return b[1] - a[1] >= margin
    if relation == "below":
        return a[1] - b[1] >= margin
    raise ValueError(f"Unknown relation {relation!r}; expected one of {list(RELATIONS)}.")


def _clear_relations(a: SceneObject, b: SceneObject) -> list[str]:
    return [rel for rel in RELATIONS if relation_holds(rel, (a.x, a.y), (b.x, b.y), RELATION_ASSERT_MARGIN)]


# ---------------------------------------------------------------------------------------------
# Writing captions.


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


@dataclass
class _Phrase:
    text: str
    obj: SceneObject
    size: str | None


class _Writer:
    """Accumulates caption text and the matching spec, recording where each object is introduced."""

    def __init__(self) -> None:
        self.text = ""
        self.spec = Spec()

    def noun_phrase(self, obj: SceneObject, rng: np.random.Generator, size_probability: float) -> _Phrase:
        words = []
        size = None
        if rng.random() < size_probability:
            size = obj.size
            words.append(_pick(rng, SIZE_WORDS[obj.size]))
        words += [obj.colour, obj.shape]
        article = "an" if words[0][0] in "aeiou" else "a"
        return _Phrase(f"{article} {' '.join(words)}", obj, size)

    def write(self, template: str, position: str | None = None, **parts: str | _Phrase) -> dict[str, int]:
        """Append a filled template; returns the spec index of every object phrase, by part name."""
        pieces = re.split(r"(\{\w+\})", template)
        indices: dict[str, int] = {}
        for piece in pieces:
            match = re.fullmatch(r"\{(\w+)\}", piece)
            if match is None:
                self.text += piece
                continue
            name = match.group(1)
            part = parts[name]
            if isinstance(part, _Phrase):
                indices[name] = len(self.spec.objects)
                self.spec.objects.append(
                    ObjectRequirement(
                        shape=part.obj.shape,
                        colour=part.obj.colour,
                        size=part.size,
                        position=position,
                        first_char=len(self.text),
                    )
                )
                self.text += part.text
            else:
                self.text += part
        return indices

    def sentence(self, template: str, position: str | None = None, **parts: str | _Phrase) -> dict[str, int]:
        if self.text:
            self.text += " "
        return self.write(template, position, **parts)


def describe(scene: Scene, style: str, rng: np.random.Generator) -> Caption:
    """Caption a scene in one of ``STYLES``; the spec lists exactly what the text asserts."""
    if style not in STYLES:
        raise ValueError(f"Unknown caption style {style!r}; expected one of {list(STYLES)}.")
    if not scene.objects:
        raise ValueError("Cannot caption a scene without objects.")
    writer = _Writer()
    if style == "short":
        _write_short(scene, rng, writer)
    elif style == "compositional":
        _write_compositional(scene, rng, writer)
    else:
        _write_long(scene, rng, writer)
    return Caption(text=writer.text, spec=writer.spec)


def _write_short(scene: Scene, rng: np.random.Generator, writer: _Writer) -> None:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    writer.write(_pick(rng, SHORT_TEMPLATES), np=writer.noun_phrase(obj, rng, size_probability=0.3))


def _write_compositional(scene: Scene, rng: np.random.Generator, writer: _Writer) -> None:
    objects = scene.objects
    order = [int(i) for i in rng.permutation(len(objects))]
    pairs = [(i, j) for i in order for j in order if i != j and _clear_relations(objects[i], objects[j])]
    if pairs:
        i, j = pairs[int(rng.integers(len(pairs)))]
        relation = _pick(rng, _clear_relations(objects[i], objects[j]))
        a = writer.noun_phrase(objects[i], rng, size_probability=0.25)
        b = writer.noun_phrase(objects[j], rng, size_probability=0.25)
        indices = writer.write(_pick(rng, COMPOSITIONAL_RELATION_TEMPLATES), a=a, rel=relation, b=b)
        writer.spec.relations.append((indices["a"], relation, indices["b"]))
    elif len(objects) >= 2:
        a = writer.noun_phrase(objects[order[0]], rng, size_probability=0.25)
        b = writer.noun_phrase(objects[order[1]], rng, size_probability=0.25)
        writer.write(COMPOSITIONAL_PAIR_TEMPLATE, a=a, b=b)
    else:
        writer.write("{a}", a=writer.noun_phrase(objects[0], rng, size_probability=0.25))
    if rng.random() < 0.4 or len(objects) == 1:
        writer.write(BACKGROUND_SUFFIX.format(bg=scene.background))
        writer.spec.background = scene.background


def _write_long(scene: Scene, rng: np.random.Generator, writer: _Writer) -> None:
    n_fillers = int(rng.integers(1, 5))
    for index in rng.choice(len(FILLER_SENTENCES), size=n_fillers, replace=False):
        writer.sentence(FILLER_SENTENCES[int(index)])
    if rng.random() < 0.5:
        count = len(scene.objects)
        if count == 1:
            writer.sentence(_pick(rng, SINGLE_COUNT_TEMPLATES))
        else:
            writer.sentence(_pick(rng, COUNT_TEMPLATES).format(n=NUMBER_WORDS[count]))
        writer.spec.count = count
    background_first = rng.random() < 0.5
    mention_background = rng.random() < 0.7
    if mention_background and background_first:
        _write_background_sentence(scene, rng, writer)

    pair_counts: dict[tuple[str, str], int] = {}
    for obj in scene.objects:
        pair_counts[(obj.colour, obj.shape)] = pair_counts.get((obj.colour, obj.shape), 0) + 1

    def referable(obj: SceneObject) -> bool:
        return pair_counts[(obj.colour, obj.shape)] == 1

    introduced: list[tuple[SceneObject, int]] = []
    for scene_index in rng.permutation(len(scene.objects)):
        obj = scene.objects[int(scene_index)]
        phrase = writer.noun_phrase(obj, rng, size_probability=0.4)
        anchors = [(other, idx) for other, idx in introduced if referable(other) and _clear_relations(obj, other)]
        if anchors and rng.random() < 0.5:
            anchor, anchor_index = anchors[int(rng.integers(len(anchors)))]
            relation = _pick(rng, _clear_relations(obj, anchor))
            reference = f"the {anchor.colour} {anchor.shape}"
            indices = writer.sentence(_pick(rng, RELATIVE_TEMPLATES), np=phrase, rel=relation, ref=reference)
            writer.spec.relations.append((indices["np"], relation, anchor_index))
        else:
            position = position_of(obj.x, obj.y) if rng.random() < 0.7 else None
            if position is None:
                indices = writer.sentence(_pick(rng, UNPLACED_TEMPLATES), np=phrase)
            else:
                template = _pick(rng, PLACED_TEMPLATES)
                indices = writer.sentence(template, position, np=phrase, pos=_pick(rng, POSITION_PHRASES[position]))
        introduced.append((obj, indices["np"]))

    related = [
        (a, ia, b, ib)
        for a, ia in introduced
        for b, ib in introduced
        if ia != ib and referable(a) and referable(b) and _clear_relations(a, b)
    ]
    if related and rng.random() < 0.5:
        a, ia, b, ib = related[int(rng.integers(len(related)))]
        relation = _pick(rng, _clear_relations(a, b))
        writer.sentence(
            _pick(rng, RELATION_TEMPLATES),
            a=f"the {a.colour} {a.shape}",
            rel=relation,
            b=f"the {b.colour} {b.shape}",
        )
        writer.spec.relations.append((ia, relation, ib))
    if mention_background and not background_first:
        _write_background_sentence(scene, rng, writer)


def _write_background_sentence(scene: Scene, rng: np.random.Generator, writer: _Writer) -> None:
    writer.sentence(_pick(rng, BACKGROUND_TEMPLATES).format(bg=scene.background))
    writer.spec.background = scene.background


# ---------------------------------------------------------------------------------------------
# Reading captions back.


def _alternation(words: list[str] | tuple[str, ...]) -> str:
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


_SIZE_BY_WORD = {word: size for size, words in SIZE_WORDS.items() for word in words}
_POSITION_BY_PHRASE = {phrase: name for name, phrases in POSITION_PHRASES.items() for phrase in phrases}
_NUMBER_BY_WORD = {word: number for number, word in NUMBER_WORDS.items()}
_COLOUR = _alternation(list(COLOURS))
_SHAPE = _alternation(SHAPES)
_NEW_OBJECT = re.compile(rf"\b(?:a|an) (?:({_alternation(list(_SIZE_BY_WORD))}) )?({_COLOUR}) ({_SHAPE})\b")
_REFERENCE = re.compile(rf"\bthe ({_COLOUR}) ({_SHAPE})\b")
_POSITION = re.compile(rf"\b(?:{_alternation(list(_POSITION_BY_PHRASE))})\b")
_RELATION = re.compile(rf"\b(?:{_alternation(RELATIONS)})\b")
_BACKGROUND = re.compile(rf"\b(?:({_alternation(list(BACKGROUNDS))}) background|background is ({_alternation(list(BACKGROUNDS))}))\b")
_COUNT = re.compile(rf"\b({_alternation(list(_NUMBER_BY_WORD))}) (?:shapes?|objects?)\b")
_SENTENCE = re.compile(r"[^.]+\.?")


def parse_caption(text: str) -> Spec:
    """Recover the spec of a caption written by ``describe`` (any style)."""
    spec = Spec()
    for sentence in _SENTENCE.finditer(text):
        _parse_sentence(sentence.group(0), sentence.start(), spec)
    return spec


def _parse_sentence(sentence: str, offset: int, spec: Spec) -> None:
    mentions: list[tuple[int, int, bool]] = []  # (start in sentence, object index, newly introduced)
    for match in _NEW_OBJECT.finditer(sentence):
        size_word, colour, shape = match.groups()
        spec.objects.append(
            ObjectRequirement(
                shape=shape,
                colour=colour,
                size=_SIZE_BY_WORD[size_word] if size_word else None,
                position=None,
                first_char=offset + match.start(),
            )
        )
        mentions.append((match.start(), len(spec.objects) - 1, True))
    for match in _REFERENCE.finditer(sentence):
        mentions.append((match.start(), _resolve(spec, match.group(1), match.group(2)), False))
    mentions.sort()

    position = _POSITION.search(sentence)
    if position is not None:
        new_objects = [index for _, index, is_new in mentions if is_new]
        if len(new_objects) != 1:
            raise ValueError(f"Cannot tell which object {position.group(0)!r} places in {sentence!r}.")
        spec.objects[new_objects[0]].position = _POSITION_BY_PHRASE[position.group(0)]

    relation = _RELATION.search(sentence)
    if relation is not None:
        if len(mentions) != 2:
            raise ValueError(f"A relation needs exactly two objects, found {len(mentions)} in {sentence!r}.")
        (first_start, first, _), (_, second, _) = mentions
        if relation.start() < first_start:
            spec.relations.append((second, relation.group(0), first))
        else:
            spec.relations.append((first, relation.group(0), second))

    background = _BACKGROUND.search(sentence)
    if background is not None:
        spec.background = background.group(1) or background.group(2)

    count = _COUNT.search(sentence)
    if count is not None:
        spec.count = _NUMBER_BY_WORD[count.group(1)]


def _resolve(spec: Spec, colour: str, shape: str) -> int:
    candidates = [i for i, obj in enumerate(spec.objects) if obj.colour == colour and obj.shape == shape]
    if len(candidates) != 1:
        raise ValueError(f"'the {colour} {shape}' refers to {len(candidates)} earlier objects; expected exactly one.")
    return candidates[0]


# ---------------------------------------------------------------------------------------------
# Scenes that satisfy a spec.


def scene_for_spec(spec: Spec, rng: np.random.Generator, attempts: int = 200) -> Scene:
    """Sample a scene in which everything the spec asserts is true (unspecified attributes are random).

    Extra objects are added when ``spec.count`` asks for more than the spec describes. Held-out
    colour-shape pairs are allowed where the spec names them (that is what evaluation prompts are
    for); the extra objects avoid them.
    """
    count = spec.count if spec.count is not None else len(spec.objects)
    if count < len(spec.objects):
        raise ValueError(f"spec.count={count} is smaller than the {len(spec.objects)} objects it describes.")
    background = spec.background or _random_background(rng, spec)
    for _ in range(attempts):
        objects = _objects_for_spec(spec, count, background, rng)
        if objects is not None:
            return Scene(objects=tuple(objects), background=background)
    raise ValueError(f"Could not find a scene satisfying the spec after {attempts} attempts: {spec.to_json()}")


def _random_background(rng: np.random.Generator, spec: Spec) -> str:
    used = {obj.colour for obj in spec.objects}
    options = [name for name in BACKGROUNDS if name not in used]
    return _pick(rng, options)


def _objects_for_spec(
    spec: Spec, count: int, background: str, rng: np.random.Generator, placements: int = 100
) -> list[SceneObject] | None:
    """Place objects one by one, each checked against the objects and relations placed before it."""
    objects: list[SceneObject] = []
    colour_options = [c for c in COLOURS if c != background]
    for index in range(count):
        requirement = spec.objects[index] if index < len(spec.objects) else None
        colour = requirement.colour if requirement and requirement.colour else _pick(rng, colour_options)
        shape = requirement.shape if requirement and requirement.shape else _pick(rng, SHAPES)
        if requirement is None:
            while (colour, shape) in HELD_OUT:
                colour, shape = _pick(rng, colour_options), _pick(rng, SHAPES)
        size = requirement.size if requirement and requirement.size else _pick(rng, list(SIZES))
        position = requirement.position if requirement else None
        relations = [(i, rel, j) for i, rel, j in spec.relations if max(i, j) == index]
        placed = None
        for _ in range(placements):
            x, y = _random_centre(rng, size, position)
            candidate = SceneObject(shape=shape, colour=colour, size=size, x=x, y=y)
            if not all(boxes_are_apart(candidate, other) for other in objects):
                continue
            located = objects + [candidate]
            if all(
                relation_holds(rel, (located[i].x, located[i].y), (located[j].x, located[j].y), RELATION_ASSERT_MARGIN)
                for i, rel, j in relations
            ):
                placed = candidate
                break
        if placed is None:
            return None
        objects.append(placed)
    return objects


def _random_centre(rng: np.random.Generator, size: str, position: str | None) -> tuple[float, float]:
    radius = radius_fraction(size)
    low, high = radius + EDGE_MARGIN, 1.0 - radius - EDGE_MARGIN
    if position is None:
        return float(rng.uniform(low, high)), float(rng.uniform(low, high))
    centre_x, centre_y = POSITIONS[position]
    jitter = POSITION_ASSERT_RADIUS / 2
    x = float(np.clip(centre_x + rng.uniform(-jitter, jitter), low, high))
    y = float(np.clip(centre_y + rng.uniform(-jitter, jitter), low, high))
    return x, y
