"""CLIP conditioning plus learned textual-inversion tokens, saved and loaded as one unit ("clip-embeddings").

    conditioner = load_conditioner("runs/toy", pipe)     # RUN/conditioner from `condkit train textual-inversion`
    conditioner.encode("a photo of <toy> on a beach")

`condkit train textual-inversion` and `condkit train core` save their result as this conditioner,
so `condkit generate --conditioner RUN_DIR` needs no `--embedding` flag. The unit is the pipeline's
own CLIP conditioner carrying the tokens its encoders hold: `EmbeddingsConditioner` (a
CLIPConditioner) for SD and SDXL, `SD3EmbeddingsConditioner` (CLIP-L, CLIP-G, T5) and
`FluxEmbeddingsConditioner` (CLIP-L, T5), which `EmbeddingsConditioner.from_pipeline` picks for SD3 and
Flux pipelines. On load the tokens are added to the pipeline's tokenizers and text encoders with
`load_embedding` (as `--embedding` does). A token already there is refused, unless every encoder
already holds exactly its vectors (the unit loaded again on the pipeline it came from).

Saved layout: embeddings/NN.safetensors, one file per token in the family's format of
`embedding_formats` (diffusers for SD, the single SDXL file for SDXL, sd3_single_file and
flux_single_file), readable by other tools too, and embeddings/tokens.json ({file name: token}),
because the single-file layouts store no token name. A folder without tokens.json (written before it
existed) takes each name from its file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from condkit.conditioning.base import Conditioner
from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.embedding_formats import LearnedEmbedding, read_embedding, write_embedding
from condkit.conditioning.embeddings import extract_embedding, load_embedding, text_encoder_pairs
from condkit.conditioning.flux_clip import FluxCLIPConditioner
from condkit.conditioning.registry import register_conditioner
from condkit.conditioning.sd3_clip import SD3CLIPConditioner
from condkit.conditioning.transformer_pipelines import transformer_family

EMBEDDINGS_FOLDER = "embeddings"
TOKENS_FILE = "tokens.json"  # {file name: token}
EXAMPLE_TOKEN = "<example-token>"


class LearnedTokens:
    """Mixin for a CLIP-family conditioner: the learned tokens its encoders hold (`embeddings`), saved as its parts.

    Put it before the conditioner class (class X(LearnedTokens, SD3CLIPConditioner)) so that its
    registered name, constructor and `from_pipeline` come first."""

    registered_name: ClassVar[str | None] = "clip-embeddings"
    embeddings: list[LearnedEmbedding]

    def __init__(self, *args: Any, embeddings: Sequence[LearnedEmbedding] = (), **options: Any) -> None:
        super().__init__(*args, **options)
        self.embeddings = list(embeddings)

    @classmethod
    def from_pipeline(cls, pipe: Any, embeddings: Sequence[LearnedEmbedding | str | os.PathLike] = (),
                      **options: Any) -> Conditioner:
        """Wrap the pipeline's encoders, then load each embedding (a LearnedEmbedding or a file) into them."""
        conditioner = super().from_pipeline(pipe, **options)
        loaded = [item if isinstance(item, LearnedEmbedding) else read_embedding(item) for item in embeddings]
        for embedding in loaded:
            if not holds_embedding(pipe, embedding):
                load_embedding(pipe, embedding)
        conditioner.embeddings = loaded
        return conditioner

    @classmethod
    def example_options(cls, pipe: Any) -> dict[str, Any]:
        """One two-vector token with random rows, sized for each of the pipeline's text encoders."""
        generator = torch.Generator().manual_seed(0)
        _, encoders = text_encoder_pairs(pipe)
        vectors = []
        for encoder in encoders:
            table = encoder.get_input_embeddings().weight
            vectors.append(torch.randn(2, table.shape[1], generator=generator) * table.detach().float().std().item())
        return {"embeddings": [LearnedEmbedding(EXAMPLE_TOKEN, vectors)]}

    def save_parts(self, folder: Path) -> None:
        (folder / EMBEDDINGS_FOLDER).mkdir(exist_ok=True)
        tokens = {}
        for number, embedding in enumerate(self.embeddings):
            name = f"{number:02d}.safetensors"
            write_embedding(embedding, folder / EMBEDDINGS_FOLDER / name, getattr(self, "embedding_format", None))
            tokens[name] = embedding.token
        (folder / EMBEDDINGS_FOLDER / TOKENS_FILE).write_text(json.dumps(tokens, indent=2) + "\n")

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        tokens_file = folder / EMBEDDINGS_FOLDER / TOKENS_FILE
        tokens = json.loads(tokens_file.read_text()) if tokens_file.is_file() else {}
        files = sorted((folder / EMBEDDINGS_FOLDER).glob("*.safetensors"))
        files = [path for path in files if path.stem.isdigit()]  # an SDXL pair's second file is read with its first
        return {"embeddings": [read_embedding(path, tokens.get(path.name)) for path in files]}


