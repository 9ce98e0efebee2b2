"""The one place training calls a UNet: SD takes encoder_hidden_states; SDXL also its pooled vector and time ids.

SDXL's micro-conditioning is (original size, crop top-left, target size) per image. With the
default centre-cropped squares it is original = target = the image size, crop (0, 0). With random
crops, flips or buckets (views, see `augment`) the batch carries each image's size before resizing
and its crop's top-left corner in the resized image, as diffusers' SDXL training scripts pass them.
The sizes come with the batch (`TrainingBatch`), so nothing needs the VAE's scale factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from condkit.training.transformer_call import is_transformer, predict_transformer


def is_sdxl_unet(unet: nn.Module) -> bool:
    return unet.config.get("addition_embed_type") == "text_time"


def sdxl_added_conditions(
    pooled: torch.Tensor,
    image_size: tuple[int, int],
    original_sizes: Sequence[tuple[int, int]] | None = None,
    crops_top_left: Sequence[tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    height, width = image_size
    if original_sizes is None:
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}
    rows = [[*original, *corner, height, width] for original, corner in zip(original_sizes, crops_top_left)]
    return {"text_embeds": pooled, "time_ids": torch.tensor(rows, dtype=pooled.dtype, device=pooled.device)}


def predict(
    unet: nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor | None,
    image_size: tuple[int, int],
    original_sizes: Sequence[tuple[int, int]] | None = None,
    crops_top_left: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """The UNet's prediction for `noisy_latents` conditioned on `hidden` (and, for SDXL, `pooled` and the
    micro-conditioning: (height, width) sizes before resizing and (top, left) crop corners, when given)."""
    if is_transformer(unet):  # SD3 / Flux
        return predict_transformer(unet, noisy_latents, timesteps, hidden, pooled)
    hidden = hidden.to(unet.dtype)
    if not is_sdxl_unet(unet):
        return unet(noisy_latents, timesteps, encoder_hidden_states=hidden).sample
    if pooled is None:
        raise ValueError("this UNet (SDXL) needs a pooled text vector, but the conditioning has none")
    added = sdxl_added_conditions(pooled.to(unet.dtype), image_size, original_sizes, crops_top_left)
    return unet(noisy_latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
