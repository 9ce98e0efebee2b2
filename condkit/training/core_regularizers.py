"""CoRe's two context regularizers (arXiv 2408.15914): the concept should leave its context as its category does.

A regularization template such as "a {} in the jungle" is filled twice: with the placeholder
("a <c> in the jungle") and with the category word ("a dog in the jungle"). Only the *context*
tokens are compared — start-of-text, the template's own words and end-of-text — never the concept
tokens themselves and never padding.

- Embedding regularization: mean over context tokens of 1 − cos(E(y*)_i, E(y_cat)_i), where E is
  each text encoder's last hidden state and the cosine is taken per token over the feature axis;
  SDXL averages its two encoders.
- Attention regularization: the UNet runs on the same noisy latents and timesteps with both
  prompts; every cross-attention layer reports the attention each text token receives, averaged
  over heads and image positions (see `attention_probe`); the loss is the mean squared difference
  over (layer, sample, context token).

Token alignment: the placeholder may expand to n vectors ("<c> <c>_1 <c>_2") while the category
word may be one or several tokens ("teddy bear"), so context tokens sit at different positions
in the two prompts. `align_context` walks the placeholder prompt, replaces each occurrence of the
placeholder's tokens by the category word's tokens, and records where every context token lands.
The result must equal the category prompt's real tokenization; if a tokenizer merges the category
word with its neighbours the template is refused instead of comparing mismatched tokens.

The category branch carries no gradient (nothing trainable enters it); only the placeholder branch
does, through the new token rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from condkit.conditioning.chunking import chunk_prompt
from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.embeddings import expand_prompt
from condkit.training.attention_probe import probe_cross_attention
from condkit.training.unet_call import predict

SLOT = "{}"


@dataclass(frozen=True)
class ContextAlignment:
    """Positions of the same context tokens in the placeholder prompt and in the category prompt."""

    placeholder_positions: torch.Tensor
    category_positions: torch.Tensor


@dataclass
class RegularizationLosses:
    """Unweighted regularizer values (scalars); `weighted` gives CoRe's extra loss term."""

    embedding: torch.Tensor
    attention: torch.Tensor

    def weighted(self, lambda_embedding: float, lambda_attention: float) -> torch.Tensor:
        return lambda_embedding * self.embedding + lambda_attention * self.attention


def align_context(
    placeholder_ids: Sequence[int],
    category_ids: Sequence[int],
    concept_ids: Sequence[int],
    category_word_ids: Sequence[int],
    eos_token_id: int,
) -> ContextAlignment:
    """Match the context tokens (BOS … EOS, concept tokens left out) of two tokenized prompts; see the module doc.

    concept_ids are the placeholder's tokens in order; an occurrence starts at concept_ids[0].
    """
    placeholder_ids, category_ids = list(placeholder_ids), list(category_ids)
    placeholder_end = _end_of_text(placeholder_ids, eos_token_id)
    concept = set(concept_ids)
    expected: list[int] = []
    placeholder_positions, category_positions = [], []
    for position, token in enumerate(placeholder_ids[: placeholder_end + 1]):
        if token in concept:
            if token == concept_ids[0]:
                expected.extend(category_word_ids)
            continue
        placeholder_positions.append(position)
        category_positions.append(len(expected))
        expected.append(token)
    if len(placeholder_positions) == placeholder_end + 1:
        raise ValueError(f"the prompt holds none of the placeholder's tokens {list(concept_ids)}; expected at least one")
    category_end = _end_of_text(category_ids, eos_token_id)
    if expected != category_ids[: category_end + 1]:
        raise ValueError(
            f"the category prompt tokenizes to {category_ids[: category_end + 1]}, expected {expected} (the placeholder "
            "prompt with the category word's tokens in place); the tokenizer merges the word with its neighbours"
        )
    return ContextAlignment(torch.tensor(placeholder_positions), torch.tensor(category_positions))


def _end_of_text(ids: list[int], eos_token_id: int) -> int:
    try:
        return ids.index(eos_token_id, 1)
    except ValueError:
        raise ValueError(f"token ids {ids[:8]}… have no end-of-text token {eos_token_id}") from None


