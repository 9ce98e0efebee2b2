"""Stage "decoder": fine-tune the VAE decoder with the encoder frozen.

The encoder fixes the latent space the UNet is trained in, so the decoder can keep improving
after the UNet stage without invalidating it, as Stable Diffusion's ft-MSE decoder did. The
outline-weighted loss of the VAE stage is kept: the world's scorer tells shapes apart by their
outlines, and small crosses and diamonds are what a blurry decoder confuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from condkit.training.loop import LossMethod, train_with_own_loss

from .stage_runner import final_loss, save_final, stage_config
from .train_vae import outline_weighted_error, pool_pixels, reconstruction_quality, scorer_on_reconstructions
from .world_data import Pool


@dataclass(frozen=True)
class DecoderScale:
    steps: int
    batch_size: int
    learning_rate: float
    checkpoint_every: int
    scored_images: int
    small_object_weight: float = 0.0


class DecoderStage(LossMethod):
    """The outline-weighted reconstruction error through the frozen encoder; only the decoder side trains."""

    def __init__(self, vae: AutoencoderKL, small_object_weight: float = 0.0) -> None:
        super().__init__()
        self.vae = vae
        self.small_object_weight = small_object_weight
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)

    def settings(self) -> dict:
        return {"small_object_weight": self.small_object_weight}

    def forward(self, items: Sequence[dict]) -> torch.Tensor:  # type: ignore[override]
        images = pool_pixels(items, self.vae.device)
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.sample()
        return outline_weighted_error(self.vae.decode(latents).sample, images, self.small_object_weight)


def train_decoder(
    stage_dir: Path, vae: AutoencoderKL, pool: Pool, held_out: Pool, scale: DecoderScale, *, seed: int
) -> dict:
    """Fine-tune (or resume) `vae`'s decoder; the whole VAE is saved under stage_dir/final."""
    config = stage_config(
        stage_dir, steps=scale.steps, batch_size=scale.batch_size, learning_rate=scale.learning_rate,
        checkpoint_every=scale.checkpoint_every, warmup_steps=0, weight_decay=0.0, seed=seed,
    )  # fmt: skip
    result = train_with_own_loss(DecoderStage(vae, scale.small_object_weight), pool, config)
    vae.cpu().eval()
    report = {
        "final_loss": final_loss(result),
        **reconstruction_quality(vae, held_out),
        "scorer": scorer_on_reconstructions(vae, scale.scored_images, seed=seed + 2),
    }
    save_final(stage_dir, vae)
    return report
