"""The flow-matching forward process and target SD3 and Flux were trained with, for the shared loop.

A sample's noise level is drawn as diffusers' SD3/Flux training scripts draw it with weighting
"none": an index into the scheduler's own training schedule (FlowMatchEulerDiscreteScheduler built
from the pipeline's config: its `num_train_timesteps` sigmas, SD3's shift applied, Flux's dynamic
shift not), giving σ and the timestep t = σ·1000 the transformer is called with. The noisy latents
are x_σ = (1 − σ)·x + σ·ε (the scheduler's `scale_noise`) and the regression target is the velocity
ε − x.
"""

from __future__ import annotations

from typing import Any

import torch


def is_flow_matching(scheduler: Any) -> bool:
    """A flow-matching scheduler (SD3's and Flux's FlowMatchEulerDiscreteScheduler) rather than a DDPM-family one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


class FlowMatching:
    def __init__(self, scheduler: Any) -> None:
        fresh = type(scheduler).from_config(scheduler.config)  # the full training schedule, not a sampling run's
        self.sigmas = fresh.sigmas.float().cpu()
        self.timesteps = fresh.timesteps.float().cpu()
        self.num_train_timesteps = len(self.timesteps)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_σ, t) for each sample's schedule index."""
        sigmas = self.sigmas[indices.cpu()].to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        return (1 - sigmas) * latents + sigmas * noise, self.timesteps[indices.cpu()].to(latents.device)

    @staticmethod
    def target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - latents
