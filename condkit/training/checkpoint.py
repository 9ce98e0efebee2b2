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

Before a resume every file of the checkpoint is verified (`check_resumable`): state.json parses
and has its keys, trainable.safetensors opens with the fingerprint's tensors and shapes, all
finite, and the optimizer, scaler, registered-object and every process's generator files exist,
are not empty and load weights-only (accelerate itself skips unreadable generator states
silently). A checkpoint failing this is damaged (`DamagedCheckpointError`, naming the file and
why). Resuming the "latest" skips damaged checkpoints for the newest intact one, with one warning
line (`newest_resumable`); an explicit one is refused. Not damage, and refused either way: a
checkpoint of another run (fingerprint), one written by an older condkit, a file that needs
arbitrary code to unpickle.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SCALER_NAME
from safetensors.torch import load_file, save_file

from condkit.files import load_pickle_safely, read_state_dict, replace_folder, staging_folder

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = f"{OPTIMIZER_NAME}.bin"
CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")

logger = logging.getLogger(__name__)

try:  # what accelerate's own loader allows besides plain data: numpy arrays in the generator states
    from accelerate.utils.other import TORCH_SAFE_GLOBALS as _GENERATOR_GLOBALS
except ImportError:  # pragma: no cover - older accelerate
    _GENERATOR_GLOBALS = []


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


class DamagedCheckpointError(ValueError):
    """A checkpoint with a missing, empty, truncated or unreadable file, or non-finite weights (one line)."""

    def __init__(self, checkpoint: Path, file: str, reason: str, consequence: str = "") -> None:
        self.checkpoint, self.file, self.reason, self.consequence = Path(checkpoint), file, reason, consequence
        super().__init__(f"checkpoint {checkpoint} is damaged ({file}: {reason}){consequence}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, e.g. between processes
        return type(self), (self.checkpoint, self.file, self.reason, self.consequence)

    @property
    def damage(self) -> str:
        return f"{self.file}: {self.reason}"


def read_state(checkpoint: Path) -> dict[str, Any]:
    """state.json of a checkpoint, checked to be a JSON object with an integer "step" and a "fingerprint"."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (it has no {STATE_FILE})")
    raw = _read_bytes(path)
    if not raw.strip():
        raise DamagedCheckpointError(checkpoint, STATE_FILE, "empty")
    try:
        state = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedCheckpointError(checkpoint, STATE_FILE, "not UTF-8 text") from None
    except json.JSONDecodeError as error:
        reason = f"not valid JSON ({error.msg}: line {error.lineno} column {error.colno})"
        raise DamagedCheckpointError(checkpoint, STATE_FILE, reason) from None
    if not isinstance(state, dict):
        raise DamagedCheckpointError(checkpoint, STATE_FILE, f"a JSON {type(state).__name__}, not an object")
    step, fingerprint = state.get("step"), state.get("fingerprint")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DamagedCheckpointError(checkpoint, STATE_FILE, f'"step" is {step!r}, not a non-negative integer')
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("trainable", {}), dict):
        raise DamagedCheckpointError(checkpoint, STATE_FILE, '"fingerprint" is missing or not an object of settings')
    return state


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity, or None (one device sync)."""
    floating = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point()}
    if not floating or torch.stack([torch.isfinite(tensor).all() for tensor in floating.values()]).all():
        return None
    return next(name for name, tensor in floating.items() if not torch.isfinite(tensor).all())


def check_resumable(
    checkpoint: Path, fingerprint: dict[str, Any], processes: int, registered: int, scaler: bool = False
) -> int:
    """The step of a checkpoint this run can resume from, after verifying every file it will load.

    Raises, changing nothing: DamagedCheckpointError (a ValueError naming the file and why) for a
    damaged checkpoint; ValueError for another run's checkpoint, an older condkit's or a file that
    needs code to unpickle; FileNotFoundError for a folder that is not a checkpoint. `processes`:
    every process's generator file is verified, so all processes judge a checkpoint alike.
    `scaler`: the run has a GradScaler (fp16), so scaler.pt is needed too.
    """
    state = read_state(checkpoint)
    if not (checkpoint / OPTIMIZER_FILE).is_file() and (checkpoint / "optimizer.pt").is_file():
        raise ValueError(
            f"cannot resume from {checkpoint}: it was written by a condkit older than its accelerate "
            "save_state checkpoints; resume it with that version or start a fresh run"
        )
    check_same_run(checkpoint, state["fingerprint"], fingerprint)
    _verify_trainable(checkpoint, fingerprint.get("trainable", {}))
    _verify_torch_file(checkpoint, OPTIMIZER_FILE, keys=("state", "param_groups"))
    for index in range(registered):  # accelerate itself reads them with weights_only=False
        _verify_torch_file(checkpoint, custom_file(index))
    for rank in range(processes):  # accelerate carries on silently without an unreadable one
        _verify_torch_file(checkpoint, rng_file(rank), keys=("random_state", "numpy_random_seed", "torch_manual_seed"),
                           allowed=_GENERATOR_GLOBALS)  # fmt: skip
    if scaler:
        _verify_torch_file(checkpoint, SCALER_NAME)
    return int(state["step"])


