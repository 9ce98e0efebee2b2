"""The contract every conditioner keeps: prompt text in, pipeline keyword arguments out.

A `Conditioner` turns prompts into a `Conditioning`; `pipe(**conditioning.kwargs(), ...)` then works
for any StableDiffusion / StableDiffusionXL pipeline that accepts `prompt_embeds`.

Timestep-aware conditioners (ELLA-style connectors) return *features* from `encode()` instead of
final UNet conditioning; the `TimestepAwareUNet` proxy in `condkit.pipelines.attach` calls
`at_timestep(features, t)` inside every UNet call. The features travel through the pipeline exactly
like prompt embeddings (batched, repeated per image, concatenated for CFG), so the conditioner
receives them in the pipeline's row order and must derive anything it needs (such as true lengths
of zero-padded rows) from the tensor itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn


@dataclass
class Conditioning:
    """Tensors a diffusers pipeline takes as keyword arguments."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        negative = self.negative_prompt_embeds
        if negative is not None and negative.shape != self.prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds shape {tuple(negative.shape)} differs from prompt_embeds shape "
                f"{tuple(self.prompt_embeds.shape)}; pad both to one length before building a Conditioning"
            )

    def kwargs(self) -> dict[str, torch.Tensor]:
        """The non-empty tensors, keyed by the pipeline argument names."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        moved = {name: tensor.to(device=device, dtype=dtype) for name, tensor in self.kwargs().items()}
        return replace(self, **moved)

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


class Conditioner(nn.Module):
    """Base class of every conditioning module.

    Subclasses implement `encode`; timestep-aware ones set `timestep_aware = True` and implement
    `at_timestep`. A conditioner's trainable part, if any, is a diffusers ModelMixin + ConfigMixin so
    that save_pretrained / from_pretrained work as diffusers users expect.
    """

    timestep_aware: ClassVar[bool] = False

    def encode(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
    ) -> Conditioning:
        raise NotImplementedError

    def at_timestep(self, features: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Map `encode()` features to UNet encoder_hidden_states at diffusion timestep `timestep`."""
        raise NotImplementedError(f"{type(self).__name__} is not timestep-aware")

    @classmethod
    def from_pipeline(cls, pipe: Any, **options: Any) -> Conditioner:
        raise NotImplementedError(f"{cls.__name__} cannot be built from a pipeline")

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")


def as_prompt_list(prompt: str | list[str], what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")


def as_negative_list(negative_prompt: str | list[str] | None, batch_size: int) -> list[str] | None:
    """One negative per prompt: a single string applies to all; a list must match the prompt count."""
    if negative_prompt is None:
        return None
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    if isinstance(negative_prompt, str):
        return negatives * batch_size
    if len(negatives) != batch_size:
        raise ValueError(f"got {len(negatives)} negative prompts for {batch_size} prompts; expected {batch_size} or one")
    return negatives


_REGISTRY: dict[str, type[Conditioner]] = {}
C = TypeVar("C", bound=type[Conditioner])


def register_conditioner(name: str) -> Callable[[C], C]:
    """Class decorator: make a conditioner available by name (Python API and `--conditioner NAME`)."""

    def decorate(cls: C) -> C:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"conditioner name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registered_name = name
        return cls

    return decorate


def available_conditioners() -> list[str]:
    _import_builtin_conditioners()
    return sorted(_REGISTRY)


def get_conditioner_class(name: str) -> type[Conditioner]:
    _import_builtin_conditioners()
    if name not in _REGISTRY:
        raise ValueError(f"unknown conditioner {name!r}; expected one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _import_builtin_conditioners() -> None:
    import importlib

    for module in ("clip", "long_clip", "llm_adapter", "projection"):
        try:
            importlib.import_module(f"condkit.conditioning.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"condkit.conditioning.{module}":
                raise
