"""Evaluation prompt sets of the shapes world, generated once by ``build_prompt_set`` and shipped as JSONL.

- ``short``: one prompt per colour-shape pair (all 40, held-out pairs included).
- ``compositional``: two objects and a relation, at least one object a ``HELD_OUT`` pair, so the
  pipeline must bind colours to shapes it never saw together.
- ``long``: long descriptions; at least half describe some object for the first time past CLIP's
  77-token window, where a truncating text encoder cannot see it.

Regenerate the shipped files with ``python -m condkit.shapes_world.prompt_sets``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from condkit.conditioning import CLIP_POSITIONS

from .captions import Caption, ObjectRequirement, Spec, approx_token_index, describe, scene_for_spec
from .scenes import HELD_OUT, sample_scene
from .vocabulary import COLOURS, SHAPES

PROMPT_SETS: tuple[str, ...] = ("short", "compositional", "long")
PROMPT_SET_DIR = Path(__file__).parent / "prompt_sets"
SHIPPED_SIZE = 40
SHIPPED_SEED = 0


def _check_name(name: str) -> None:
    if name not in PROMPT_SETS:
        raise ValueError(f"Unknown prompt set {name!r}; expected one of {list(PROMPT_SETS)}.")


def first_token_of_last_object(caption: Caption) -> int:
    """Approximate token index at which the caption first describes its last-introduced object."""
    return max(approx_token_index(caption.text, obj.first_char) for obj in caption.spec.objects)


def describes_object_past_window(caption: Caption, window: int = CLIP_POSITIONS) -> bool:
    """Whether some object is first described at or after token ``window`` (approximate count)."""
    return first_token_of_last_object(caption) >= window


def _single_object_spec(colour: str, shape: str) -> Spec:
    return Spec(objects=[ObjectRequirement(shape=shape, colour=colour, size=None, position=None, first_char=0)])


def _build_short(n: int, rng: np.random.Generator) -> list[Caption]:
    # 8 colours and 5 shapes are coprime, so cycling both visits every pair once per 40 prompts.
    colours = list(COLOURS)
    prompts = []
    for index in range(n):
        colour, shape = colours[index % len(colours)], SHAPES[index % len(SHAPES)]
        scene = scene_for_spec(_single_object_spec(colour, shape), rng)
        prompts.append(describe(scene, "short", rng))
    return prompts


def _build_compositional(n: int, rng: np.random.Generator) -> list[Caption]:
    held_out = sorted(HELD_OUT)
    colours = list(COLOURS)
    prompts = []
    for index in range(n):
        colour, shape = held_out[index % len(held_out)]
        while True:
            partner = (colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))])
            if partner == (colour, shape):
                continue
            pair = [(colour, shape), partner]
            if rng.random() < 0.5:
                pair.reverse()
            spec = Spec(objects=[_single_object_spec(c, s).objects[0] for c, s in pair], count=2)
            caption = describe(scene_for_spec(spec, rng), "compositional", rng)
            if caption.spec.relations and len(caption.spec.objects) == 2:
                prompts.append(caption)
                break
    return prompts


def _build_long(n: int, rng: np.random.Generator) -> list[Caption]:
    prompts = []
    for index in range(n):
        needs_late_object = index % 2 == 0
        while True:
            scene = sample_scene(rng, int(rng.integers(2, 5)), allow_held_out=True)
            caption = describe(scene, "long", rng)
            if not needs_late_object or describes_object_past_window(caption):
                prompts.append(caption)
                break
    return prompts


def build_prompt_set(name: str, n: int = SHIPPED_SIZE, seed: int = SHIPPED_SEED) -> list[Caption]:
    """Generate ``n`` prompts of a prompt set, deterministically from ``seed``."""
    _check_name(name)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    rng = np.random.default_rng([seed, PROMPT_SETS.index(name)])
    builders = {"short": _build_short, "compositional": _build_compositional, "long": _build_long}
    return builders[name](n, rng)


def write_prompt_set(name: str, captions: list[Caption], directory: str | Path = PROMPT_SET_DIR) -> Path:
    """Write prompts as JSONL, one ``{"prompt": text, "spec": spec}`` object per line."""
    _check_name(name)
    path = Path(directory) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": caption.text, "spec": caption.spec.to_json()}) for caption in captions]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_prompt_file(path: str | Path) -> list[Caption]:
    """Read a JSONL prompt file written by ``write_prompt_set``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {str(path)!r} does not exist.")
    captions = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or "spec" not in record:
            raise ValueError(f'{where}: expected an object with a string "prompt" and its "spec", got {line.strip()[:60]!r}')
        try:
            spec = Spec.from_json(record["spec"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: the spec is not a shapes-world scene ({type(error).__name__}: {error})") from None
        captions.append(Caption(text=record["prompt"], spec=spec))
    if not captions:
        raise ValueError(f"prompt set {str(path)!r} holds no prompts")
    return captions


def load_prompt_set(name: str) -> list[Caption]:
    """The shipped prompt set ``name`` (one of ``PROMPT_SETS``)."""
    _check_name(name)
    return read_prompt_file(PROMPT_SET_DIR / f"{name}.jsonl")


def write_shipped_prompt_sets(directory: str | Path = PROMPT_SET_DIR) -> list[Path]:
    """Regenerate every shipped prompt set file."""
    return [write_prompt_set(name, build_prompt_set(name), directory) for name in PROMPT_SETS]


if __name__ == "__main__":
    for written in write_shipped_prompt_sets():
        print(written)