@register_conditioner("clip-embeddings")
class EmbeddingsConditioner(LearnedTokens, CLIPConditioner):
    """SD and SDXL: a CLIPConditioner that carries its learned tokens. On an SD3 or Flux pipeline,
    `from_pipeline` gives that family's unit (SD3EmbeddingsConditioner, FluxEmbeddingsConditioner)."""

    @classmethod
    def from_pipeline(cls, pipe: Any, embeddings: Sequence[LearnedEmbedding | str | os.PathLike] = (),
                      **options: Any) -> Conditioner:
        if cls is EmbeddingsConditioner and getattr(pipe, "transformer", None) is not None:
            family = transformer_family(pipe)
            if family is None:
                raise ValueError(
                    f"clip-embeddings serves SD, SDXL, SD3 and Flux pipelines; {type(pipe).__name__} has neither SD3's "
                    "text encoders (CLIP-L, CLIP-G, T5) nor Flux's (CLIP-L, T5)"
                )
            return TRANSFORMER_UNITS[family].from_pipeline(pipe, embeddings, **options)
        return super().from_pipeline(pipe, embeddings, **options)


class SD3EmbeddingsConditioner(LearnedTokens, SD3CLIPConditioner):
    """SD3: SD3CLIPConditioner carrying its learned tokens (rows in CLIP-L, CLIP-G and T5)."""


class FluxEmbeddingsConditioner(LearnedTokens, FluxCLIPConditioner):
    """Flux: FluxCLIPConditioner carrying its learned tokens (rows in CLIP-L and T5)."""


TRANSFORMER_UNITS: dict[str, type[Conditioner]] = {"sd3": SD3EmbeddingsConditioner, "flux": FluxEmbeddingsConditioner}


def with_learned_tokens(conditioner: Conditioner, embeddings: Sequence[LearnedEmbedding]) -> Conditioner:
    """`conditioner` (a CLIP, SD3 or Flux CLIP conditioner whose encoders already hold `embeddings`) as a
    clip-embeddings unit on the same encoders and options: what a textual-inversion run saves."""
    if isinstance(conditioner, SD3CLIPConditioner):
        return SD3EmbeddingsConditioner(
            conditioner.clip, conditioner.t5_tokenizer, conditioner.t5_encoder, conditioner.t5_width,
            max_sequence_length=conditioner.max_sequence_length, t5_weighting=conditioner.t5_weighting, embeddings=embeddings,
        )
    if isinstance(conditioner, FluxCLIPConditioner):
        return FluxEmbeddingsConditioner(conditioner.clip_tokenizer, conditioner.clip_encoder, conditioner.t5_tokenizer,
                                         conditioner.t5_encoder, embeddings=embeddings, **conditioner.config)
    if isinstance(conditioner, CLIPConditioner):
        return EmbeddingsConditioner(conditioner.tokenizers, conditioner.text_encoders, embeddings=embeddings,
                                     **conditioner.config)
    raise TypeError(f"learned tokens are saved with a CLIP, SD3 or Flux CLIP conditioner, got {type(conditioner).__name__}")


def holds_embedding(pipe: Any, embedding: LearnedEmbedding) -> bool:
    """Whether every text encoder of `pipe` already holds `embedding`'s token with exactly its vectors."""
    try:
        held = extract_embedding(pipe, embedding.token)
    except ValueError:  # the token (or one of its "_1", … entries) is missing somewhere
        return False
    return len(held.vectors) == len(embedding.vectors) and all(
        have.shape == want.shape and torch.equal(have, want.to(have.device, have.dtype))
        for have, want in zip(held.vectors, embedding.vectors)
    )
