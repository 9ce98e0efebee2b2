"""What every trainer leaves in its run folder besides checkpoints: the conditioner, the loss log and
curve, the model card, and (when asked) an upload to the hub.

    RUN/
      conditioner/        the trained conditioner, by its save_pretrained (`--conditioner RUN` finds it)
      checkpoints/        the loop's, for --resume
      validation/step-N/  validation images and grid.png (with --validation-prompt)
      loss_log.jsonl      one line per step; loss.png, its picture
      README.md           the model card (`model_card`)

    finish_run(out, result, summary, push_to_hub=args.push_to_hub)

Only the main process writes (several processes train one run).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from condkit.conditioning.base import RUN_CONDITIONER

from .hub import push_run_to_hub
from .loop import TrainingResult
from .loss_plot import append_loss_log, draw_loss_curve
from .model_card import RunSummary, write_model_card

LOSS_LOG = "loss_log.jsonl"
LOSS_CURVE = "loss.png"
VALIDATION = "validation"
CONDITIONER = RUN_CONDITIONER


def generate_usage(model: str | Path | None, run: str | Path) -> str:
    """The `condkit generate` command that uses a run's conditioner on the model it was trained for."""
    model_flag = "" if model is None else f" --model {shlex.quote(str(model))}"
    return f"condkit generate{model_flag} --conditioner {shlex.quote(str(run))} --prompt \"...\""


def command_line(argv: list[str] | None) -> str | None:
    """The command as a user would retype it ("condkit train ...")."""
    return None if argv is None else shlex.join(["condkit", *map(str, argv)])


def last_validation_grid(folder: Path) -> str | None:
    """The newest validation grid (or single image) of the run, relative to the run folder."""
    steps = sorted((folder / VALIDATION).glob("step-*")) if (folder / VALIDATION).is_dir() else []
    for step in reversed(steps):
        for name in ("grid.png", "00.png"):
            if (step / name).is_file():
                return (step / name).relative_to(folder).as_posix()
    return None


def finish_run(folder: str | Path, result: TrainingResult, summary: RunSummary, *, push_to_hub: str | None = None,
               is_main_process: bool = True) -> Path | None:
    """Loss log and curve, model card, optional upload; returns the card's path (None off the main process)."""
    if not is_main_process:
        return None
    folder = Path(folder)
    curve = append_loss_log(folder / LOSS_LOG, result.first_step, result.losses)
    if curve:
        draw_loss_curve(curve, folder / LOSS_CURVE)
        summary.loss_curve = LOSS_CURVE
    summary.validation_grid = last_validation_grid(folder)
    card = write_model_card(folder, summary)
    if push_to_hub:
        print(f"pushed {folder} to {push_run_to_hub(folder, push_to_hub)}")
    return card
