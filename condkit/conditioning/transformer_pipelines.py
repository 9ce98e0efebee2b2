"""Which prompt encoding a diffusers transformer pipeline uses: SD3 (CLIP-L + CLIP-G + T5) or Flux (T5 + CLIP-L)."""

from __future__ import annotations

from typing import Any

from condkit.conditioning.base import Conditioner
from condkit.conditioning.flux_clip import FluxCLIPConditioner, is_flux_pipeline
from condkit.conditioning.sd3_clip import SD3CLIPConditioner, is_sd3_pipeline


def transformer_family(pipe: Any) -> str | None:
    """"sd3", "flux", or None for a pipeline of neither layout."""
    if is_sd3_pipeline(pipe):
        return "sd3"
    if is_flux_pipeline(pipe):
        return "flux"
    return None


def transformer_clip_conditioner(pipe: Any, **options: Any) -> Conditioner:
    """The CLIP-family conditioner for `pipe`'s transformer layout."""
    family = transformer_family(pipe)
    if family == "sd3":
        return SD3CLIPConditioner.from_pipeline(pipe, **options)
    if family == "flux":
        return FluxCLIPConditioner.from_pipeline(pipe, **options)
    raise ValueError(
        f"{type(pipe).__name__} has a transformer but neither SD3's text encoders (CLIP-L, CLIP-G, T5) nor Flux's "
        "(CLIP-L, T5); condkit's CLIP conditioning supports SD, SDXL, SD3 and Flux pipelines"
    )
