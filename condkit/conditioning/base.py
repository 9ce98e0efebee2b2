"""The contract every conditioner keeps: prompt text in, pipeline keyword arguments out.

A `Conditioner` turns prompts into a `Conditioning`; `pipe(**conditioning.kwargs(), ...)` then works
for any diffusers pipeline that accepts `prompt_embeds`.

Timestep-aware conditioners (ELLA-style connectors, projections with a switch-off timestep) return
*features* from `encode()` instead of final conditioning, marked `needs_attach`; the hooks that
`condkit.attach` puts on the pipeline's denoisers call `at_timestep(features, t)` inside every
denoiser call. The features travel through the pipeline exactly like prompt embeddings (batched,
repeated per image, concatenated for CFG), so the conditioner receives them in the pipeline's row
order and must derive anything it needs (such as true lengths of zero-padded rows) from the tensor.

A conditioner is a unit: its `config` (the options that are not tensors) and its trainable parts
are written by `save_pretrained(folder)` and read back by `Conditioner.from_pretrained(folder, pipe)`
(or `condkit.load_conditioner`), which rebuilds it on the pipeline's own encoders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from condkit.conditioning.features import as_features
from condkit.conditioning.pipeline_fit import check_output_fits, conditioner_output
from condkit.files import write_folder_atomically

CONFIG_NAME = "conditioner_config.json"
RUN_CONDITIONER = "conditioner"  # where a training run folder keeps its conditioner
Prompt = str | list[str]  # one prompt, or one per image of the batch
PER_ENCODER_PROMPTS = ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")
"""diffusers' names for the texts of a pipeline's further text encoders (SDXL's and SD3's CLIP-G, SD3's T5, Flux's T5)."""


@dataclass
class Conditioning:
    """Tensors a diffusers pipeline takes as keyword arguments.

    needs_attach: prompt_embeds hold features that only the conditioner's `at_timestep` maps to
    conditioning; they are `PipelineFeatures`, which refuse to reach a denoiser unattached.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    needs_attach: bool = False

    def __post_init__(self) -> None:
        negative = self.negative_prompt_embeds
        if negative is not None and negative.shape != self.prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds shape {tuple(negative.shape)} differs from prompt_embeds shape "
                f"{tuple(self.prompt_embeds.shape)}; pad both to one length before building a Conditioning"
            )
        if self.needs_attach:
            self.prompt_embeds = as_features(self.prompt_embeds)
            if negative is not None:
                self.negative_prompt_embeds = as_features(negative)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def kwargs(self) -> dict[str, torch.Tensor]:
        """The non-empty tensors, keyed by the pipeline argument names."""
        return self.tensors()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        moved = {name: tensor.to(device=device, dtype=dtype) for name, tensor in self.tensors().items()}
        return replace(self, **moved)


