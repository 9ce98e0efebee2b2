"""Prompts + pipeline + conditioner → images, each with the metadata that reproduces it.

Every image has its own seed (the request's, or `settings.seed + image index`) and its own
torch.Generator, so an image does not depend on which batch it was generated in.

A request may give the further text encoders their own text, under diffusers' argument names:
`prompt_2` / `negative_prompt_2` (SDXL's and SD3's CLIP-G, Flux's T5) and `prompt_3` /
`negative_prompt_3` (SD3's T5). Unset, an encoder reads the prompt (or negative), as in diffusers.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from condkit.conditioning.base import PER_ENCODER_PROMPTS, Conditioner, Conditioning
from condkit.conditioning.scheduled_prompts import batch_key
from condkit.files import write_atomically
from condkit.pipelines.attach import attach
from condkit.pipelines.composable import check_prompts_for_run
from condkit.pipelines.output_folder import check_writable
from condkit.verbosity import progress_bar


@dataclass(kw_only=True)
class PerEncoderPrompts:
    """Text for the further encoders, by diffusers' argument names; None: the encoder reads the prompt (or negative)."""

    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    prompt_3: str | None = None
    negative_prompt_3: str | None = None

    def per_encoder_prompts(self) -> dict[str, str]:
        """The per-encoder prompts that are set."""
        return {name: getattr(self, name) for name in PER_ENCODER_PROMPTS if getattr(self, name) is not None}


@dataclass
class PromptRequest(PerEncoderPrompts):
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None

    def texts(self) -> tuple[str | None, ...]:
        """Everything the conditioner reads: the encoding of two requests with equal texts is the same."""
        return (self.prompt, self.negative_prompt, *(getattr(self, name) for name in PER_ENCODER_PROMPTS))


