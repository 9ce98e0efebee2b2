"""Adapter training on the shared loop: the connector of an LLM adapter, or a CLP/WiCLP projection.

    conditioner = ProjectedConditioner.from_pipeline(pipe, "wiclp", switch_off_timestep=800)
    train(ProjectionTraining(conditioner.projection), pipe.unet, pipe.vae, pipe.scheduler, dataset,
          TrainingConfig(..., learning_rate=1e-5, adam_weight_decay=0.0, max_grad_norm=1.0), conditioner=conditioner)
    conditioner.save_pretrained("runs/wiclp/conditioner")

    conditioner = ConcatConditioner(LLMAdapterConditioner.from_pipeline(pipe, language_model=..., connector="new"),
                                    CLIPConditioner.from_pipeline(pipe))
    train(ConnectorTraining(conditioner.first.connector), ..., conditioner=conditioner)

A method names the module that trains; the loop hands it the conditioner that module sits in and
freezes the rest (language model, CLIP encoders). The UNet is conditioned through that very
conditioner's public `denoiser_inputs` — `embed`, then `at_timestep` — which is what attach's hooks
do at inference, so a saved conditioner gives the UNet exactly what it saw in training. The
language model's features of a caption are computed once and kept by the LLMAdapterConditioner.

Where the projection applies: at inference ProjectedConditioner projects the positive prompt only
while t > τ (the switch-off timestep). Training does the same by default: rows drawn with t > τ are
projected, rows with t ≤ τ condition the UNet on plain CLIP embeddings and give the projection no
gradient. The projection thus learns only the job it has at inference, at the price of fewer
useful rows per step (with τ = 800 about a fifth). `project_all_timesteps=True` projects every row,
as Zarei et al. train.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condkit.conditioning.ella_connector import TimestepAwareConnector
from condkit.conditioning.projection import CLP, ProjectedConditioner, WiCLP
from condkit.training.method import TrainingBatch, TrainingMethod
from condkit.training.unet_call import predict


def public_config(module: Any) -> dict[str, Any]:
    """A diffusers module's constructor arguments, without bookkeeping entries such as _use_default_values."""
    return {key: value for key, value in module.config.items() if not key.startswith("_")}


class ConnectorTraining(TrainingMethod):
    """Train a TimestepAwareConnector (inside the LLMAdapterConditioner, or ConcatConditioner, handed to `train`)."""

    def __init__(self, connector: TimestepAwareConnector) -> None:
        super().__init__()
        self.connector = connector.requires_grad_(True)

    def settings(self) -> dict[str, Any]:
        return {"connector": public_config(self.connector)}


class ProjectionTraining(TrainingMethod):
    """Train a CLP or WiCLP (inside the ProjectedConditioner handed to `train`) with the plain denoising loss.

    project_all_timesteps: project every row whatever its timestep (the paper's training); by
    default rows are projected exactly where inference projects them (t > τ).
    """

    def __init__(self, projection: CLP | WiCLP, *, project_all_timesteps: bool = False) -> None:
        super().__init__()
        self.projection = projection.requires_grad_(True)
        self.project_all_timesteps = project_all_timesteps

    def settings(self) -> dict[str, Any]:
        return {"projection": type(self.projection).__name__, "config": public_config(self.projection),
                "project_all_timesteps": self.project_all_timesteps}

    def forward(
        self,
        unet: nn.Module,
        conditioner: ProjectedConditioner,
        batch: TrainingBatch,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        if not self.project_all_timesteps:
            return super().forward(unet, conditioner, batch, noisy_latents, timesteps)
        conditioning = conditioner.embed(self.prompts_for(batch))
        embeds, positive = conditioner.unmark(conditioning.prompt_embeds)
        hidden = conditioner.project_rows(embeds, positive)
        return predict(unet, noisy_latents, timesteps, hidden, conditioning.pooled_prompt_embeds, batch.image_size,
                       batch.original_sizes, batch.crops_top_left)
