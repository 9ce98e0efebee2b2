"""Textual inversion: learn the embedding rows of new placeholder token(s), nothing else.

Only the new rows are parameters (a `NewTokenEmbedding` stands in for each encoder's token
table), so the optimizer keeps state for n_vectors × dim values instead of the whole vocabulary
— adaptive optimizers are safe, and there is no copy-back of the original rows after each step.
Prompts are encoded by the CLIPConditioner handed to the loop, the one used at inference, so SD and
SDXL (both encoders, pooled output and time ids) train through one code path, and so do SD3 (CLIP-L, CLIP-G
and T5) and Flux (CLIP-L and T5) with load_conditioner("clip", pipe) and the pipeline's transformer, whose
flow-matching scheduler gives the objective (see `flow_matching`):

    conditioner = CLIPConditioner.from_pipeline(pipe)
    method = TextualInversion(conditioner, "<toy>", "teddy")
    train(method, pipe.unet, pipe.vae, pipe.scheduler, images, config, conditioner=conditioner)

Prompts: an image whose caption contains the placeholder (as the tokenizer reads it: "<toy>" in
"a photo of <toy> on a beach") is trained on that caption as written (a multi-vector placeholder
is expanded by the conditioner, as at inference). Every other image — no caption, or a caption
without the placeholder, which could not train the new rows — gets a template ("a photo of <toy>"),
drawn from (seed, step, image index) so a resumed run draws the same; captions without the
placeholder are logged once as a warning. `uses_caption(caption)` says which rule applies, e.g. to
count a dataset's captions before training. Load folders or datasets with captions through
`condkit.training.data` (`folder_dataset(path, caption_required=False)`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.embedding_formats import LearnedEmbedding, write_embedding
from condkit.conditioning.embeddings import existing_token
from condkit.training.method import TrainingBatch, TrainingMethod

OBJECT_TEMPLATES = (
    "a photo of {}", "a picture of {}", "an image of {}", "a rendering of {}", "{}",
    "a drawing of {}", "a close view of {}", "a small {}", "a large {}", "a clean picture of {}",
    "a simple image of {}", "one {}", "a centred {}", "a view of {}", "a scene with {}",
    "a plain picture with {}", "a bright image of {}", "a sharp picture of {}", "a flat drawing of {}",
    "an illustration of {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a picture in the style of {}", "an image in the style of {}",
    "a drawing in the style of {}", "art in the style of {}", "a rendering in the style of {}",
    "a scene in the style of {}", "a simple picture in the style of {}", "a bright image in the style of {}",
    "a flat illustration in the style of {}", "a sketch in the style of {}", "a poster in the style of {}",
)
TEMPLATE_SETS = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

logger = logging.getLogger(__name__)


class NewTokenEmbedding(nn.Module):
    """A token table: the frozen original rows plus trainable rows for ids ≥ the original size."""

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.first_new_id = base.num_embeddings
        self.new_rows = nn.Parameter(new_rows.clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.new_rows])

    @property
    def num_embeddings(self) -> int:
        return self.first_new_id + self.new_rows.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.first_new_id
        base = self.base(ids.clamp(max=self.first_new_id - 1))
        new = self.new_rows[(ids - self.first_new_id).clamp(min=0, max=self.new_rows.shape[0] - 1)]
        return torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)


def token_encoder_pairs(conditioner: Any) -> list[tuple[Any, nn.Module]]:
    """The (tokenizer, text encoder) pairs whose tables get the new rows: a CLIPConditioner's (SD: one, SDXL: two),
    SD3's CLIP-L, CLIP-G and T5, Flux's CLIP-L and T5 (their conditioners' `token_encoders()`)."""
    if callable(getattr(conditioner, "token_encoders", None)):
        return conditioner.token_encoders()
    if isinstance(conditioner, CLIPConditioner):
        return list(zip(conditioner.tokenizers, conditioner.text_encoders))
    raise TypeError(
        f"textual inversion trains rows of the text encoders of a CLIP, SD3 or Flux conditioner, got {type(conditioner).__name__}"
    )


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """"<c>" with 3 vectors → ["<c>", "<c>_1", "<c>_2"], diffusers' multi-vector convention."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def initializer_vector(tokenizer: Any, encoder: nn.Module, initializer: str) -> torch.Tensor:
    """The embedding of the initializer word; a word that splits into several tokens is averaged."""
    ids = tokenizer(initializer, add_special_tokens=False).input_ids
    unknown = tokenizer.unk_token_id
    if not initializer.strip() or not ids or (unknown is not None and unknown in ids and unknown != tokenizer.eos_token_id):
        raise ValueError(f"initializer word {initializer!r} is unknown to the tokenizer; pick a word it knows")
    table = encoder.get_input_embeddings().weight
    return table[ids].detach().float().mean(dim=0)


class TextualInversion(TrainingMethod):
    """Train `num_vectors` new rows per encoder for `placeholder`; everything else frozen.

    Installs the placeholder in the conditioner's tokenizer(s) and a NewTokenEmbedding in its text
    encoder(s) — for CLIPConditioner.from_pipeline(pipe), the pipeline's own — so the pipeline itself
    can render validation images during training.
    """

    def __init__(
        self,
        conditioner: CLIPConditioner,
        placeholder: str,
        initializer: str,
        num_vectors: int = 1,
        templates: str = "object",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be a positive integer, got {num_vectors}")
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; expected one of {', '.join(TEMPLATE_SETS)}")
        pairs = token_encoder_pairs(conditioner)
        self.placeholder, self.initializer, self.num_vectors = placeholder, initializer, num_vectors
        self.template_set, self.seed = templates, seed
        self.tokens = placeholder_tokens(placeholder, num_vectors)
        self.is_sdxl = getattr(conditioner, "is_sdxl", False)
        self.embedding_format = getattr(conditioner, "embedding_format", None)  # SD3's / Flux's single-file layout
        if not placeholder.strip() or placeholder != placeholder.strip() or any(char.isspace() for char in placeholder):
            raise ValueError(f"placeholder {placeholder!r} must be one word with no spaces, e.g. '<my-thing>'")
        for tokenizer, _ in pairs:
            for token in self.tokens:
                existing = existing_token(tokenizer, token)
                if existing is not None:
                    raise ValueError(
                        f"placeholder token {token!r} is already in the tokenizer's vocabulary (as {existing!r}); "
                        "choose a new one, e.g. '<my-thing>'"
                    )
        self.embeddings = nn.ModuleList()
        self._tokenizer = pairs[0][0]  # finds the placeholder in captions (uses_caption)
        self._caption_uses: dict[str, bool] = {}
        self._warned_unused_caption = False
        for tokenizer, encoder in pairs:
            rows = initializer_vector(tokenizer, encoder, initializer).repeat(num_vectors, 1)
            encoder.requires_grad_(False)
            if len(tokenizer) < encoder.get_input_embeddings().num_embeddings:
                # T5's table has rows no token of its tokenizer reaches (32128 for 32100 tokens): drop them, so the
                # new tokens' ids continue the table as NewTokenEmbedding expects; no text encodes differently
                encoder.resize_token_embeddings(len(tokenizer))
            table = NewTokenEmbedding(encoder.get_input_embeddings(), rows)
            tokenizer.add_tokens(self.tokens)
            encoder.set_input_embeddings(table)
            self.embeddings.append(table)

    def settings(self) -> dict[str, Any]:
        return {"placeholder": self.placeholder, "initializer": self.initializer, "num_vectors": self.num_vectors,
                "templates": self.template_set, "sdxl": self.is_sdxl}

    def expanded_placeholder(self) -> str:
        return " ".join(self.tokens)

    def uses_caption(self, caption: str | None) -> bool:
        """True when `caption` contains the placeholder token, so an image with it trains on it as written."""
        if not caption:
            return False
        if caption not in self._caption_uses:
            placeholder_id = self._tokenizer.convert_tokens_to_ids(self.placeholder)
            ids = self._tokenizer(caption, add_special_tokens=False, verbose=False).input_ids
            self._caption_uses[caption] = placeholder_id in ids
        return self._caption_uses[caption]

    def prompts_for(self, batch: TrainingBatch) -> list[str]:
        """Each image's caption if it contains the placeholder, else a template drawn from (seed, step, image index)."""
        templates = TEMPLATE_SETS[self.template_set]
        chosen = []
        for position, index in enumerate(batch.indices.tolist()):
            caption = batch.captions[position] if position < len(batch.captions) else ""
            if self.uses_caption(caption):
                chosen.append(caption)
                continue
            if caption and not self._warned_unused_caption:
                self._warned_unused_caption = True
                logger.warning(
                    "captions without the placeholder %r are not used (first: %r); those images train on the templates",
                    self.placeholder, caption[:80],
                )
            rng = np.random.default_rng([self.seed, batch.step, index])
            chosen.append(templates[rng.integers(len(templates))].format(self.expanded_placeholder()))
        return chosen

    def learned_vectors(self) -> list[torch.Tensor]:
        """(num_vectors, dim) per encoder, detached, float32."""
        return [table.new_rows.detach().float().cpu().clone() for table in self.embeddings]

    def learned_embedding(self, step: int | None = None) -> LearnedEmbedding:
        return LearnedEmbedding(self.placeholder, self.learned_vectors(), step=step)

    def save_embedding(self, path: str, format: str | None = None, step: int | None = None, overwrite: bool = False):
        """Write the learned token in any format of `embedding_formats` (default: diffusers / SDXL single file)."""
        return write_embedding(self.learned_embedding(step), path, format or self.embedding_format, overwrite=overwrite)