def newest_resumable(
    checkpoints: Sequence[Path], fingerprint: dict[str, Any], processes: int, registered: int,
    scaler: bool = False, report: bool = True,
) -> tuple[Path, int]:  # fmt: skip
    """The newest intact checkpoint of `checkpoints` (oldest first, not empty) and its step.

    Damaged checkpoints are skipped, with one warning line naming each and its bad file (if
    `report`); if every one is damaged, a one-line ValueError names the newest and why. Any other
    refusal (another run's checkpoint, an unsafe file) is raised as by `check_resumable`.
    """
    damaged: list[DamagedCheckpointError] = []
    for checkpoint in reversed(checkpoints):
        try:
            step = check_resumable(checkpoint, fingerprint, processes, registered, scaler)
        except DamagedCheckpointError as damage:
            damaged.append(damage)
            continue
        except (ValueError, FileNotFoundError) as refusal:
            if not damaged:
                raise
            kind = FileNotFoundError if isinstance(refusal, FileNotFoundError) else ValueError
            raise kind(f"{_damage_line(damaged)}; the next older one cannot be resumed either: {refusal}") from refusal
        if damaged and report:
            logger.warning("%s; resuming from %s instead", _damage_line(damaged), checkpoint.name)
        return checkpoint, step
    newest, older = damaged[0], len(damaged) - 1
    others = {0: "and there is no older one", 1: "and so is the one older checkpoint"}.get(
        older, f"and so are all {older} older ones"
    )
    raise DamagedCheckpointError(
        newest.checkpoint, newest.file, newest.reason,
        f" {others}; cannot resume: repair or remove them, or start a fresh run in another output_dir",
    )  # fmt: skip


def check_requested(
    checkpoint: Path, fingerprint: dict[str, Any], processes: int, registered: int, scaler: bool = False
) -> int:
    """`check_resumable` for a checkpoint named by the user: a damaged one is refused, with no fallback."""
    try:
        return check_resumable(checkpoint, fingerprint, processes, registered, scaler)
    except DamagedCheckpointError as damage:
        raise DamagedCheckpointError(damage.checkpoint, damage.file, damage.reason, "; refusing to resume from it") from None


def _damage_line(damaged: Sequence[DamagedCheckpointError]) -> str:
    line = str(damaged[0])
    for damage in damaged[1:]:
        line += f"; so is {damage.checkpoint.name} ({damage.damage})"
    return line


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None


def _present(checkpoint: Path, file: str) -> Path:
    """The path of a checkpoint file that exists, is not empty and can be opened.

    A file that cannot be opened (no permission) is not damaged: a ValueError names it. Past this,
    any error reading the file is damage (torch reports some truncations as OSError).
    """
    path = checkpoint / file
    if not path.is_file():
        raise DamagedCheckpointError(checkpoint, file, "missing")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(checkpoint, file, "empty")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    return path


def _brief(error: BaseException) -> str:
    """The first sentence of an error's message on one line, short."""
    text = " ".join(str(error).split())
    text = text.split(". ")[0].rstrip(".")
    text = text.removeprefix("Error while deserializing header: ")
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _verify_trainable(checkpoint: Path, shapes: dict[str, list[int]]) -> None:
    path = _present(checkpoint, TRAINABLE_FILE)
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors' SafetensorError: truncated, garbled header, ...
        raise DamagedCheckpointError(checkpoint, TRAINABLE_FILE, f"truncated or corrupted ({_brief(error)})") from None
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise DamagedCheckpointError(checkpoint, TRAINABLE_FILE, f"tensor {missing[0]!r} is missing")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise DamagedCheckpointError(checkpoint, TRAINABLE_FILE, f"tensor {extra[0]!r} is not in state.json")
    for name, tensor in tensors.items():
        if list(tensor.shape) != list(shapes[name]):
            reason = f"tensor {name!r} has shape {list(tensor.shape)}, not {list(shapes[name])} as in state.json"
            raise DamagedCheckpointError(checkpoint, TRAINABLE_FILE, reason)
    bad = first_non_finite(tensors)
    if bad is not None:
        raise DamagedCheckpointError(checkpoint, TRAINABLE_FILE, f"tensor {bad!r} holds NaN or infinite values")


def _verify_torch_file(checkpoint: Path, file: str, keys: Sequence[str] = (), allowed: Sequence[type] = ()) -> None:
    """A torch pickle that loads weights-only into a dict with `keys`; one needing code is refused, not damaged."""
    path = _present(checkpoint, file)
    try:
        loaded = load_pickle_safely(path, allowed=allowed)
    except OSError as error:  # torch reports some truncated files so
        raise DamagedCheckpointError(checkpoint, file, f"truncated or corrupted ({_brief(error)})") from None
    except ValueError as error:
        if error.__cause__ is None:  # load_pickle_safely's refusal of a file that needs arbitrary code
            raise
        raise DamagedCheckpointError(checkpoint, file, f"truncated or corrupted ({_brief(error.__cause__)})") from None
    if not isinstance(loaded, dict):
        raise DamagedCheckpointError(checkpoint, file, f"holds a {type(loaded).__name__}, not a state dict")
    absent = [key for key in keys if key not in loaded]
    if absent:
        raise DamagedCheckpointError(checkpoint, file, f"has no {absent[0]!r}")


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
        """Load a checkpoint that `check_resumable` (or `newest_resumable`) accepted."""
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
