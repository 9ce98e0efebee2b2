"""CLIP conditioning plus learned textual-inversion tokens, saved and loaded as one unit.

    conditioner = load_conditioner("runs/toy", pipe)     # RUN/conditioner from `condkit train textual-inversion`
    conditioner.encode("a photo of <toy> on a beach")

`condkit train textual-inversion` and `condkit train core` save their result as this conditioner,
so `condkit generate --conditioner RUN_DIR` needs no `--embedding` flag. On load the tokens are
added to the pipeline's tokenizer(s) and text encoder(s) with `load_embedding` (as `--embedding`
does; a token already there is refused), then the pipeline's encoders are wrapped as by
CLIPConditioner. The embeddings are stored as embeddings/NN.safetensors in the default format of
`embedding_formats` (diffusers for SD, the single SDXL file for SDXL), readable by other tools too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.embedding_formats import LearnedEmbedding, read_embedding, write_embedding
from condkit.conditioning.embeddings import load_embedding
from condkit.conditioning.registry import register_conditioner

EMBEDDINGS_FOLDER = "embeddings"


@register_conditioner("clip-embeddings")
class EmbeddingsConditioner(CLIPConditioner):
    """A CLIPConditioner that carries the learned tokens its encoders hold (`embeddings`)."""

    def __init__(self, tokenizers: list[Any], text_encoders: list[Any], *,
                 embeddings: Sequence[LearnedEmbedding] = (), **options: Any) -> None:
        super().__init__(tokenizers, text_encoders, **options)
        self.embeddings = list(embeddings)

    @classmethod
    def from_pipeline(cls, pipe: Any, embeddings: Sequence[LearnedEmbedding | str | os.PathLike] = (),
                      **options: Any) -> EmbeddingsConditioner:
        """Load each embedding (a LearnedEmbedding or a file) into the pipeline, then wrap its encoders."""
        from condkit.conditioning.transformer_pipelines import transformer_family

        if transformer_family(pipe) is not None:
            raise ValueError(
                f"clip-embeddings (a textual-inversion run's unit) is for SD and SDXL pipelines, not {type(pipe).__name__}; "
                "load the embedding file with --embedding (condkit.load_embedding) and use the clip conditioner"
            )
        loaded = [item if isinstance(item, LearnedEmbedding) else read_embedding(item) for item in embeddings]
        for embedding in loaded:
            load_embedding(pipe, embedding)
        conditioner = super().from_pipeline(pipe, **options)
        conditioner.embeddings = loaded
        return conditioner

    def save_parts(self, folder: Path) -> None:
        (folder / EMBEDDINGS_FOLDER).mkdir(exist_ok=True)
        for number, embedding in enumerate(self.embeddings):
            write_embedding(embedding, folder / EMBEDDINGS_FOLDER / f"{number:02d}.safetensors")

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        files = sorted((folder / EMBEDDINGS_FOLDER).glob("*.safetensors"))
        files = [path for path in files if path.stem.isdigit()]  # an SDXL pair's second file is read with its first
        return {"embeddings": [read_embedding(path) for path in files]}
