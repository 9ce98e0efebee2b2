"""The shipped pipeline's model card: README.md with the recipe that trained it and what each stage measured.

    card = model_card(asdict(recipe), reports)   # reports: {stage: the stage's done.json}

The generation scores (binding, relations, with intervals) come from `condkit eval` on the finished
pipeline and live in docs/results.md; the card holds what the recipe itself measured.
"""

from __future__ import annotations

from typing import Any

CARD_HEADER = """---
library_name: diffusers
pipeline_tag: text-to-image
tags: [condkit, shapes-world, stable-diffusion]
---

# The shapes world's pipeline

A genuine diffusers `StableDiffusionPipeline` at 64×64 px, trained from scratch on procedural scenes
(coloured shapes on flat backgrounds, described by captions) on two CPU cores; `clip/` holds the full
CLIP model the text encoder was cut from. condkit ships it as the embedded default.

```python
from diffusers import StableDiffusionPipeline
from condkit.shapes_world import MODEL_DIR

pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
image = pipe("a red circle to the left of a blue square", num_inference_steps=25, guidance_scale=5.0).images[0]
```

Trained by `condkit world train` (condkit/shapes_world/recipe.py); scores of the finished pipeline,
with 95% intervals: docs/results.md.
"""


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _flat(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        rows += _flat(value, f"{name}.") if isinstance(value, dict) else [(name, value)]
    return rows


def _table(values: dict[str, Any]) -> list[str]:
    return ["| | |", "| --- | --- |", *(f"| {name} | {_number(value)} |" for name, value in _flat(values))]


def model_card(recipe: dict[str, Any], reports: dict[str, dict[str, Any]]) -> str:
    """Markdown: how to use the pipeline, then per stage its settings and its report."""
    lines = [CARD_HEADER, "## Recipe", "", *_table({k: v for k, v in recipe.items() if not isinstance(v, dict)})]
    for stage, settings in recipe.items():
        if not isinstance(settings, dict):
            continue
        lines += ["", f"## {stage}", "", "Settings:", "", *_table(settings)]
        if reports.get(stage):
            lines += ["", "Measured when the stage finished:", "", *_table(reports[stage])]
    return "\n".join(lines) + "\n"
