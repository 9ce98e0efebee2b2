"""Stage "unet": a UNet2DConditionModel on 16x16x4 latents, conditioned SD1.x style.

The frozen text encoder's last_hidden_state (CLIP_POSITIONS tokens) is the cross-attention context; 10% of
captions are replaced by the empty caption so classifier-free guidance works. Epsilon
prediction on DDPM scaled_linear betas as in Stable Diffusion, Min-SNR-5 loss weighting, AdamW
and an EMA copy of the weights, which is what gets shipped. VAE latents of the pool are
computed once and cached; text states are cheap and computed per batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from condkit.conditioning import CLIP_POSITIONS

from .stage_runner import (
    StageRunner,
    atomic_save_folder,
    atomic_torch_save,
    is_done,
    mark_done,
    read_report,
    step_generator,
)
from .world_data import Pool

CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0


@dataclass(frozen=True)
class UnetScale:
    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    attention_head_dim: int
    steps: int
    batch_size: int
    learning_rate: float
    ema_decay: float
    checkpoint_every: int


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def build_unet(scale: UnetScale, cross_attention_dim: int, latent_size: int) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in scale.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(scale.attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=scale.channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=scale.attention_head_dim,
        norm_num_groups=min(32, scale.channels[0]),
        # The deepest level already has cross-attention blocks; no mid block keeps the shipped
        # folder under 40 MB and each step cheaper.
        mid_block_type=None,
    )


@torch.no_grad()
def cache_latents(vae: AutoencoderKL, pool: Pool, path: Path, progress: bool, chunk: int = 256) -> torch.Tensor:
    """Mean and std of each pool image's latent distribution, stacked as (N, 2, 4, h, w)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    parts = []
    for start in tqdm(range(0, len(pool), chunk), desc="encode latents", disable=not progress, dynamic_ncols=True):
        posterior = vae.encode(pool.float_images(torch.arange(start, min(start + chunk, len(pool))))).latent_dist
        parts.append(torch.stack([posterior.mean, posterior.std], dim=1))
    latents = torch.cat(parts)
    atomic_torch_save(latents, path)
    return latents


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, max=MIN_SNR_GAMMA) / snr


def train_unet(
    stage_dir: Path,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    pool: Pool,
    scale: UnetScale,
    *,
    seed: int,
    resume: bool,
    progress: bool,
) -> dict:
    """Train (or resume) the UNet stage; the EMA weights are saved under stage_dir/final."""
    if resume and is_done(stage_dir):
        return read_report(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    latents = cache_latents(vae, pool, stage_dir / "latents.pt", progress)
    scaling_factor = vae.config.scaling_factor
    caption_ids = tokenizer(
        pool.captions, padding="max_length", truncation=True, max_length=CLIP_POSITIONS, return_tensors="pt"
    ).input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=CLIP_POSITIONS, return_tensors="pt").input_ids[0]

    torch.manual_seed(seed)
    unet = build_unet(scale, text_encoder.config.hidden_size, latents.shape[-1])
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    scheduler = training_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=scale.learning_rate, weight_decay=0.01)
    warmup = max(1, scale.steps // 50)
    runner = StageRunner(
        stage_dir, {"unet": unet, "ema_unet": ema_unet}, optimizer, scale.steps, scale.checkpoint_every,
        lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / scale.steps),
        resume=resume, progress=progress, description="unet",
    )  # fmt: skip

    def train_step(step: int) -> float:
        generator = step_generator(seed, step)
        batch = scale.batch_size
        indices = torch.randint(len(pool), (batch,), generator=generator)
        mean, std = latents[indices].unbind(dim=1)
        clean = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator)
        ids = caption_ids[indices].clone()
        ids[torch.rand(batch, generator=generator) < CAPTION_DROPOUT] = empty_ids
        with torch.no_grad():
            context = text_encoder(input_ids=ids).last_hidden_state
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, timesteps)).mean()
        runner.optimise(loss)
        decay = min(scale.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_unet.parameters()), list(unet.parameters()), 1 - decay)
        return per_sample.mean().item()

    final_loss = runner.run(train_step)
    report = {"final_loss": final_loss, "parameters": sum(p.numel() for p in unet.parameters())}
    atomic_save_folder(lambda folder: ema_unet.save_pretrained(folder), stage_dir / "final")
    mark_done(stage_dir, report)
    return report
