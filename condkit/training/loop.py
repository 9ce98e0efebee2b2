"""The training loop every condkit training method runs on.

    config = TrainingConfig(output_dir="runs/ti", max_train_steps=3000, learning_rate=5e-4,
                            gradient_accumulation_steps=4, checkpointing_steps=500)
    result = train(method, pipe.unet, pipe.vae, pipe.scheduler, dataset, config, conditioner=conditioner)
    result = train_with_own_loss(long_clip_method, pairs, config)     # a LossMethod, no UNet

`train` minimises the denoising loss (condkit.training.objectives.DenoisingObjective) for a
`TrainingMethod`; `dataset` is any indexable of (image, caption) pairs or of mappings with
"image" and "caption" keys. `train_with_own_loss` runs a `LossMethod`, which computes its loss
from the dataset's items itself (Long-CLIP fine-tuning). Either way the method's trainable
parameters are optimised with AdamW under accelerate: mixed precision, gradient accumulation and
several processes (`torchrun` or `accelerate launch`; gradients are averaged across processes, so
for the denoising loss results do not depend on how a step's samples are split between processes
and micro-batches).

Watching and scaling a run: `validate` renders images every `validation_steps` (saved with a
grid.png under output_dir/validation/), `report_to` logs loss and learning rate to accelerate's
trackers (tensorboard, wandb, ... when installed), the progress bar shows the loss;
`gradient_checkpointing` recomputes the UNet's activations (and those of a text tower being
trained) in the backward pass instead of keeping them, `use_8bit_adam` keeps AdamW's state in 8
bits (bitsandbytes). A missing package is refused when the config is made, before any work.

Checkpoints (accelerate's save_state, see condkit.training.checkpoint) make runs resumable
exactly: the loss curve after a resume equals the uninterrupted one. A NaN or infinite loss,
gradient or trainable weight stops the run with `NonFiniteLossError` before anything bad is
saved, so the newest checkpoint is the last good one. The loop never changes the dtype of the
modules it is given: cast a frozen UNet to fp16/bf16 yourself to save memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from PIL import Image
from torch import nn

from condkit.processes import launched_on_cpu_processes
from condkit.verbosity import progress_bar

from . import checkpoint as ckpt
from .checkpoint import NonFiniteLossError
from .latent_cache import Dataset
from .method import LossMethod, MethodOutput, TrainingBatch, TrainingMethod
from .objectives import DenoisingObjective, OwnLossObjective
from .sampling import DataOrder

__all__ = [
    "LossMethod",
    "MethodOutput",
    "NonFiniteLossError",
    "TrainingBatch",
    "TrainingConfig",
    "TrainingMethod",
    "TrainingResult",
    "train",
    "train_with_own_loss",
]

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# Schedules whose learning rate at a step does not depend on max_train_steps; with these a run
# may be resumed with a larger max_train_steps.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")

ValidationCallback = Callable[[int, TrainingMethod], Sequence[Image.Image] | None]


@dataclass
class TrainingConfig:
    """Settings of a run; names follow the diffusers training examples.

    train_batch_size is per process. resume_from_checkpoint: None starts a fresh run (refused if
    output_dir already holds checkpoints), "latest" continues from the newest checkpoint in
    output_dir (or starts fresh if there is none), a path continues from that checkpoint.
    mixed_precision "auto" means bf16 on a GPU that supports it, else fp16 on a GPU, "no" on CPU.
    snr_gamma (denoising loss only): Min-SNR-gamma weighting of each sample's loss (Hang et al.,
    2023, as diffusers' training examples' --snr_gamma); None weights every timestep alike.
    progress_label: the progress bar's description.
    resolution, center_crop, random_flip, aspect_ratio_bucketing: how images are sized and varied
    (see condkit.training.augment and bucketing); latents are cached per image and view.
    release_vae: encode every image before the first step, then let go of the VAE, so that its memory is
    freed if the caller holds no other reference (fixed views only: no random crops, flips or buckets).
    """

    output_dir: str | Path
    max_train_steps: int
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    resolution: int | None = None
    center_crop: bool = True
    random_flip: bool = False
    aspect_ratio_bucketing: bool = False
    mixed_precision: str = "auto"
    seed: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | Path | None = None
    validation_steps: int | None = None
    report_to: str | None = None
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    show_progress: bool | None = None  # None: as condkit.verbosity says (off after quiet())
    progress_label: str = "training"
    vae_batch_size: int = 8
    release_vae: bool = False

    def __post_init__(self) -> None:
        counts = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps")
        for name in (*counts, "vae_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("checkpoints_total_limit", "validation_steps", "resolution"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be non-negative, got {self.lr_warmup_steps}")
        schedules = [schedule.value for schedule in SchedulerType]
        if self.lr_scheduler not in schedules:
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; expected one of {', '.join(schedules)}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"unknown mixed_precision {self.mixed_precision!r}; expected one of {', '.join(MIXED_PRECISIONS)}"
            )
        if self.noise_offset < 0:
            raise ValueError(f"noise_offset must be non-negative, got {self.noise_offset}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma must be positive or None, got {self.snr_gamma}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        check_optional_packages(self.report_to, self.use_8bit_adam)
        if self.aspect_ratio_bucketing and self.resolution is None:
            raise ValueError("aspect-ratio bucketing needs a resolution (the area of every bucket)")
        self.output_dir = Path(self.output_dir)

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"


@dataclass
class TrainingResult:
    """What a call to `train` did. losses[i] is the mean loss of step first_step + i + 1."""

    output_dir: Path
    first_step: int
    last_step: int
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None
    validation_dirs: list[Path] = field(default_factory=list)


def resolve_mixed_precision(requested: str) -> str:
    if requested == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision 'fp16' needs a CUDA GPU; on CPU use 'bf16' or 'no'")
    return requested


def make_accelerator(mixed_precision: str, report_to: str | None = None, project_dir: str | Path | None = None) -> Accelerator:
    """An Accelerator for `train`; report_to names accelerate trackers (their logs go under project_dir)."""
    check_optional_packages(report_to, False)
    trackers = None if report_to in (None, "none") else report_to
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=launched_on_cpu_processes(),
                       log_with=trackers, project_dir=None if project_dir is None else str(project_dir))


def check_optional_packages(report_to: str | None, use_8bit_adam: bool) -> None:
    """Refuse an unknown tracker, or a tracker or 8-bit Adam whose package is not installed (one line)."""
    if report_to not in (None, "none"):
        from accelerate.tracking import get_available_trackers
        from accelerate.utils import LoggerType

        known = [str(kind.value) for kind in LoggerType]
        if report_to not in known:
            raise ValueError(f"unknown report_to {report_to!r}; expected one of: none, {', '.join(known)}")
        available = [str(getattr(kind, "value", kind)) for kind in get_available_trackers()]
        if report_to != "all" and report_to not in available:
            raise ValueError(f"report_to {report_to!r} needs the {report_to} package, which is not installed "
                             f"(pip install {report_to})")
    if use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("use_8bit_adam needs the bitsandbytes package, which is not installed (pip install bitsandbytes)")


def enable_gradient_checkpointing(*modules: nn.Module | None) -> int:
    """Checkpoint every diffusers model and every transformers model among `modules` (and inside them).

    transformers models only checkpoint in training mode, i.e. a text tower being trained; frozen
    encoders in eval mode keep running as they are. Returns how many models were switched.
    """
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    switched = 0
    for module in modules:
        for part in module.modules() if module is not None else ():
            if isinstance(part, ModelMixin) and part._supports_gradient_checkpointing:
                part.enable_gradient_checkpointing()
                switched += 1
            elif isinstance(part, PreTrainedModel) and part.supports_gradient_checkpointing:
                if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5's name
                    part.activation_checkpointing_enable({"use_reentrant": False})
                else:
                    part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                switched += 1
    return switched


def train(
    method: TrainingMethod,
    unet: nn.Module,
    vae: nn.Module,
    noise_scheduler: Any,
    dataset: Dataset,
    config: TrainingConfig,
    *,
    conditioner: nn.Module | None = None,
    validate: ValidationCallback | None = None,
    accelerator: Accelerator | None = None,
) -> TrainingResult:
    """Train `method` on `dataset` with the denoising loss; see the module docstring.

    conditioner: the Conditioner that turns captions into the UNet's conditioning, handed to the
    method at every step with the UNet (the method's trainable part may sit inside it).

    validate(step, method) is called on the main process every config.validation_steps steps (if
    set) and at the end, without gradients and with the method in eval mode; the images it
    returns are saved as PNGs under output_dir/validation/step-NNNNNN/. It cannot change the
    training curve: the generator states are restored after it.

    accelerator: one that holds no prepared or registered objects (its save_state writes the
    checkpoints); train releases what it prepared when it returns, so the same one can serve again.
    """
    if isinstance(method, LossMethod):
        raise TypeError(f"{type(method).__name__} computes its own loss; run it with train_with_own_loss")
    if not isinstance(method, TrainingMethod):
        raise TypeError(f"method must be a condkit TrainingMethod, got {type(method).__name__}")
    accelerator = _checked_accelerator(accelerator, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(unet, conditioner, method)
    trained = {id(parameter) for parameter in method.trainable_parameters()}
    for frozen_part in (unet, conditioner):
        for parameter in frozen_part.parameters() if frozen_part is not None else ():
            if id(parameter) not in trained:
                parameter.requires_grad_(False)
    objective = DenoisingObjective(
        unet, vae, noise_scheduler, dataset, seed=config.seed, noise_offset=config.noise_offset,
        snr_gamma=config.snr_gamma, resolution=config.resolution, vae_batch_size=config.vae_batch_size,
        device=accelerator.device, conditioner=conditioner, center_crop=config.center_crop,
        random_flip=config.random_flip, aspect_ratio_bucketing=config.aspect_ratio_bucketing,
    )  # fmt: skip
    del vae  # with release_vae the cache may then hold the last reference
    if config.release_vae:
        objective.encode_all_then_release_vae()
    return _TrainingRun(method, objective, len(dataset), config, validate, accelerator).run()


def train_with_own_loss(
    method: LossMethod,
    dataset: Dataset,
    config: TrainingConfig,
    *,
    validate: ValidationCallback | None = None,
    accelerator: Accelerator | None = None,
) -> TrainingResult:
    """Train a `LossMethod` on `dataset` (any indexable; the method reads its items); see the module docstring."""
    if not isinstance(method, LossMethod):
        raise TypeError(f"method must be a condkit LossMethod, got {type(method).__name__}")
    accelerator = _checked_accelerator(accelerator, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(method)
    return _TrainingRun(method, OwnLossObjective(dataset), len(dataset), config, validate, accelerator).run()


def _checked_accelerator(accelerator: Accelerator | None, config: TrainingConfig) -> Accelerator:
    given = accelerator is not None
    accelerator = accelerator or make_accelerator(config.mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes but the accelerator sees {accelerator.num_processes}; "
            "every process would train alone on the full data"
        )
    if given and config.mixed_precision not in ("auto", accelerator.mixed_precision):
        raise ValueError(
            f"config.mixed_precision is {config.mixed_precision!r} but the accelerator given uses "
            f"{accelerator.mixed_precision!r}; set one of them to match"
        )
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            f"the accelerator given accumulates {accelerator.gradient_accumulation_steps} steps; expected 1 "
            "(set gradient_accumulation_steps in TrainingConfig instead)"
        )
    if config.report_to not in (None, "none") and not accelerator.log_with:
        raise ValueError(
            f"config.report_to is {config.report_to!r} but the accelerator given has no trackers; make it with "
            "make_accelerator(..., report_to=...) or Accelerator(log_with=...)"
        )
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "the accelerator given names checkpoints itself (automatic_checkpoint_naming); train writes "
            "output_dir/checkpoints/step-NNNNNN, so turn it off"
        )
    held = (accelerator._models, accelerator._optimizers, accelerator._schedulers, accelerator._dataloaders,
            accelerator._custom_objects)  # fmt: skip
    if any(held):
        raise ValueError(
            "the accelerator given already holds prepared or registered objects, which its save_state would write "
            "into every checkpoint; pass a fresh Accelerator"
        )
    return accelerator


class _TrainingRun:
    def __init__(
        self,
        method: TrainingMethod,
        objective: DenoisingObjective | OwnLossObjective,
        dataset_size: int,
        config: TrainingConfig,
        validate: ValidationCallback | None,
        accelerator: Accelerator,
    ) -> None:
        self.config = config
        self.validate = validate
        self.accelerator = accelerator
        self.objective = objective
        self.method = method
        self.parameters = method.trainable_parameters()
        if not self.parameters:
            raise ValueError(f"{method.method_name} has no trainable parameters (none requires grad)")
        processes = self.accelerator.num_processes
        self.order = DataOrder(
            dataset_size, config.train_batch_size * processes * config.gradient_accumulation_steps, config.seed,
            groups=getattr(objective, "groups", None),
        )
        if config.use_8bit_adam:
            import bitsandbytes

            optimizer_class = bitsandbytes.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        self.optimizer = optimizer_class(
            self.parameters,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )

        # Saved and loaded by accelerate's save_state / load_state with the optimizer and generators.
        self.stateful = (self.lr_scheduler, self.order)

        self.fingerprint = self._fingerprint(dataset_size)
        # Verified before anything changes, so a refused checkpoint leaves all as it was.
        self.resume_from, self.start_step = self._checkpoint_to_resume()

    def _fingerprint(self, dataset_size: int) -> dict[str, Any]:
        """What must be equal between a checkpoint and this run for the resume to continue the same curve."""
        config = asdict(self.config)
        key_config = {
            name: config[name]
            for name in (
                "seed", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
                "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                "max_grad_norm", "noise_offset", "snr_gamma", "resolution",
            )
        }  # fmt: skip
        if self.config.lr_scheduler not in LENGTH_FREE_SCHEDULES:
            key_config["max_train_steps"] = self.config.max_train_steps
        return {
            "method": self.method.method_name,
            "settings": _json_roundtrip(self.method.settings()),
            "trainable": {name: list(tensor.shape) for name, tensor in self.method.trainable_state_dict().items()},
            **self.objective.fingerprint(),
            "mixed_precision": self.accelerator.mixed_precision,
            "num_processes": self.accelerator.num_processes,
            "dataset_size": dataset_size,
            **key_config,
        }

    def _checkpoint_to_resume(self) -> tuple[Path | None, int]:
        """The checkpoint to resume from (None: a fresh run) and its step, every file it holds verified.

        "latest" skips damaged checkpoints for the newest intact one, saying so in one warning line;
        a checkpoint named explicitly is refused if damaged.
        """
        requested = self.config.resume_from_checkpoint
        existing = ckpt.list_checkpoints(self.config.checkpoints_dir)
        if requested is None:
            if existing:
                raise ValueError(
                    f"{self.config.output_dir} already holds checkpoints (latest {existing[-1].name}); pass "
                    "resume_from_checkpoint='latest' to continue that run or choose another output_dir"
                )
            return None, 0
        expected = dict(
            fingerprint=self.fingerprint, processes=self.accelerator.num_processes, registered=len(self.stateful),
            scaler=self.accelerator.scaler is not None,
        )  # fmt: skip
        if requested == "latest":
            if not existing:
                return None, 0
            return ckpt.newest_resumable(existing, **expected, report=self.accelerator.is_main_process)
        checkpoint = Path(requested)
        return checkpoint, ckpt.check_requested(checkpoint, **expected)

    def run(self) -> TrainingResult:
        config = self.config
        result = TrainingResult(
            Path(config.output_dir), self.start_step, self.start_step, last_checkpoint=self.resume_from
        )
        self.model, self.optimizer = self.accelerator.prepare(self.method, self.optimizer)
        self.checkpoints = ckpt.Checkpoints(
            self.accelerator, self.method, config.checkpoints_dir, self.fingerprint, self.stateful,
            total_limit=config.checkpoints_total_limit,
        )  # fmt: skip
        bar = progress_bar(
            total=config.max_train_steps,
            initial=self.start_step,
            desc=config.progress_label,
            show=config.show_progress if self.accelerator.is_main_process else False,
            dynamic_ncols=True,
        )
        tracking = bool(self.accelerator.log_with)  # report_to's trackers, or those of the accelerator given
        if tracking:
            self.accelerator.init_trackers("condkit", config=_tracker_config(config, self.method))
        try:
            if self.resume_from is not None:  # weights, optimizer, schedule, data order, every process's generators
                self.checkpoints.load(self.resume_from)
            else:
                set_seed(config.seed, device_specific=True)
            self.method.train()
            for step in range(self.start_step, config.max_train_steps):
                loss = self._optimizer_step(step)
                done = step + 1
                result.losses.append(loss)
                result.last_step = done
                bar.update(1)
                learning_rate = self.lr_scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}")
                if tracking:
                    self.accelerator.log({"loss": loss, "lr": learning_rate}, step=done)
                final = done == config.max_train_steps
                if done % config.checkpointing_steps == 0 or final:
                    result.last_checkpoint = self.checkpoints.save(done)
                validation_due = config.validation_steps is not None and done % config.validation_steps == 0
                if self.validate is not None and (validation_due or final):
                    folder = self._run_validation(done)
                    if folder is not None:
                        result.validation_dirs.append(folder)
        finally:
            bar.close()
            if tracking:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
            self.checkpoints.close()
        return result

    def _optimizer_step(self, step: int) -> float:
        config = self.config
        accumulation = config.gradient_accumulation_steps
        micro_size = config.train_batch_size * self.accelerator.num_processes
        indices, first_sample = self.order.next_step()
        step_loss = 0.0
        for micro in range(accumulation):
            start = micro * micro_size + self.accelerator.process_index * config.train_batch_size
            mine = indices[start : start + config.train_batch_size]
            numbers = range(first_sample + start, first_sample + start + len(mine))
            last_micro = micro == accumulation - 1
            sync = contextlib.nullcontext() if last_micro else self.accelerator.no_sync(self.model)
            with sync:
                loss = self.objective.loss(self.model, step, mine, numbers)
                mean_loss = self._mean_over_processes(loss)
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(
                        f"loss is {mean_loss} at step {step + 1} (images {mine.tolist()}); training stopped, "
                        f"the last good checkpoint is {self.checkpoints.last_good}"
                    )
                self.accelerator.backward(loss / accumulation)
            step_loss += mean_loss / accumulation
        grad_norm = self.accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm or math.inf)
        if grad_norm is not None and not math.isfinite(float(grad_norm)) and self.accelerator.scaler is None:
            raise NonFiniteLossError(
                f"gradient norm is {float(grad_norm)} at step {step + 1}; training stopped, the last good "
                f"checkpoint is {self.checkpoints.last_good}"
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_optimizer_step(step + 1)
        self._check_weights_finite(step + 1)
        return step_loss

    def _check_weights_finite(self, done: int) -> None:
        bad = ckpt.first_non_finite(self.method.trainable_state_dict())
        if bad is not None:
            raise NonFiniteLossError(
                f"trainable tensor {bad!r} is not finite after step {done}; training stopped, the last good "
                f"checkpoint is {self.checkpoints.last_good}"
            )

    def _mean_over_processes(self, loss: torch.Tensor) -> float:
        if self.accelerator.num_processes == 1:
            return loss.item()
        # Every process sees the same value, so a NaN on one stops all of them together.
        return self.accelerator.reduce(loss.detach().clone(), reduction="mean").item()

    def _run_validation(self, step: int) -> Path | None:
        folder = None
        if self.accelerator.is_main_process:
            self.method.eval()
            try:
                with _generators_restored(), torch.no_grad():
                    images = self.validate(step, self.method)
            finally:
                self.method.train()
            if images:
                folder = Path(self.config.output_dir) / "validation" / ckpt.checkpoint_name(step)
                folder.mkdir(parents=True, exist_ok=True)
                for number, image in enumerate(images):
                    image.save(folder / f"{number:02d}.png")
                if len(images) > 1:
                    from condkit.pipelines.generate import image_grid

                    image_grid(list(images), math.ceil(math.sqrt(len(images)))).save(folder / "grid.png")
        self.accelerator.wait_for_everyone()
        return folder


def _tracker_config(config: TrainingConfig, method: TrainingMethod) -> dict[str, Any]:
    """The run's settings as tracker hyperparameters (numbers, strings and booleans only)."""
    values = {**asdict(config), **{f"method.{k}": v for k, v in _json_roundtrip(method.settings()).items()}}
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in values.items()}


@contextlib.contextmanager
def _generators_restored():
    """Puts python's, numpy's and torch's global generators (CPU, and CUDA once used) back after the block."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def _json_roundtrip(value: Any) -> Any:
    """The value as it reads back from state.json (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(value))
