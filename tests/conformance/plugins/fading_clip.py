"""A test-only conditioner, in one file: CLIP embeddings that fade in as denoising proceeds.

Nothing else in the repository names it. The conformance suite's conftest exposes this folder
through an entry point of the `condkit.conditioners` group, as a third-party package would, and the
suite then tests it with every pipeline.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from condkit import CLIPConditioner, Conditioner, Conditioning, register_conditioner


@register_conditioner("test-fading-clip")
class FadingCLIPConditioner(Conditioner):
    """At timestep t of T, the denoiser sees CLIP's embeddings times 1 - strength * t / T."""

    timestep_aware = True
    config_names = ("strength",)

    def __init__(self, clip: CLIPConditioner, strength: float = 0.5, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.clip = clip
        self.strength = strength
        self.num_train_timesteps = num_train_timesteps

    @classmethod
    def from_pipeline(cls, pipe: Any, strength: float = 0.5) -> FadingCLIPConditioner:
        return cls(CLIPConditioner.from_pipeline(pipe), strength, pipe.scheduler.config.num_train_timesteps)

    def embed(self, prompt, negative_prompt=None, num_images_per_prompt=1) -> Conditioning:
        return replace(self.clip.embed(prompt, negative_prompt, num_images_per_prompt), needs_attach=True)

    def at_timestep(self, features: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        fraction = torch.as_tensor(timestep, dtype=features.dtype, device=features.device) / self.num_train_timesteps
        scale = 1 - self.strength * fraction.reshape(-1, 1, 1)
        return features.as_subclass(torch.Tensor) * scale
