"""The one place training calls an SD3 or Flux transformer (unet_call hands over to it).

SD3's transformer takes the latents as they are and the timestep t = σ·1000. Flux's takes 2×2
patches packed into a sequence, with one position row per patch (`img_ids`) and per text token
(`txt_ids`, all zero), the timestep as σ, and for guidance-distilled models (`guidance_embeds`) the
guidance value it was distilled with; the prediction is unpacked back to the latent grid. The
packing is diffusers' own (FluxPipeline's `_pack_latents`, `_unpack_latents`, `_prepare_latent_image_ids`).
"""

from __future__ import annotations

import torch
from torch import nn

FLUX_TRAINING_GUIDANCE = 3.5  # the default --guidance_scale of diffusers' Flux DreamBooth/LoRA scripts and kohya's


def is_transformer(model: nn.Module) -> bool:
    return "joint_attention_dim" in getattr(model, "config", {})


def predict_transformer(
    transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None
) -> torch.Tensor:
    """The transformer's velocity prediction for `noisy_latents` (B, C, H, W) at `timesteps` (σ·1000)."""
    if pooled is None:
        raise ValueError(f"{type(transformer).__name__} needs a pooled text vector, but the conditioning has none")
    hidden, pooled = hidden.to(transformer.dtype), pooled.to(transformer.dtype)
    if "guidance_embeds" not in transformer.config:  # SD3
        return transformer(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=hidden,
                           pooled_projections=pooled, return_dict=False)[0]
    from diffusers import FluxPipeline

    batch, channels, height, width = noisy_latents.shape
    packed = FluxPipeline._pack_latents(noisy_latents, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy_latents.device, transformer.dtype)
    text_ids = torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=transformer.dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((batch,), FLUX_TRAINING_GUIDANCE, device=noisy_latents.device, dtype=torch.float32)
    output = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
                         encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(output, height, width, 1)
