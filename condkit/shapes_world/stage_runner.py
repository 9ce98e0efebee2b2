"""What the recipe's trained stages share: their run on condkit's training loop, and their outputs.

Every stage trains through `condkit.training.loop` (a `LossMethod`, or the denoising loss for the
UNet), so it has the loop's data order over the pool, seeds, checkpoints and exact resume, NaN
guard and progress bar. A stage owns a folder: the loop's checkpoints in checkpoints/step-NNNNNN
(the newest is kept), the trained model in final/ (written in one rename) and the stage's report
in done.json, written last; the recipe skips a stage that has one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from condkit.files import write_atomically, write_folder_atomically
from condkit.training.loop import TrainingConfig, TrainingResult

DONE_NAME = "done.json"
FINAL_NAME = "final"
RECENT_LOSSES = 50

logger = logging.getLogger(__name__)


def stage_config(
    stage_dir: Path, *, steps: int, batch_size: int, learning_rate: float, checkpoint_every: int,
    warmup_steps: int, weight_decay: float, seed: int, **settings: Any,
) -> TrainingConfig:  # fmt: skip
    """The loop's settings for a stage: AdamW, linear warmup and decay, fp32, resume from the latest checkpoint."""
    if (stage_dir / "checkpoint.pt").is_file():
        logger.warning("%s holds a checkpoint of an older condkit; it is ignored and the stage starts over", stage_dir)
    return TrainingConfig(
        output_dir=stage_dir, max_train_steps=steps, train_batch_size=batch_size, learning_rate=learning_rate,
        lr_scheduler="linear", lr_warmup_steps=warmup_steps, adam_weight_decay=weight_decay, max_grad_norm=1.0,
        mixed_precision="no", seed=seed, checkpointing_steps=checkpoint_every, checkpoints_total_limit=1,
        resume_from_checkpoint="latest", progress_label=stage_dir.name, **settings,
    )  # fmt: skip


def final_loss(result: TrainingResult) -> float | None:
    """The mean loss of the last steps this call ran (None if it ran none: the stage was resumed at its end)."""
    recent = result.losses[-RECENT_LOSSES:]
    return sum(recent) / len(recent) if recent else None


def save_final(stage_dir: Path, model: torch.nn.Module) -> Path:
    """model.save_pretrained into stage_dir/final, replacing it in one rename."""
    return write_folder_atomically(stage_dir / FINAL_NAME, model.save_pretrained)


def start_over(stage_dir: Path) -> None:
    """Forget a stage's checkpoints and report, so that it trains from its first step."""
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    (stage_dir / DONE_NAME).unlink(missing_ok=True)


def read_report(stage_dir: Path) -> dict | None:
    """The report of a finished stage, None if it has not finished."""
    done = stage_dir / DONE_NAME
    return json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None


def write_json(path: Path, value: Any) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2), encoding="utf-8"))


def mark_done(stage_dir: Path, report: dict) -> None:
    write_json(stage_dir / DONE_NAME, report)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
