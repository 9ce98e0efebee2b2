"""Stage "decoder": fine-tune the VAE decoder with the encoder frozen.

The encoder fixes the latent space the UNet is trained in, so the decoder can keep improving
after the UNet stage without invalidating it, as Stable Diffusion's ft-MSE decoder did. The
outline-weighted loss of the VAE stage is kept: the world's scorer tells shapes apart by their
outlines, and small crosses and diamonds are what a blurry decoder confuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .stage_runner import StageRunner, atomic_save_folder, is_done, mark_done, read_report, step_generator
from .train_vae import outline_weights, reconstruction_quality, scorer_on_reconstructions
from .world_data import Pool


@dataclass(frozen=True)
class DecoderScale:
    steps: int
    batch_size: int
    learning_rate: float
    checkpoint_every: int
    scored_images: int


def train_decoder(
    stage_dir: Path,
    vae: AutoencoderKL,
    pool: Pool,
    held_out: Pool,
    scale: DecoderScale,
    *,
    seed: int,
    resume: bool,
    progress: bool,
) -> dict:
    """Fine-tune (or resume) `vae`'s decoder; the whole VAE is saved under stage_dir/final."""
    if resume and is_done(stage_dir):
        return read_report(stage_dir)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    decoder_parameters = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.AdamW(decoder_parameters, lr=scale.learning_rate, weight_decay=0.0)
    runner = StageRunner(
        stage_dir, {"vae": vae}, optimizer, scale.steps, scale.checkpoint_every, lambda s: max(0.05, 1 - s / scale.steps),
        resume=resume, progress=progress, description="decoder",
    )  # fmt: skip

    def train_step(step: int) -> float:
        generator = step_generator(seed, step)
        indices = torch.randint(len(pool), (scale.batch_size,), generator=generator)
        images = pool.float_images(indices)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator=generator)
        error = vae.decode(latents).sample - images
        weights = outline_weights(images)
        loss = ((error.abs() + error.square()) * weights).mean() / weights.mean()
        runner.optimise(loss)
        return loss.item()

    final_loss = runner.run(train_step)
    vae.eval()
    report = {
        "final_loss": final_loss,
        **reconstruction_quality(vae, held_out),
        "scorer": scorer_on_reconstructions(vae, scale.scored_images, seed=seed + 2),
    }
    atomic_save_folder(lambda folder: vae.save_pretrained(folder), stage_dir / "final")
    mark_done(stage_dir, report)
    return report