@dataclass
class GenerationSettings:
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    num_images_per_prompt: int = 1
    batch_size: int = 4
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "num_images_per_prompt", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {getattr(self, name)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be a finite number, got {self.guidance}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


@dataclass
class GeneratedImage(PerEncoderPrompts):
    image: Image.Image
    prompt: str
    negative_prompt: str | None
    seed: int


def expand_requests(requests: Iterable[PromptRequest], settings: GenerationSettings) -> list[PromptRequest]:
    """One request per image, each with its final seed."""
    jobs = []
    for request in requests:
        for copy in range(settings.num_images_per_prompt):
            seed = request.seed + copy if request.seed is not None else settings.seed + len(jobs)
            jobs.append(replace(request, seed=seed))
    return jobs


def generate(
    pipe: Any,
    conditioner: Conditioner,
    requests: Iterable[PromptRequest],
    settings: GenerationSettings | None = None,
    **pipeline_kwargs: Any,
) -> list[GeneratedImage]:
    """Generate one image per request and copy; extra keyword arguments go to the pipeline call.

    An image depends only on its own prompt, negative, seed and settings: each prompt is encoded on
    its own, and a pipeline call only batches images whose conditioning has the same shape, so no
    prompt is padded to a batch-mate's length (the UNet attends to padding).
    """
    settings = settings or GenerationSettings()
    jobs = expand_requests(requests, settings)
    if not jobs:
        raise ValueError("no prompts to generate")
    check_per_encoder_prompts(pipe, conditioner, jobs)
    check_prompts_for_run(pipe, conditioner, [job.texts() for job in jobs], settings.steps)
    device = pipe._execution_device
    encoded: dict[tuple[str | None, ...], Conditioning] = {}
    for job in jobs:
        if job.texts() not in encoded:
            encoded[job.texts()] = conditioner.encode(job.prompt, job.negative_prompt, **job.per_encoder_prompts())
    batches = batches_of_equal_shape([encoded[job.texts()] for job in jobs], settings.batch_size)
    images: dict[int, Image.Image] = {}
    bar = progress_bar(total=len(batches) * settings.steps, desc="generating", unit="step")  # a step denoises a batch

    def advance(_pipe, step, timestep, callback_kwargs):
        latents = callback_kwargs.get("latents")
        if latents is not None and not torch.isfinite(latents).all():
            raise FloatingPointError(
                f"the latents became non-finite at denoising step {step + 1} (timestep {int(timestep)}) of the batch starting "
                f"with {jobs[batch[0]].prompt[:60]!r}; nothing was written (lower --guidance or a prompt weight, or use float32)"
            )
        bar.update(1)
        return callback_kwargs

    with attach(pipe, conditioner), bar:
        for batch in batches:
            conditioning = concatenate([encoded[jobs[i].texts()] for i in batch])
            output = pipe(
                **conditioning.to(device).kwargs(),
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                **size_arguments(pipe, settings),
                generator=[torch.Generator(device="cpu").manual_seed(jobs[i].seed) for i in batch],
                callback_on_step_end=advance,
                **one_image_per_row(pipeline_kwargs, len(batch)),
            )
            images.update(zip(batch, output.images))
    return [GeneratedImage(images[i], job.prompt, job.negative_prompt, job.seed, **job.per_encoder_prompts())
            for i, job in enumerate(jobs)]


def check_per_encoder_prompts(pipe: Any, conditioner: Conditioner, requests: list[PromptRequest]) -> None:
    """Refuse (ValueError, one line) a per-encoder prompt the conditioner has no encoder for, before anything is encoded."""
    accepted = conditioner.per_encoder_prompt_names
    for request in requests:
        for name, text in request.per_encoder_prompts().items():
            if name not in accepted:
                expected = f"only {', '.join(accepted)}" if accepted else "none (it reads prompt and negative_prompt only)"
                raise ValueError(
                    f"{name}={text[:60]!r} does not apply to {type(conditioner).__name__} on {type(pipe).__name__}; "
                    f"per-encoder prompts expected: {expected}"
                )


def size_arguments(pipe: Any, settings: GenerationSettings) -> dict[str, int]:
    """height/width for the call: those set, and only for pipelines that take them (img2img takes its input's size)."""
    parameters = inspect.signature(pipe.__call__).parameters
    return {name: value for name, value in (("height", settings.height), ("width", settings.width))
            if value is not None and name in parameters}


def one_image_per_row(pipeline_kwargs: dict[str, Any], rows: int) -> dict[str, Any]:
    """A single input image (init image, mask, control image) repeated for every row of the batch, as diffusers
    expects one per prompt; lists (one image per ControlNet) are left as they are."""
    return {name: [value] * rows if isinstance(value, Image.Image) else value for name, value in pipeline_kwargs.items()}


def batches_of_equal_shape(conditionings: list[Conditioning], batch_size: int) -> list[list[int]]:
    """Indices of `conditionings` in batches of at most `batch_size` whose tensors have equal shapes,
    each batch in order, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for index, conditioning in enumerate(conditionings):
        key = tuple((name, tuple(tensor.shape)) for name, tensor in conditioning.tensors().items())
        key += (batch_key(conditioning),)  # prompts that change per step batch only with equal ones
        groups.setdefault(key, []).append(index)
    return [group[start : start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)]


def concatenate(conditionings: list[Conditioning]) -> Conditioning:
    """One Conditioning holding the rows of several of equal shapes, in order."""
    first = conditionings[0]
    tensors = {name: torch.cat([c.tensors()[name] for c in conditionings]) for name in first.tensors()}
    return Conditioning(**tensors, needs_attach=first.needs_attach)


def describe_run(pipe: Any, conditioner_name: str, model_name: str, settings: GenerationSettings) -> dict[str, Any]:
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    # SD3 and Flux pipelines name their default latent size default_sample_size (Flux's is not in its transformer's config)
    sample_size = getattr(pipe, "default_sample_size", None) or denoiser.config.sample_size
    default_size = sample_size * pipe.vae_scale_factor
    return {
        "conditioner": conditioner_name,
        "model": model_name,
        "scheduler": type(pipe.scheduler).__name__,
        "dtype": str(denoiser.dtype).removeprefix("torch."),
        "device": pipe._execution_device.type,  # not the GPU's index: a run across GPUs records one device
        **asdict(settings),
        "height": settings.height or default_size,
        "width": settings.width or default_size,
    }


def save_results(
    results: list[GeneratedImage], out_dir: str | os.PathLike, run: dict[str, Any], grid: bool = True, first_index: int = 0
) -> list[Path]:
    """Write NNNNN_SEED.json + .png per image (each atomically, the metadata first, so no image is ever
    without its metadata), numbered from `first_index`, and grid.png; returns the image paths."""
    folder = check_writable(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, result in enumerate(results, start=first_index):
        stem = folder / f"{index:05d}_{result.seed}"
        metadata = {**run, "prompt": result.prompt, "negative_prompt": result.negative_prompt, **result.per_encoder_prompts(),
                    "seed": result.seed}
        text = json.dumps(metadata, indent=2, allow_nan=False)  # metadata is always valid JSON
        write_atomically(stem.with_suffix(".json"), lambda path: Path(path).write_text(text))
        write_atomically(stem.with_suffix(".png"), lambda path: result.image.save(path, format="PNG"))
        paths.append(stem.with_suffix(".png"))
    if grid:
        save_grid([result.image for result in results], folder, run)
    return paths


def save_grid(images: list[Image.Image], folder: Path, run: dict[str, Any]) -> None:
    """grid.png: one row per prompt when it has several images, else as square as it gets; none for one image."""
    if len(images) < 2:
        return
    columns = run.get("num_images_per_prompt", 1)
    columns = columns if columns > 1 else math.ceil(math.sqrt(len(images)))
    sheet = image_grid(images, columns)
    write_atomically(folder / "grid.png", lambda path: sheet.save(path, format="PNG"))


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """diffusers' make_image_grid, `columns` wide, with a short last row filled with white."""
    rows = math.ceil(len(images) / columns)
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid([*images, *[blank] * (rows * columns - len(images))], rows=rows, cols=columns)
