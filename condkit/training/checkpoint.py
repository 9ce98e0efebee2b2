"""Training checkpoints: accelerate's `save_state` / `load_state`, plus what accelerate lacks.

A checkpoint is a folder `<output_dir>/checkpoints/step-000500/`. accelerate writes optimizer.bin,
random_states_<rank>.pkl (every process's generators), scaler.pt (fp16) and custom_checkpoint_<i>.pkl
for the objects registered for checkpointing (the learning-rate schedule, then the data order). A
save_state hook writes trainable.safetensors (the method's trainable_state_dict()) in place of
accelerate's model.safetensors, which would hold frozen parts too, such as textual inversion's
base token table. state.json (step and the run's fingerprint) is written last.

Added here: the fingerprint (resuming with other settings is refused, naming the first that
differs); the atomic folder (every process calls save_state into a hidden staging folder, moved
into place with one `os.replace` once state.json is in it, so a killed run leaves only complete
checkpoints); last good = finite (nothing is written unless every trainable tensor is finite);
safe reading (accelerate unpickles registered objects with weights_only=False, so they are read
with weights_only=True first); step-NNNNNN names and pruning to a total limit (accelerate's
total_limit needs its own checkpoint_<n> names).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME
from safetensors.torch import save_file

from condkit.files import load_pickle_safely, read_state_dict, replace_folder, staging_folder

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = f"{OPTIMIZER_NAME}.bin"
CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite loss, gradient or weight; nothing after the last good checkpoint was saved."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_file(rank: int) -> str:
    return f"{RNG_STATE_NAME}_{rank}.pkl"


def custom_file(index: int) -> str:
    return f"custom_checkpoint_{index}.pkl"  # accelerate's name for the index-th registered object


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


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity, or None (one device sync)."""
    floating = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point()}
    if not floating or torch.stack([torch.isfinite(tensor).all() for tensor in floating.values()]).all():
        return None
    return next(name for name, tensor in floating.items() if not torch.isfinite(tensor).all())


def check_resumable(checkpoint: Path, fingerprint: dict[str, Any], rank: int, registered: int) -> int:
    """The step of a checkpoint this process can resume from; raises, changing nothing, for any other."""
    state = read_state(checkpoint)
    if not (checkpoint / OPTIMIZER_FILE).is_file() and (checkpoint / "optimizer.pt").is_file():
        raise ValueError(
            f"cannot resume from {checkpoint}: it was written by a condkit older than its accelerate "
            "save_state checkpoints; resume it with that version or start a fresh run"
        )
    check_same_run(checkpoint, state["fingerprint"], fingerprint)
    for name, what in ((TRAINABLE_FILE, "trainable weights"), (OPTIMIZER_FILE, "optimizer state"),
                       (rng_file(rank), f"generator state for process {rank}")):  # fmt: skip
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(f"{checkpoint} has no {what} ({name})")
    for index in range(registered):
        load_pickle_safely(checkpoint / custom_file(index))  # accelerate itself reads them with weights_only=False
    return int(state["step"])


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


class Checkpoints:
    """One run's checkpoints through `accelerator.save_state` / `load_state`; `save` and `load` are collective.

    `method` has been through accelerator.prepare; `stateful` are registered for checkpointing
    (state_dict / load_state_dict). `last` is the newest checkpoint saved or loaded. Call `close`
    when the run ends, so the accelerator can serve another.
    """

    def __init__(self, accelerator: Any, method: Any, checkpoints_dir: Path, fingerprint: dict[str, Any],
                 stateful: Sequence[Any], total_limit: int | None = None) -> None:  # fmt: skip
        self.accelerator, self.method, self.stateful = accelerator, method, stateful
        self.checkpoints_dir, self.fingerprint, self.total_limit = checkpoints_dir, fingerprint, total_limit
        self.last: Path | None = None
        accelerator.register_for_checkpointing(*stateful)
        self._hooks = [
            accelerator.register_save_state_pre_hook(self._save_trainable),
            accelerator.register_load_state_pre_hook(self._load_trainable),
        ]

    def save(self, step: int) -> Path:
        bad = first_non_finite(self.method.trainable_state_dict())
        if bad is not None:
            raise NonFiniteLossError(
                f"trainable tensor {bad!r} is not finite at step {step}; no checkpoint was written, the last good "
                f"checkpoint is {self.last_good}"
            )
        final = self.checkpoints_dir / checkpoint_name(step)
        staging = staging_folder(final)
        if self.accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)  # left by a run killed while writing
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))  # every process: each writes its own generator states
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {"step": step, "fingerprint": self.fingerprint}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            replace_folder(staging, final)
            if self.total_limit:
                for old in list_checkpoints(self.checkpoints_dir)[: -self.total_limit]:
                    (old / STATE_FILE).unlink()  # incomplete from here on, should the deletion be cut short
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        self.last = final
        return final

    @property
    def last_good(self) -> str:
        """The newest checkpoint (every one holds finite weights), for messages."""
        return str(self.last) if self.last else "none (no checkpoint was written yet)"

    def load(self, checkpoint: Path) -> None:
        """Load a checkpoint that `check_resumable` accepted."""
        self.accelerator.load_state(str(checkpoint))
        self.last = checkpoint

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.accelerator.free_memory()  # forgets the prepared model and optimizer
        for stateful in self.stateful:
            self.accelerator._custom_objects.remove(stateful)  # accelerate has no public way to unregister

    def _index_of_method(self, models: list[Any]) -> int:
        # accelerate keeps the model as given to prepare (the method), or its DDP wrapper.
        return next(index for index, model in enumerate(models) if self.accelerator.unwrap_model(model) is self.method)

    def _save_trainable(self, models: list[Any], weights: list[dict[str, Any]], folder: str) -> None:
        # accelerate would save the method's whole state_dict, frozen parts included; only the trainable part is needed.
        del weights[self._index_of_method(models)]
        if self.accelerator.is_main_process:
            trainable = self.method.trainable_state_dict()
            save_file({name: tensor.detach().cpu().contiguous() for name, tensor in trainable.items()},
                      Path(folder) / TRAINABLE_FILE)  # fmt: skip

    def _load_trainable(self, models: list[Any], folder: str) -> None:
        del models[self._index_of_method(models)]
        self.method.load_trainable_state_dict(read_state_dict(Path(folder) / TRAINABLE_FILE))
