"""Training checkpoints: written atomically, read back exactly, refused when they belong to another run.

A checkpoint is a folder `<output_dir>/checkpoints/step-000500/` holding

    trainable.safetensors     the method's trainable_state_dict()
    optimizer.pt              optimizer state (torch.save of tensors and numbers; loads with weights_only)
    lr_scheduler.pt           learning-rate scheduler state
    scaler.pt                 fp16 gradient scaler state, when there is one
    rng_state_<rank>.pt       python, numpy and torch (CPU and current CUDA device) generator states
                              of each process
    state.json                step, data order, and the run's fingerprint (method, settings,
                              trainable shapes, key configuration); written last

Everything is written into a hidden temporary folder that is moved into place with one
`os.replace`, so a run killed at any moment leaves only complete checkpoints; folders without
state.json are never treated as checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LR_SCHEDULER_FILE = "lr_scheduler.pt"
SCALER_FILE = "scaler.pt"
CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints in a folder, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        path
        for path in checkpoints_dir.iterdir()
        if CHECKPOINT_PATTERN.fullmatch(path.name) and (path / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.fullmatch(path.name).group(1)))


def read_state(checkpoint: Path) -> dict[str, Any]:
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (it has no {STATE_FILE})")
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states, as tensors and plain numbers (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_same_run(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise a one-line ValueError naming the first fingerprint entry that differs."""
    for key, now in current.items():
        then = saved.get(key)
        if key == "trainable":
            _check_same_shapes(checkpoint, then or {}, now)
        elif then != now:
            raise ValueError(f"cannot resume from {checkpoint}: {key} is {then!r} there but {now!r} in this run")


def _check_same_shapes(checkpoint: Path, then: dict[str, list[int]], now: dict[str, list[int]]) -> None:
    for name in sorted(set(then) | set(now)):
        if name not in now:
            raise ValueError(f"cannot resume from {checkpoint}: it has trainable tensor {name!r}, which this run lacks")
        if name not in then:
            raise ValueError(f"cannot resume from {checkpoint}: this run's trainable tensor {name!r} is not in it")
        if then[name] != now[name]:
            raise ValueError(
                f"cannot resume from {checkpoint}: trainable tensor {name!r} has shape {then[name]} there "
                f"but {now[name]} in this run"
            )


def write_checkpoint(
    accelerator: Any,
    checkpoints_dir: Path,
    step: int,
    state: dict[str, Any],
    trainable: dict[str, torch.Tensor],
    objects: dict[str, Any],
) -> Path:
    """Write one checkpoint from every process (collective: all processes must call it).

    `objects` maps file names to things with a state_dict(), saved by the main process.
    """
    final = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(capture_rng_state(), tmp / rng_file(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in trainable.items()}
        save_file(tensors, tmp / TRAINABLE_FILE)
        for file_name, stateful in objects.items():
            torch.save(stateful.state_dict(), tmp / file_name)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        _move_into_place(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        # Only when a run resumed from an older checkpoint overtakes a newer one of the same run.
        stale = final.with_name(f".{final.name}.stale")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)


def load_trainable(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / TRAINABLE_FILE)


def load_stateful(checkpoint: Path, file_name: str, stateful: Any) -> None:
    stateful.load_state_dict(torch.load(checkpoint / file_name, map_location="cpu", weights_only=True))


def load_rng_state(checkpoint: Path, rank: int) -> None:
    path = checkpoint / rng_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no generator state for process {rank} ({path.name})")
    restore_rng_state(torch.load(path, weights_only=True))


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints so that `keep` remain."""
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old)
