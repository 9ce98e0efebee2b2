"""What `condkit train textual-inversion` trains through, for each family of pipeline.

    parts = token_training_parts(pipe, "textual-inversion")
    train(method, parts.denoiser, pipe.vae, pipe.scheduler, data, config, conditioner=parts.conditioner)

SD 1.x/2.x and SDXL: the UNet, and CLIPConditioner.from_pipeline(pipe) (one or two CLIP encoders).
SD3 and Flux: the transformer, and load_conditioner("clip", pipe) with its defaults — the conditioner
`condkit generate` builds for them — so the new token gets rows in every encoder that conditioner
reads: SD3's CLIP-L, CLIP-G and T5, Flux's CLIP-L and T5. The loop trains them with the flow-matching
objective of the pipeline's scheduler (see `flow_matching`), the Python API's path. Their token is written
in the family's single-file layout (`sd3_single_file`: clip_l, clip_g, t5xxl; `flux_single_file`:
clip_l, t5xxl), the keys ComfyUI reads, and, as for SD, the run's RUN/conditioner is a "clip-embeddings"
unit (SD3EmbeddingsConditioner, FluxEmbeddingsConditioner) that `condkit generate --conditioner RUN` loads
with the token (the file alone stores no token name: `--embedding TOKEN=FILE`). CoRe stays SD-only: its
attention regularizer reads the UNet's cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

TRANSFORMER_TOKEN_METHODS = ("textual-inversion",)


@dataclass
class TokenTrainingParts:
    conditioner: Any
    denoiser: nn.Module
    default_resolution: int
    embedding_format: str | None  # the only layout a transformer family's token is written in; None: SD's choice


def token_training_parts(pipe: Any, method: str, max_sequence_length: int | None = None) -> TokenTrainingParts:
    """The conditioner and denoiser `condkit train METHOD` uses on `pipe`; one-line ValueError for a pipeline it cannot.
    max_sequence_length (SD3 and Flux only): T5 tokens per caption, as `condkit generate --max-sequence-length`."""
    from condkit.conditioning.clip import CLIPConditioner
    from condkit.pipelines.transformer_options import check_max_sequence_length

    check_max_sequence_length(pipe, max_sequence_length)

    if getattr(pipe, "unet", None) is not None:
        return TokenTrainingParts(CLIPConditioner.from_pipeline(pipe), pipe.unet,
                                  pipe.unet.config.sample_size * pipe.vae_scale_factor, None)
    transformer = getattr(pipe, "transformer", None)
    family = type(pipe).__name__
    if transformer is None or family not in ("StableDiffusion3Pipeline", "FluxPipeline"):
        raise ValueError(f"condkit train {method} runs on StableDiffusion, SDXL, SD3 and Flux pipelines; this is a {family}")
    if method not in TRANSFORMER_TOKEN_METHODS:
        raise ValueError(f"condkit train {method} runs on StableDiffusion(XL) models (its regularizer reads the UNet's "
                         f"cross-attention); this is a {family} (SD3/Flux: condkit train textual-inversion)")
    from condkit.conditioning.registry import load_conditioner

    options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    conditioner = load_conditioner("clip", pipe, **options)
    return TokenTrainingParts(conditioner, transformer, pipe.default_sample_size * pipe.vae_scale_factor,
                              conditioner.embedding_format)


def check_save_format(parts: TokenTrainingParts, save_format: str | None) -> None:
    """--save-format must fit the model: SD one encoder, SDXL two, SD3/Flux their own single-file layout."""
    from condkit.conditioning.embedding_formats import SINGLE_ENCODER_FORMATS

    if save_format is None:
        return
    if parts.embedding_format is not None:
        if save_format != parts.embedding_format:
            raise ValueError(f"--save-format {save_format!r} does not fit this model; its tokens are written as "
                             f"{parts.embedding_format!r}")
        return
    one_encoder = len(parts.conditioner.text_encoders) == 1
    if (save_format in SINGLE_ENCODER_FORMATS) != one_encoder:
        family = "SD1.x/2.x (one text encoder)" if one_encoder else "SDXL (two text encoders)"
        raise ValueError(f"--save-format {save_format!r} does not fit this {family} model")
