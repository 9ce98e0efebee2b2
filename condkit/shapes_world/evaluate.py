"""Score a conditioner on shapes-world prompt sets with the exact pixel scorer.

Each prompt is generated N times at seeds seed … seed+N−1: the same seeds for every prompt and for
every conditioner, so two runs compare image for image (`condkit eval --compare`). Categories reported:
- the prompt set's own name (all objects of every prompt);
- "trained pairs" / "held-out pairs": only the objects whose colour–shape pair the training scenes
  show / never show (`scenes.HELD_OUT`), so generalisation to unseen pairs is read apart;
- "late objects": only the objects first described at or after the encoder window (token
  CLIP_POSITIONS = 77), where a truncating encoder cannot see them — present when the set has such prompts.
Every metric comes with its 95% bootstrap interval over prompts and seeds (see bootstrap.py).

    report = evaluate_prompt_set(pipe, conditioner, "compositional", images_per_prompt=8)
    print(table_text(report))

`condkit eval` is this module on the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from condkit.conditioning import CLIP_POSITIONS
from condkit.conditioning.base import Conditioner
from condkit.pipelines.generate import GenerationSettings, PromptRequest, generate, image_grid
from condkit.shapes_world.bootstrap import BOOTSTRAP_SEED, LEVEL, METHOD, RESAMPLES, interval
from condkit.shapes_world.captions import Caption, Spec
from condkit.shapes_world.prompt_sets import PROMPT_SETS, load_prompt_set, read_prompt_file
from condkit.shapes_world.scenes import HELD_OUT
from condkit.shapes_world.scorer import METRICS, aggregate, score

# Chosen so a paired comparison of two conditioners resolves a 5-point difference in short-set
# binding (docs/results.md, "How many images per prompt").
DEFAULT_IMAGES_PER_PROMPT = 8
TRAINED, HELD = "trained pairs", "held-out pairs"
LATE = "late objects"


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


def pair_spec(spec: Spec, held_out: bool) -> Spec | None:
    """Only the objects whose colour-shape pair is (held_out=True) or is not in HELD_OUT; None if there are none."""
    chosen = [
        obj for obj in spec.objects
        if obj.colour is not None and obj.shape is not None and ((obj.colour, obj.shape) in HELD_OUT) == held_out
    ]  # fmt: skip
    return Spec(objects=chosen, relations=[], background=None, count=None) if chosen else None


def category_specs(caption: Caption, tokenizer: Any, set_name: str) -> dict[str, Spec]:
    """The spec each category scores a caption's images against (a category is left out where it has no objects)."""
    specs = {set_name: caption.spec, TRAINED: pair_spec(caption.spec, False), HELD: pair_spec(caption.spec, True),
             LATE: late_objects_spec(caption.spec, tokenizer, caption.text)}  # fmt: skip
    return {category: spec for category, spec in specs.items() if spec is not None}


def score_matrix(records: list[dict[str, Any]], category: str, metric: str) -> np.ndarray:
    """(prompts, seeds) scores of one metric in one category; NaN where it does not apply or the category lacks the prompt."""
    rows = []
    for record in records:
        scores = record["scores_by_category"].get(category)
        seeds = len(record["seeds"])
        rows.append([np.nan if s.get(metric) is None else float(s[metric]) for s in scores] if scores else [np.nan] * seeds)
    return np.asarray(rows, dtype=float)


def summarise(records: list[dict[str, Any]], categories: list[str]) -> tuple[dict, dict]:
    """({category: {metric: mean}}, {category: {metric: [low, high]}}) over the records' images."""
    table: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    for category in categories:
        scores = [s for record in records for s in record["scores_by_category"].get(category, [])]
        if not scores:
            continue
        table[category] = aggregate(scores)
        intervals[category] = {}
        for metric in table[category]:
            _, low, high = interval(score_matrix(records, category, metric))
            intervals[category][metric] = [low, high]
    return table, intervals