class ContextRegularizer:
    """CoRe's regularizers for one placeholder and its category word, on a conditioner's encoders.

    The placeholder must already be a token of every tokenizer (a TextualInversion method adds it;
    so does `condkit.conditioning.embeddings.load_embedding`).
    """

    def __init__(self, conditioner: CLIPConditioner, placeholder: str, category: str) -> None:
        self.conditioner = conditioner
        self.placeholder, self.category = placeholder, category
        self.concept_ids, self.category_word_ids = [], []
        for index, tokenizer in enumerate(conditioner.tokenizers, start=1):
            if placeholder not in tokenizer.get_vocab():
                raise ValueError(f"placeholder {placeholder!r} is not a token of tokenizer {index}; add it first")
            word_ids = tokenizer(category, add_special_tokens=False).input_ids
            if not category.strip() or not word_ids:
                raise ValueError(f"category word {category!r} gives no tokens; expected a word such as 'dog'")
            self.concept_ids.append(tokenizer(expand_prompt(placeholder, tokenizer), add_special_tokens=False).input_ids)
            self.category_word_ids.append(word_ids)

    def prompts(self, template: str) -> tuple[str, str]:
        """The template filled with the placeholder, and with the category word."""
        if SLOT not in template:
            raise ValueError(f"regularization template {template!r} has no {SLOT!r} slot for the concept")
        return template.replace(SLOT, self.placeholder), template.replace(SLOT, self.category)

    def losses(
        self,
        unet: nn.Module,
        template: str,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        image_size: tuple[int, int],
        *,
        embedding: bool = True,
        attention: bool = True,
    ) -> RegularizationLosses:
        """Both regularizers on one template; one switched off is not computed and reported as 0.
        `image_size` is the pixel size of the noisy latents (SDXL's time ids)."""
        zero = torch.zeros((), device=noisy_latents.device)
        return RegularizationLosses(
            self.embedding_loss(template) if embedding else zero,
            self.attention_loss(unet, template, noisy_latents, timesteps, image_size) if attention else zero,
        )

    def embedding_loss(self, template: str) -> torch.Tensor:
        """Mean over context tokens (and encoders) of 1 − cosine similarity of the last hidden states."""
        placeholder_prompt, category_prompt = self.prompts(template)
        per_encoder = []
        for index, encoder in enumerate(self.conditioner.text_encoders):
            alignment, placeholder_ids, category_ids = self._aligned_ids(index, placeholder_prompt, category_prompt)
            placeholder_states = encoder(placeholder_ids.to(encoder.device)).last_hidden_state[0]
            with torch.no_grad():
                category_states = encoder(category_ids.to(encoder.device)).last_hidden_state[0]
            similarity = F.cosine_similarity(
                placeholder_states[alignment.placeholder_positions].float(),
                category_states[alignment.category_positions].float(),
                dim=-1,
            )
            per_encoder.append((1.0 - similarity).mean())
        return torch.stack(per_encoder).mean()

    def attention_loss(
        self, unet: nn.Module, template: str, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
        image_size: tuple[int, int],
    ) -> torch.Tensor:
        """MSE over (layer, sample, context token) between the per-token cross-attention of both prompts."""
        placeholder_prompt, category_prompt = self.prompts(template)
        # The UNet sees one token axis for all encoders (SDXL concatenates features), laid out as encoder 1's.
        alignment, _, _ = self._aligned_ids(0, placeholder_prompt, category_prompt)
        with torch.no_grad():
            category_attention = self.token_attention(unet, category_prompt, noisy_latents, timesteps, image_size)
        placeholder_attention = self.token_attention(unet, placeholder_prompt, noisy_latents, timesteps, image_size)
        return F.mse_loss(
            placeholder_attention[..., alignment.placeholder_positions.to(placeholder_attention.device)],
            category_attention[..., alignment.category_positions.to(category_attention.device)],
        )

    def token_attention(
        self, unet: nn.Module, prompt: str, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
        image_size: tuple[int, int],
    ) -> torch.Tensor:
        """(cross-attention layers, batch, tokens): attention each token of `prompt` receives, per layer."""
        hidden, pooled = self.conditioner.denoiser_inputs([prompt], timesteps[:1])
        batch = noisy_latents.shape[0]
        pooled = None if pooled is None else pooled.expand(batch, -1)
        with probe_cross_attention(unet) as probe:
            predict(unet, noisy_latents, timesteps, hidden.expand(batch, -1, -1), pooled, image_size)
            return probe.take()

    def _aligned_ids(
        self, encoder_index: int, placeholder_prompt: str, category_prompt: str
    ) -> tuple[ContextAlignment, torch.Tensor, torch.Tensor]:
        tokenizer = self.conditioner.tokenizers[encoder_index]
        placeholder_ids = self._single_window_ids(tokenizer, placeholder_prompt)
        category_ids = self._single_window_ids(tokenizer, category_prompt)
        try:
            alignment = align_context(
                placeholder_ids[0].tolist(), category_ids[0].tolist(), self.concept_ids[encoder_index],
                self.category_word_ids[encoder_index], tokenizer.eos_token_id,
            )  # fmt: skip
        except ValueError as error:
            raise ValueError(f"cannot align {placeholder_prompt!r} with {category_prompt!r}: {error}") from None
        return alignment, placeholder_ids, category_ids

    def _single_window_ids(self, tokenizer: Any, prompt: str) -> torch.Tensor:
        """(1, window) ids exactly as the conditioner tokenizes the prompt (multi-vector tokens expanded)."""
        chunks = chunk_prompt(tokenizer, expand_prompt(prompt, tokenizer), self.conditioner.window)
        if chunks.n_chunks != 1:
            raise ValueError(
                f"regularization prompt {prompt!r} needs {chunks.n_chunks} windows of {self.conditioner.window} tokens; "
                "expected a prompt that fits one"
            )
        return chunks.input_ids
