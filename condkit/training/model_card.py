"""The README.md every trainer writes into its run folder: a Hugging Face model card for the result.

    write_model_card(out, RunSummary(method="projection (wiclp)", base_model="...", data="...", steps=500,
                                     settings={...}, command="condkit train adapter ...",
                                     usage="condkit generate --conditioner runs/wiclp --prompt ..."))

It says what was trained (method, base model, data, steps, the settings that made it and the exact
command line), how to use it, and shows the loss curve and the last validation grid when the run
has them. The YAML header carries the hub's metadata (library condkit, tags, base_model when the
model is a hub id).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD = "README.md"


@dataclass
class RunSummary:
    method: str
    base_model: str
    data: str
    steps: int
    settings: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    usage: str | None = None
    validation_grid: str | None = None  # relative to the run folder
    loss_curve: str | None = None  # relative to the run folder
    validation_prompts: list[str] = field(default_factory=list)


SETTINGS = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "resolution", "center_crop", "random_flip", "aspect_ratio_bucketing", "mixed_precision",
            "gradient_checkpointing", "use_8bit_adam", "seed")


def training_settings(config: Any) -> dict[str, Any]:
    """The TrainingConfig values a model card lists."""
    return {name: getattr(config, name) for name in SETTINGS}


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def model_card_text(summary: RunSummary) -> str:
    header = ["---", "library_name: condkit", "tags:", "- condkit", "- text-conditioning", "- diffusers"]
    if _is_hub_id(summary.base_model):
        header.append(f"base_model: {summary.base_model}")
    header.append("---")
    lines = [*header, "", f"# {summary.method}", "",
             f"Trained with condkit on **{summary.base_model}** for {summary.steps} steps.", "",
             "## Data", "", summary.data, ""]
    if summary.usage:
        lines += ["## Use", "", "```bash", summary.usage, "```", ""]
    if summary.command:
        lines += ["## Command", "", "```bash", summary.command, "```", ""]
    if summary.settings:
        lines += ["## Settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {name} | {json.dumps(value, default=str)} |" for name, value in summary.settings.items()]
        lines.append("")
    if summary.loss_curve:
        lines += ["## Loss", "", f"![loss curve]({summary.loss_curve})", ""]
    if summary.validation_grid:
        prompts = "; ".join(summary.validation_prompts)
        lines += ["## Last validation", "", f"Prompts: {prompts}" if prompts else "", "",
                  f"![validation grid]({summary.validation_grid})", ""]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, summary: RunSummary) -> Path:
    path = Path(folder) / CARD
    path.write_text(model_card_text(summary), encoding="utf-8")
    return path