def evaluate_prompt_set(
    pipe: Any,
    conditioner: Conditioner,
    prompt_set: str,
    images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
    settings: GenerationSettings | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Generate and score; returns {"table": {category: metrics}, "intervals": {category: {metric: [low, high]}},
    "prompts": [per-prompt records with per-image scores by category], "settings": ..., "images": [...]}."""
    if images_per_prompt <= 0:
        raise ValueError(f"images per prompt must be a positive integer, got {images_per_prompt}")
    captions = load_captions(prompt_set)[:limit]
    settings = replace(settings or GenerationSettings(), num_images_per_prompt=images_per_prompt)
    requests = [PromptRequest(caption.text, seed=settings.seed) for caption in captions]
    results = generate(pipe, conditioner, requests, settings)

    table, intervals, records = score_prompt_images(captions, results, images_per_prompt, pipe.tokenizer, Path(prompt_set).stem)
    return {"table": table, "intervals": intervals, "prompts": records, "settings": asdict(settings),
            "images": [r.image for r in results]}  # fmt: skip


def score_prompt_images(
    captions: list[Caption], results: list[Any], images_per_prompt: int, tokenizer: Any, name: str
) -> tuple[dict, dict, list[dict[str, Any]]]:
    """Score generated images (each with .image and .seed, prompt by prompt) in every category: (table, intervals, records)."""
    records = []
    for index, caption in enumerate(captions):
        images = results[index * images_per_prompt : (index + 1) * images_per_prompt]
        specs = category_specs(caption, tokenizer, name)
        by_category = {category: [score(result.image, spec) for result in images] for category, spec in specs.items()}
        records.append({"prompt": caption.text, "spec": caption.spec.to_json(), "scores": by_category[name],
                        "scores_by_category": by_category, "seeds": [result.seed for result in images],
                        "has_late_objects": LATE in specs})  # fmt: skip
    table, intervals = summarise(records, [name, TRAINED, HELD, LATE])
    return table, intervals, records


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, run: dict[str, Any]) -> Path:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    columns = report["settings"]["num_images_per_prompt"]
    image_grid(report["images"], columns).save(folder / "grid.png")
    bootstrap = {"method": METHOD, "level": LEVEL, "resamples": RESAMPLES, "seed": BOOTSTRAP_SEED}
    summary = {**run, "table": report["table"], "intervals": report["intervals"], "bootstrap": bootstrap,
               "prompts": report["prompts"]}  # fmt: skip
    (folder / "eval.json").write_text(json.dumps(summary, indent=2))
    return folder / "eval.json"


def interval_table(table: dict[str, dict[str, float]], intervals: dict[str, dict[str, list[float]]]) -> str:
    """Plain text, one row per metric and one column per category: `mean [low, high]` (`-` where it does not apply)."""
    categories = list(table)
    metrics = [name for name in METRICS if any(name in row for row in table.values())]

    def cell(category: str, metric: str) -> str:
        if metric not in table[category]:
            return "-"
        low, high = intervals.get(category, {}).get(metric, (float("nan"), float("nan")))
        return f"{table[category][metric]:.3f} [{low:.3f}, {high:.3f}]"

    first = max(len("metric"), *(len(metric) for metric in metrics))
    widths = [max(len(category), 21) for category in categories]
    header = "  ".join(["metric".ljust(first), *(c.rjust(w) for c, w in zip(categories, widths))])
    lines = [header, "-" * len(header)]
    for metric in metrics:
        cells = [cell(category, metric).rjust(w) for category, w in zip(categories, widths)]
        lines.append("  ".join([metric.ljust(first), *cells]))
    lines.append(f"[low, high]: {LEVEL:.0%} bootstrap interval over prompts and seeds")
    return "\n".join(lines)


def table_text(report: dict[str, Any]) -> str:
    return interval_table(report["table"], report["intervals"])