class Conditioner(nn.Module):
    """Base class of every conditioning module.

    Subclasses implement `embed` (differentiable; `encode` is the same under torch.no_grad()) and
    `from_pipeline`; timestep-aware ones set `timestep_aware = True` and implement `at_timestep`.
    `config_names` lists the `from_pipeline` options that `config` records; conditioners with
    trained parts write them in `save_parts` and read them in `load_parts`.
    """

    timestep_aware: ClassVar[bool] = False
    registered_name: ClassVar[str | None] = None
    config_names: ClassVar[tuple[str, ...]] = ()
    # Whether encode() gives exactly the tensors of the pipeline's own encode_prompt (no weights, one chunk).
    reproduces_pipeline_prompts: ClassVar[bool] = False
    # Options from_pipeline cannot do without, each with the one line that says how to give it.
    required_options: ClassVar[dict[str, str]] = {}
    # The PER_ENCODER_PROMPTS `encode` reads; generate() refuses any other one before it starts.
    per_encoder_prompt_names: ClassVar[tuple[str, ...]] = ()

    def embed(self, prompt: Prompt, negative_prompt: Prompt | None = None, num_images_per_prompt: int = 1) -> Conditioning:
        raise NotImplementedError

    def encode(
        self, prompt: Prompt, negative_prompt: Prompt | None = None, num_images_per_prompt: int = 1, **per_encoder_prompts: Prompt
    ) -> Conditioning:
        """`embed` without gradients: what a pipeline call needs. `per_encoder_prompts` (prompt_2,
        negative_prompt_2 for SDXL's second encoder) go to conditioners that take them."""
        with torch.no_grad():
            return self.embed(prompt, negative_prompt, num_images_per_prompt, **per_encoder_prompts)

    def at_timestep(self, features: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Map `encode()` features to a denoiser's encoder_hidden_states (and, optionally, pooled vector) at `timestep`."""
        raise NotImplementedError(f"{type(self).__name__} is not timestep-aware")

    def denoiser_inputs(
        self, prompt: str | list[str], timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder_hidden_states, pooled or None) a denoiser gets for `prompt` at `timesteps`, with gradients:
        `embed`, then `at_timestep` for a timestep-aware conditioner, as attach's hooks do. Training uses it.

        `embed` runs outside any autocast, in the encoders' own dtype, as at inference; `at_timestep`
        (a trained connector or projection) runs under the caller's mixed precision."""
        with torch.autocast(self.device.type, enabled=False):
            conditioning = self.embed(prompt)
        hidden, pooled = conditioning.prompt_embeds, conditioning.pooled_prompt_embeds
        if self.timestep_aware:
            mapped = self.at_timestep(hidden, timesteps)
            hidden, pooled = mapped if isinstance(mapped, tuple) else (mapped, pooled)
        return hidden, pooled

    @classmethod
    def from_pipeline(cls, pipe: Any, **options: Any) -> Conditioner:
        raise NotImplementedError(f"{cls.__name__} cannot be built from a pipeline")

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse, before anything loads, options that leave out a required one."""
        for name, message in cls.required_options.items():
            if options.get(name) is None:
                raise ValueError(message)

    @classmethod
    def example_options(cls, pipe: Any) -> dict[str, Any]:
        """Options that make a runnable (possibly untrained) instance on `pipe`; the conformance suite uses them."""
        return {}

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    @property
    def config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.config_names}

    def save_parts(self, folder: Path) -> None:
        """Write the trained parts into `folder` (nothing for conditioners that only wrap a pipeline's encoders)."""

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        """The `from_pipeline` options that `save_parts` wrote, loaded."""
        return {}

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the config and trained parts; the folder appears whole or not at all."""
        folder = Path(folder)
        if folder.exists() and not overwrite and (not folder.is_dir() or any(folder.iterdir())):
            raise FileExistsError(f"{str(folder)!r} already exists; choose another folder or pass overwrite=True")
        for name, tensor in self.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise FloatingPointError(f"{type(self).__name__} has non-finite values in {name}; nothing was saved")
        if self.registered_name is None:
            raise TypeError(f"{type(self).__name__} is not registered (use @register_conditioner) and cannot be reloaded")
        record = {
            "conditioner": self.registered_name,
            "_class_name": type(self).__name__,
            "output": conditioner_output(self),
            "config": self.config,
        }

        def write(staging: Path) -> None:
            (staging / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
            self.save_parts(staging)

        return write_folder_atomically(folder, write)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, pipe: Any, **options: Any) -> Conditioner:
        """Rebuild a saved conditioner on `pipe`; `options` override the saved config."""
        from condkit.conditioning.registry import get_conditioner_class

        folder = saved_folder(Path(folder))
        record = read_saved_record(folder)
        saved_class = get_conditioner_class(record["conditioner"])
        if not issubclass(saved_class, cls):
            raise ValueError(f"{str(folder)!r} holds a {saved_class.__name__}, not a {cls.__name__}")
        check_output_fits(record["output"], pipe, f"the conditioner saved in {str(folder)!r}")
        return saved_class.from_pipeline(pipe, **{**record["config"], **saved_class.load_parts(folder, pipe), **options})


def saved_folder(folder: Path) -> Path:
    """`folder`, or its conditioner/ when `folder` is a training run (`condkit train ...` writes RUN/conditioner)."""
    if not (folder / CONFIG_NAME).is_file() and (folder / RUN_CONDITIONER / CONFIG_NAME).is_file():
        return folder / RUN_CONDITIONER
    return folder


def read_saved_record(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"conditioner folder {str(folder)!r} does not exist")
    folder = saved_folder(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} is not a saved conditioner (no {CONFIG_NAME}); expected a folder written by save_pretrained")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error.msg} at line {error.lineno}") from None
    missing = [key for key in ("conditioner", "output", "config") if key not in record]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}; expected a file written by save_pretrained")
    return record


def as_prompt_list(prompt: str | list[str], what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")


def as_negative_list(
    negative_prompt: str | list[str] | None, batch_size: int, what: str = "negative_prompt"
) -> list[str] | None:
    """One text per prompt (a negative, or a second encoder's prompt): a single string applies to all; a list
    must match the prompt count."""
    if negative_prompt is None:
        return None
    negatives = as_prompt_list(negative_prompt, what)
    if isinstance(negative_prompt, str):
        return negatives * batch_size
    if len(negatives) != batch_size:
        label = "negative prompts" if what == "negative_prompt" else f"{what} values"
        raise ValueError(f"got {len(negatives)} {label} for {batch_size} prompts; expected {batch_size} or one")
    return negatives
