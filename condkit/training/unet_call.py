"""The one place training calls a UNet: SD takes encoder_hidden_states; SDXL also its pooled vector and time ids.

Training images are centre-cropped squares, so SDXL's micro-conditioning is original size = target
size = the image size, crop (0, 0). The image size comes with the batch (`TrainingBatch.image_size`),
so nothing needs the VAE's scale factor.
"""

from __future__ import annotations

import torch
from torch import nn


def is_sdxl_unet(unet: nn.Module) -> bool:
    return unet.config.get("addition_embed_type") == "text_time"


def sdxl_added_conditions(pooled: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    height, width = image_size
    time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}


def predict(
    unet: nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor | None,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """The UNet's prediction for `noisy_latents` conditioned on `hidden` (and, for SDXL, `pooled`)."""
    hidden = hidden.to(unet.dtype)
    if not is_sdxl_unet(unet):
        return unet(noisy_latents, timesteps, encoder_hidden_states=hidden).sample
    if pooled is None:
        raise ValueError("this UNet (SDXL) needs a pooled text vector, but the conditioning has none")
    added = sdxl_added_conditions(pooled.to(unet.dtype), image_size)
    return unet(noisy_latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
