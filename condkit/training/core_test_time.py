"""CoRe's test-time optimisation: refine a learned token for one prompt before generating with it.

    adjusted = test_time_optimize(method, pipe, "a <toy> on the beach")      # 10 steps, lr 5e-4
    load the result with condkit.conditioning.embeddings.load_embedding, or pass write_back=True

Only the two context regularizers run, with the target prompt as the one template (its
placeholder is the slot), so no images are needed. The attention branch still needs UNet inputs:
random latents and timesteps drawn from `seed`. Where the vectors come from is left untouched
unless `write_back=True`: while optimising, the encoders' token tables are wrapped by a module
that substitutes trainable copies of the placeholder's rows, and the wrapper is removed afterwards.
Gradients are taken for those copies only, so no `.grad` of the pipeline's modules is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.embedding_formats import LearnedEmbedding
from condkit.conditioning.embeddings import load_embedding
from condkit.training.core_regularizers import SLOT, ContextRegularizer
from condkit.training.textual_inversion import TextualInversion, placeholder_tokens


@dataclass
class CoReAdjustment:
    """The adjusted token, and the weighted regularization loss before and after on one fixed draw of latents."""

    embedding: LearnedEmbedding
    initial_loss: float
    final_loss: float


class TokenRowOverride(nn.Module):
    """A token table that returns `rows[k]` for token id `ids[k]` and the wrapped table's rows otherwise."""

    def __init__(self, table: nn.Module, ids: list[int], rows: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.register_buffer("ids", torch.tensor(ids, device=rows.device))
        self.rows = rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.table(input_ids).detach()
        matches = input_ids.unsqueeze(-1) == self.ids.to(input_ids.device)
        substitute = self.rows[matches.int().argmax(dim=-1)].to(base.dtype)
        return torch.where(matches.any(dim=-1, keepdim=True), substitute, base)


@contextmanager
def override_token_rows(conditioner: CLIPConditioner, tokens: list[str], rows: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, `tokens` embed as `rows[i]` in encoder i; the original tables are put back afterwards."""
    for index, tokenizer in enumerate(conditioner.tokenizers, start=1):
        missing = [token for token in tokens if token not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"token {missing[0]!r} is not in tokenizer {index}; expected all of {tokens}")
    originals = [encoder.get_input_embeddings() for encoder in conditioner.text_encoders]
    try:
        for tokenizer, encoder, table, encoder_rows in zip(conditioner.tokenizers, conditioner.text_encoders, originals, rows):
            encoder.set_input_embeddings(TokenRowOverride(table, tokenizer.convert_tokens_to_ids(tokens), encoder_rows))
        yield
    finally:
        for encoder, table in zip(conditioner.text_encoders, originals):
            encoder.set_input_embeddings(table)


def test_time_optimize(
    source: TextualInversion | LearnedEmbedding,
    pipe: Any,
    prompt: str,
    steps: int = 10,
    lr: float = 5e-4,
    *,
    category: str | None = None,
    lambda_embedding: float = 1.5e-4,
    lambda_attention: float = 0.05,
    batch_size: int = 1,
    latent_size: int | None = None,
    seed: int = 0,
    write_back: bool = False,
) -> CoReAdjustment:
    """Run `steps` Adam steps of CoRe's regularizers on `prompt` and return the adjusted token.

    source: a trained TextualInversion/CoRe method built on `pipe`, or a LearnedEmbedding (then
        `category` is required; the token is loaded into `pipe` if it is not there yet).
    prompt: contains the placeholder, e.g. "a <toy> on the beach"; it must fit one token window.
    category: the super-category word (default for a method: its initializer word).
    latent_size: latent height/width of the random UNet inputs (default: the UNet's sample_size).
    write_back: also store the adjusted vectors in the source (a method's rows, or the embedding's
        vectors and the pipeline's rows for its token).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    for name, value in (("lambda_embedding", lambda_embedding), ("lambda_attention", lambda_attention)):
        if not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value}")
    if lambda_embedding == 0 and lambda_attention == 0:
        raise ValueError("lambda_embedding and lambda_attention are both 0; expected at least one positive weight")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    placeholder, category, start_vectors, conditioner = _resolve_source(source, pipe, category)
    template = prompt_as_template(prompt, placeholder)
    regularizer = ContextRegularizer(conditioner, placeholder, category)
    tokens = placeholder_tokens(placeholder, start_vectors[0].shape[0])
    unet = pipe.unet
    device = unet.device
    rows = [nn.Parameter(vectors.detach().clone().float().to(device)) for vectors in start_vectors]
    optimizer = torch.optim.Adam(rows, lr=lr)
    draws = _RandomUNetInputs(unet, pipe.scheduler.config.num_train_timesteps, batch_size, latent_size, seed)
    evaluation_inputs = draws.next()

    def loss_on(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        image_size = (latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor)
        losses = regularizer.losses(unet, template, latents, timesteps, image_size,
                                    embedding=lambda_embedding > 0, attention=lambda_attention > 0)
        return losses.weighted(lambda_embedding, lambda_attention)

    with override_token_rows(conditioner, tokens, rows):
        with torch.no_grad():
            initial_loss = loss_on(*evaluation_inputs).item()
        for _ in range(steps):
            loss = loss_on(*draws.next())
            gradients = torch.autograd.grad(loss, rows)
            for row, gradient in zip(rows, gradients):
                row.grad = gradient
            optimizer.step()
        with torch.no_grad():
            final_loss = loss_on(*evaluation_inputs).item()

    adjusted = [row.detach().cpu().to(vectors.dtype) for row, vectors in zip(rows, start_vectors)]
    if write_back:
        _write_back(source, conditioner, tokens, adjusted)
    return CoReAdjustment(LearnedEmbedding(placeholder, adjusted), initial_loss, final_loss)


test_time_optimize.__test__ = False  # not a pytest test, whatever its name


def prompt_as_template(prompt: str, placeholder: str) -> str:
    """"a <c> on the beach" → "a {} on the beach" (an already expanded "<c> <c>_1" counts as one occurrence)."""
    occurrence = re.compile(re.escape(placeholder) + r"(?:\s+" + re.escape(placeholder) + r"_\d+)*(?![\w>])")
    template, count = occurrence.subn(SLOT, prompt)
    if count == 0:
        raise ValueError(f"prompt {prompt!r} does not contain the placeholder {placeholder!r}")
    return template


class _RandomUNetInputs:
    """Seeded random (latents, timesteps) pairs shaped for `unet`."""

    def __init__(self, unet: nn.Module, num_train_timesteps: int, batch_size: int, latent_size: int | None, seed: int):
        size = latent_size or unet.config.sample_size
        self.shape = (batch_size, unet.config.in_channels, size, size)
        self.num_train_timesteps = num_train_timesteps
        self.device, self.dtype = unet.device, unet.dtype
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        latents = torch.randn(self.shape, generator=self.generator)
        timesteps = torch.randint(self.num_train_timesteps, (self.shape[0],), generator=self.generator)
        return latents.to(self.device, self.dtype), timesteps.to(self.device)


def _resolve_source(
    source: TextualInversion | LearnedEmbedding, pipe: Any, category: str | None
) -> tuple[str, str, list[torch.Tensor], CLIPConditioner]:
    """(placeholder, category word, starting vectors per encoder, conditioner over pipe's encoders)."""
    if isinstance(source, TextualInversion):
        if source.embeddings[0] is not pipe.text_encoder.get_input_embeddings():
            raise ValueError("the method was built on another pipeline; pass the pipeline it trained with")
        return source.placeholder, category or source.initializer, source.learned_vectors(), CLIPConditioner.from_pipeline(pipe)
    if isinstance(source, LearnedEmbedding):
        if category is None:
            raise ValueError(f"category is required for embedding {source.token!r}; pass category='<its super-category word>'")
        conditioner = CLIPConditioner.from_pipeline(pipe)
        if source.token not in pipe.tokenizer.get_vocab():
            load_embedding(pipe, source)
        return source.token, category, [vectors.clone() for vectors in source.vectors], conditioner
    raise TypeError(f"source must be a TextualInversion method or a LearnedEmbedding, got {type(source).__name__}")


def _write_back(
    source: TextualInversion | LearnedEmbedding, conditioner: CLIPConditioner, tokens: list[str], adjusted: list[torch.Tensor]
) -> None:
    with torch.no_grad():
        if isinstance(source, TextualInversion):
            for table, vectors in zip(source.embeddings, adjusted):
                table.new_rows.copy_(vectors.to(table.new_rows.device, table.new_rows.dtype))
            return
        source.vectors = [vectors.clone() for vectors in adjusted]
        for tokenizer, encoder, vectors in zip(conditioner.tokenizers, conditioner.text_encoders, adjusted):
            weight = encoder.get_input_embeddings().weight
            ids = torch.tensor(tokenizer.convert_tokens_to_ids(tokens), device=weight.device)
            weight[ids] = vectors.to(weight.device, weight.dtype)
