"""Score a conditioner on shapes-world prompt sets with the exact pixel scorer.

Each prompt is generated N times (seeds seed … seed+N−1, the same for every conditioner, so runs
compare image for image). Categories reported:
- the prompt set's own name (all objects of every prompt);
- "late objects": only the objects first described at or after the encoder window (token
  CLIP_POSITIONS = 77), where a truncating encoder cannot see them — present when the set has such prompts.

    report = evaluate_prompt_set(pipe, conditioner, "compositional", images_per_prompt=4)
    print(table_text(report))

`condkit eval` is this module on the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from condkit.conditioning import CLIP_POSITIONS
from condkit.conditioning.base import Conditioner
from condkit.pipelines.generate import GenerationSettings, PromptRequest, generate, image_grid
from condkit.shapes_world.captions import Caption, Spec
from condkit.shapes_world.prompt_sets import PROMPT_SETS, load_prompt_set, read_prompt_file
from condkit.shapes_world.scorer import aggregate, format_table, score


def load_captions(prompt_set: str) -> list[Caption]:
    """A shipped set by name, or a .jsonl file of {"prompt", "spec"} lines."""
    if prompt_set in PROMPT_SETS:
        return load_prompt_set(prompt_set)
    if prompt_set.endswith(".jsonl"):
        if not Path(prompt_set).is_file():
            raise FileNotFoundError(f"prompt set file {prompt_set!r} does not exist")
        return read_prompt_file(prompt_set)
    raise ValueError(f"unknown prompt set {prompt_set!r}; expected one of {', '.join(PROMPT_SETS)} or a .jsonl file")


def first_token_index(tokenizer: Any, text: str, char_offset: int) -> int:
    """Position (BOS = 0) of the first token of text[char_offset:] in the tokenized prompt."""
    return 1 + len(tokenizer(text[:char_offset], add_special_tokens=False, verbose=False).input_ids)


def late_objects_spec(spec: Spec, tokenizer: Any, text: str, window: int = CLIP_POSITIONS) -> Spec | None:
    late = [obj for obj in spec.objects if first_token_index(tokenizer, text, obj.first_char) >= window - 1]
    return Spec(objects=late, relations=[], background=None, count=None) if late else None


def evaluate_prompt_set(
    pipe: Any,
    conditioner: Conditioner,
    prompt_set: str,
    images_per_prompt: int = 4,
    settings: GenerationSettings | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Generate and score; returns {"table": {category: metrics}, "prompts": [...], "images": [...]}."""
    if images_per_prompt <= 0:
        raise ValueError(f"images per prompt must be a positive integer, got {images_per_prompt}")
    captions = load_captions(prompt_set)[:limit]
    settings = replace(settings or GenerationSettings(), num_images_per_prompt=images_per_prompt)
    requests = [PromptRequest(caption.text, seed=settings.seed) for caption in captions]
    results = generate(pipe, conditioner, requests, settings)

    name = Path(prompt_set).stem
    by_category: dict[str, list[dict]] = {name: [], "late objects": []}
    records = []
    for index, caption in enumerate(captions):
        images = results[index * images_per_prompt : (index + 1) * images_per_prompt]
        late_spec = late_objects_spec(caption.spec, pipe.tokenizer, caption.text)
        scores = [score(result.image, caption.spec) for result in images]
        by_category[name] += scores
        if late_spec is not None:
            by_category["late objects"] += [score(result.image, late_spec) for result in images]
        records.append({"prompt": caption.text, "spec": caption.spec.to_json(), "scores": scores,
                        "seeds": [result.seed for result in images], "has_late_objects": late_spec is not None})
    table = {category: aggregate(scores) for category, scores in by_category.items() if scores}
    return {"table": table, "prompts": records, "settings": asdict(settings), "images": [r.image for r in results]}


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, run: dict[str, Any]) -> Path:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    columns = report["settings"]["num_images_per_prompt"]
    image_grid(report["images"], columns).save(folder / "grid.png")
    summary = {**run, "table": report["table"], "prompts": report["prompts"]}
    (folder / "eval.json").write_text(json.dumps(summary, indent=2))
    return folder / "eval.json"


def table_text(report: dict[str, Any]) -> str:
    return format_table(report["table"])
