"""Resumable training loop shared by the recipe's stages.

A stage owns a folder. Every `checkpoint_every` steps the runner writes the modules' weights,
the optimizer state and the step count to one file, first under a temporary name and then with
`os.replace`, so a kill at any moment leaves the last complete checkpoint readable. Each step's
randomness comes from a generator seeded by (seed, step), so a resumed run sees exactly the
batches and noise an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

CHECKPOINT_NAME = "checkpoint.pt"
DONE_NAME = "done.json"


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on the run seed and the step index."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def atomic_save_folder(write: Callable[[Path], None], folder: Path) -> None:
    """Write a folder through `write(tmp_folder)` and move it into place in one rename."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def is_done(stage_dir: Path) -> bool:
    return (stage_dir / DONE_NAME).is_file()


def mark_done(stage_dir: Path, report: dict) -> None:
    atomic_write_json(report, stage_dir / DONE_NAME)


def read_report(stage_dir: Path) -> dict:
    return json.loads((stage_dir / DONE_NAME).read_text(encoding="utf-8"))


class StageRunner:
    """Runs `total_steps` optimisation steps with periodic atomic checkpoints and resume.

    The learning rate follows `lr_factor(step)` times the optimizer's own; a resumed run picks the
    schedule up where the checkpoint left it.
    """

    def __init__(
        self,
        stage_dir: Path,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        checkpoint_every: int,
        lr_factor: Callable[[int], float],
        *,
        resume: bool = True,
        progress: bool = True,
        description: str = "",
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}.")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}.")
        self.stage_dir = Path(stage_dir)
        self.modules = modules
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.description = description
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.start_step = self._load() if resume else 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # a checkpoint's optimizer state already holds it
        self.schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor, last_epoch=self.start_step - 1)

    @property
    def checkpoint_path(self) -> Path:
        return self.stage_dir / CHECKPOINT_NAME

    def _load(self) -> int:
        if not self.checkpoint_path.is_file():
            return 0
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def save_checkpoint(self, step: int) -> None:
        state = {
            "step": step,
            "modules": {name: module.state_dict() for name, module in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
        }
        atomic_torch_save(state, self.checkpoint_path)

    def optimise(self, loss: torch.Tensor, max_grad_norm: float = 1.0) -> None:
        """One optimizer step on `loss`, gradients clipped to `max_grad_norm`, then the schedule's step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        self.optimizer.step()
        self.schedule.step()

    def run(self, train_step: Callable[[int], float]) -> float | None:
        """Call `train_step(step)` for the remaining steps; return the mean loss of the last 50 (None if none ran)."""
        recent: list[float] = []
        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc=self.description,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for step in range(self.start_step, self.total_steps):
            loss = train_step(step)
            recent = (recent + [loss])[-50:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            done = step + 1
            if done % self.checkpoint_every == 0 or done == self.total_steps:
                self.save_checkpoint(done)
        bar.close()
        return sum(recent) / len(recent) if recent else None
