"""Does a conditioner's output fit a pipeline? Widths of the embeddings and of the pooled vector.

A saved conditioner records what it gives (`conditioner_output`); loading it onto a pipeline first
compares that with what the pipeline's denoiser takes (`pipeline_input`), so a conditioner saved for
another base width or another pipeline family (SD vs SDXL: pooled vector or none) fails in one line
before anything runs.
"""

from __future__ import annotations

from typing import Any

import torch

from condkit.conditioning.features import plain

Signature = dict[str, int | None]


def conditioner_output(conditioner: Any) -> Signature:
    """{"width", "pooled_width"} of what `conditioner` hands the denoiser, read off one encoded prompt."""
    conditioning = conditioner.encode("")
    embeds, pooled = conditioning.prompt_embeds, conditioning.pooled_prompt_embeds
    if conditioner.timestep_aware:
        with torch.no_grad():
            mapped = conditioner.at_timestep(plain(embeds), torch.zeros(1, device=embeds.device))
        embeds, pooled = mapped if isinstance(mapped, tuple) else (mapped, pooled)
    return {"width": int(embeds.shape[-1]), "pooled_width": None if pooled is None else int(pooled.shape[-1])}


def pipeline_input(pipe: Any) -> Signature:
    """{"width", "pooled_width"} that `pipe`'s denoiser takes."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        config = transformer.config
        return {"width": int(config.joint_attention_dim), "pooled_width": config.get("pooled_projection_dim")}
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no unet or transformer to condition")
    config = unet.config
    width = config.cross_attention_dim
    width = width[0] if isinstance(width, (list, tuple)) else width
    pooled = None
    if config.get("addition_embed_type") == "text_time":
        encoder_2 = getattr(pipe, "text_encoder_2", None)
        if encoder_2 is not None:
            pooled = int(encoder_2.config.projection_dim)
        else:
            pooled = int(config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim)
    return {"width": int(width), "pooled_width": pooled}


def describe(signature: Signature) -> str:
    pooled = signature.get("pooled_width")
    tail = f"a {pooled}-wide pooled vector" if pooled else "no pooled vector"
    return f"{signature['width']}-wide embeddings with {tail}"


def check_output_fits(output: Signature, pipe: Any, what: str) -> None:
    expected = pipeline_input(pipe)
    if output.get("width") != expected["width"] or output.get("pooled_width") != expected["pooled_width"]:
        raise ValueError(
            f"{what} gives {describe(output)}, but this {type(pipe).__name__} takes {describe(expected)}; "
            "it was saved for another base model or pipeline family"
        )
