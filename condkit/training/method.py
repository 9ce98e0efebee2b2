"""What a training method plugs into the shared denoising loop (`condkit.training.loop.train`).

The loop owns everything the methods share: the dataset, VAE latents (encoded once per image),
noise, timesteps, the prediction target, the optimizer, gradient accumulation, checkpoints and
resume. A method owns its trainable parameters and decides how a batch conditions the UNet.

The loop hands `forward` the frozen parts — the UNet and the conditioner — as arguments, so they
are neither saved in checkpoints nor broadcast between processes, and a method holds only what it
trains. By default a batch is conditioned exactly as at inference: the conditioner's
`denoiser_inputs` (its `embed`, then `at_timestep` for a timestep-aware one) on `prompts_for(batch)`,
then `unet_call.predict` (SD; SDXL with its pooled vector and time ids). So training an adapter is:

    class TrainProjection(TrainingMethod):
        def __init__(self, projection):            # the module inside the ProjectedConditioner handed to train()
            super().__init__()
            self.projection = projection

A method that needs more (CoRe's regularizers) overrides `forward` and returns the UNet prediction,
or a `MethodOutput` with an extra loss; one without a conditioner implements `encoder_hidden_states`.
The loop optimises exactly `trainable_parameters()` (those that require grad).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from condkit.conditioning.base import Conditioner
from condkit.training.unet_call import predict


@dataclass
class TrainingBatch:
    """One process's share of one micro-batch.

    indices: dataset indices of the images (int64, shape (B,)).
    captions: the dataset's caption of each image.
    latents: clean VAE latents, already scaled by the VAE's scaling factor (B, C, h, w).
    noise: the noise mixed into `latents` to make the noisy latents (noise offset included).
    step: optimizer steps completed before this batch.
    image_size: (height, width) of the training images in pixels.
    original_sizes, crops_top_left: with random crops, flips or buckets, each image's (height, width)
    before resizing and the (top, left) corner of its crop (SDXL's micro-conditioning); else None.
    """

    indices: torch.Tensor
    captions: list[str]
    latents: torch.Tensor
    noise: torch.Tensor
    step: int
    image_size: tuple[int, int]
    original_sizes: list[tuple[int, int]] | None = None
    crops_top_left: list[tuple[int, int]] | None = None


@dataclass
class MethodOutput:
    """A UNet prediction plus a loss term the method adds to the denoising loss (already weighted)."""

    prediction: torch.Tensor
    extra_loss: torch.Tensor | None = None


class TrainingMethod(nn.Module):
    """Base class of what `train` optimises."""

    def prompts_for(self, batch: TrainingBatch) -> list[str]:
        """The prompt of each image: its caption (textual inversion draws templates instead)."""
        return batch.captions

    def encoder_hidden_states(self, batch: TrainingBatch, timesteps: torch.Tensor) -> torch.Tensor:
        """Conditioning of a method trained without a conditioner."""
        raise NotImplementedError(f"{type(self).__name__} needs a conditioner (train(..., conditioner=...)) or encoder_hidden_states")

    def forward(
        self,
        unet: nn.Module,
        conditioner: Conditioner | None,
        batch: TrainingBatch,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor | MethodOutput:
        """The UNet's prediction for `noisy_latents` at `timesteps` (the loop compares it with the target)."""
        if conditioner is None:
            hidden, pooled = self.encoder_hidden_states(batch, timesteps), None
        else:
            hidden, pooled = conditioner.denoiser_inputs(self.prompts_for(batch), timesteps)
        return predict(unet, noisy_latents, timesteps, hidden, pooled, batch.image_size, batch.original_sizes,
                       batch.crops_top_left)

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
