"""What a training method plugs into the shared denoising loop (`condkit.training.loop.train`).

The loop owns everything the methods share: the dataset, VAE latents (encoded once per image),
noise, timesteps, the prediction target, the optimizer, gradient accumulation, checkpoints and
resume. A method owns its trainable parameters and decides how a batch conditions the UNet.

The smallest method implements `encoder_hidden_states`; the default `forward` then runs the UNet:

    class LearnedContext(TrainingMethod):
        def __init__(self):
            super().__init__()
            self.context = nn.Parameter(torch.zeros(77, 768))

        def encoder_hidden_states(self, batch, timesteps):
            return self.context.expand(len(batch.captions), -1, -1)

A method that needs more (SDXL's added_cond_kwargs, extra loss terms such as CoRe's regularizers)
overrides `forward` and returns the UNet prediction, or a `MethodOutput` with an extra loss.

The loop hands `forward` the UNet as an argument rather than making it part of the method, so a
frozen UNet is neither saved in checkpoints nor broadcast between processes. Frozen modules the
method holds itself (a text encoder, say) should have `requires_grad` off: the loop optimises
exactly `trainable_parameters()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


@dataclass
class TrainingBatch:
    """One process's share of one micro-batch.

    indices: dataset indices of the images (int64, shape (B,)).
    captions: the dataset's caption of each image.
    latents: clean VAE latents, already scaled by the VAE's scaling factor (B, C, h, w).
    noise: the noise mixed into `latents` to make the noisy latents (noise offset included).
    step: optimizer steps completed before this batch.
    """

    indices: torch.Tensor
    captions: list[str]
    latents: torch.Tensor
    noise: torch.Tensor
    step: int


@dataclass
class MethodOutput:
    """A UNet prediction plus a loss term the method adds to the denoising loss (already weighted)."""

    prediction: torch.Tensor
    extra_loss: torch.Tensor | None = None


class TrainingMethod(nn.Module):
    """Base class of what `train` optimises. Subclasses implement `encoder_hidden_states` or `forward`."""

    def encoder_hidden_states(self, batch: TrainingBatch, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encoder_hidden_states or forward")

    def forward(
        self,
        unet: nn.Module,
        batch: TrainingBatch,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor | MethodOutput:
        """The UNet's prediction for `noisy_latents` at `timesteps` (the loop compares it with the target)."""
        context = self.encoder_hidden_states(batch, timesteps)
        return unet(noisy_latents, timesteps, encoder_hidden_states=context).sample

    @property
    def method_name(self) -> str:
        """Recorded in checkpoints; resuming with another method is refused."""
        return type(self).__name__

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings that must be equal to resume a run (placeholder token, rank, ...)."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything this method needs to resume: by default the parameters that require grad."""
        return {name: parameter.detach() for name, parameter in self.named_parameters() if parameter.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step with the number of steps completed (e.g. to rescale a norm)."""


class LossMethod(TrainingMethod):
    """A method with its own objective instead of the denoising loss, run by `train_with_own_loss`.

    `forward(items)` gets one process's share of a micro-batch as the dataset's items and returns
    the scalar loss. Everything else (optimizer, accumulation, processes, checkpoints, resume, the
    NaN guard, progress) is the shared loop's, as for the diffusion methods.
    """

    def forward(self, items: Sequence[Any]) -> torch.Tensor:  # type: ignore[override]
        raise NotImplementedError(f"{type(self).__name__} must implement forward(items) -> loss")
