"""Prompts whose conditioning changes during sampling: A1111 prompt editing, alternation and AND.

A CLIP-family conditioner's `encode()` gives a prompt with such syntax (see `prompt_schedule`) as
features: each row holds its request — the prompt, negative prompt and per-encoder prompts, as
ASCII JSON, one byte per value, which float16 and bfloat16 carry exactly — behind a marker and its
role (+1 positive, -1 negative). The features travel through the pipeline like embeddings (repeated
per image, concatenated for CFG), so the hooks that `attach` puts on the denoisers need no state to
find, at every step, what each row asks for: `conditioning_at_step` reads the requests, takes each
prompt's text at that step and encodes them with the conditioner's static path. At step k the
denoiser thus receives exactly `encode(prompts at step k, negatives at step k)`.

`AND` (composable diffusion) needs one denoiser row per sub-prompt: then the result is a
`ComposedRows`, which tells the hooks how to expand the denoiser's inputs and how to combine its
outputs back, each positive row into ε_uncond + Σ wᵢ (εᵢ − ε_uncond). The pipeline's guidance then
gives A1111's ε_uncond + g Σ wᵢ (εᵢ − ε_uncond). This needs the CFG layout [negatives, positives].
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from condkit.conditioning.base import Conditioning, as_negative_list, as_prompt_list
from condkit.conditioning.features import plain
from condkit.conditioning.chunking import prompt_runs
from condkit.conditioning.prompt_schedule import (
    check_schedule, is_composable, needs_steps, prompt_at_step, prompt_table, split_subprompts,
)

_MARKER = (61.0, -29.0)  # two values no text encoder puts at the start of a row by chance; exact in bfloat16
POSITIVE, NEGATIVE = 1.0, -1.0
_HEADER = len(_MARKER) + 1
_CHECKED_STEPS = 100  # the step count whose schedule encode() checks every text of
_DENOISING_STEP: ContextVar[tuple[int, int] | None] = ContextVar("condkit_denoising_step", default=None)


@contextmanager
def denoising_step_context(step: tuple[int, int] | None) -> Iterator[None]:
    """Within the block, `at_timestep` calls place scheduled prompts at `step` = (k, N); attach sets it per call."""
    token = _DENOISING_STEP.set(step)
    try:
        yield
    finally:
        _DENOISING_STEP.reset(token)


@dataclass(frozen=True)
class Request:
    """What one encode() row asks for; the negative side is None when omitted."""

    prompt: str
    negative_prompt: str | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None

    @property
    def composable(self) -> bool:
        return is_composable(self.prompt)

    def subprompts(self, step: int, steps: int) -> list[tuple[str, float]]:
        """(text at `step`, weight) of each sub-prompt; the whole prompt, weight 1, without AND or weight."""
        if not self.composable:
            return [(prompt_at_step(self.prompt, step, steps), 1.0)]
        return [(prompt_at_step(part.text, step, steps), part.weight) for part in split_subprompts(self.prompt)]

    def texts(self) -> list[str]:
        texts = [part.text for part in split_subprompts(self.prompt)] if self.composable else [self.prompt]
        return texts + [text for text in (self.negative_prompt, self.prompt_2, self.negative_prompt_2) if text is not None]


@dataclass
class ComposedRows:
    """Denoiser inputs with one row per sub-prompt, and how to fold the outputs back.

    hidden, pooled: the denoiser's encoder_hidden_states (and pooled vector) rows.
    source_rows: for each of those rows, the pipeline row whose other inputs (latents, timestep, time ids) it takes.
    combination: for each pipeline row, (base, ((row, weight), ...)): output = out[base] + Σ weight·(out[row] − out[base]).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None
    source_rows: list[int]
    combination: list[tuple[int, tuple[tuple[int, float], ...]]]


def uses_steps(prompts: list[str], negatives: list[str] | None, *others: list[str] | None) -> bool:
    """Whether any prompt needs per-step conditioning (negative and per-encoder prompts: schedules only)."""
    if any(needs_steps(prompt) for prompt in prompts):
        return True
    return any(needs_steps(text, positive=False) for group in (negatives, *others) if group for text in group)


def scheduled_conditioning(
    conditioner: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None,
    num_images_per_prompt: int,
    prompt_2: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
) -> Conditioning | None:
    """Features for prompts that schedule or compose, or None when none does (then encode statically)."""
    prompts = as_prompt_list(prompt)
    negatives = as_negative_list(negative_prompt, len(prompts))
    prompts_2 = as_negative_list(prompt_2, len(prompts), "prompt_2")
    negatives_2 = as_negative_list(negative_prompt_2, len(prompts), "negative_prompt_2")
    if not uses_steps(prompts, negatives, prompts_2, negatives_2):
        return None
    requests = [
        Request(p, n, p2, n2)
        for p, n, p2, n2 in zip(prompts, negatives or [None] * len(prompts), prompts_2 or [None] * len(prompts),
                                negatives_2 or [None] * len(prompts))
    ]  # fmt: skip
    parse_emphasis = conditioner.emphasis != "none"
    for request in requests:
        if request.composable and request.prompt_2 is not None:
            raise ValueError(f"prompt_2 cannot be combined with AND or a trailing ':weight' in {request.prompt[:80]!r}")
        for text in request.texts():
            check_schedule(text)
            for variant in dict.fromkeys(prompt_table(text, _CHECKED_STEPS)):  # refuse bad weights before sampling
                prompt_runs(variant, parse_emphasis=parse_emphasis)
    width = sum(encoder.config.hidden_size for encoder in conditioner.text_encoders)
    dtype = conditioner.text_encoders[-1].dtype
    positive = _pack(requests, POSITIVE, width, dtype).repeat_interleave(num_images_per_prompt, dim=0)
    negative = _pack(requests, NEGATIVE, width, dtype).repeat_interleave(num_images_per_prompt, dim=0)
    pooled = None
    if conditioner.is_sdxl:  # placeholders of the right shape; the hooks put each step's pooled vector in
        pooled = torch.zeros(positive.shape[0], conditioner.text_encoders[-1].config.projection_dim, dtype=dtype)
    device = conditioner.text_encoders[-1].device
    return Conditioning(
        prompt_embeds=positive.to(device),
        negative_prompt_embeds=negative.to(device),
        pooled_prompt_embeds=None if pooled is None else pooled.to(device),
        negative_pooled_prompt_embeds=None if pooled is None else pooled.to(device),
        needs_attach=True,
    )


def _pack(requests: list[Request], role: float, width: int, dtype: torch.dtype) -> torch.Tensor:
    encoded = [json.dumps([r.prompt, r.negative_prompt, r.prompt_2, r.negative_prompt_2]).encode("ascii") for r in requests]
    tokens = math.ceil((_HEADER + max(len(data) for data in encoded) + 1) / width)
    rows = torch.zeros(len(requests), tokens * width)
    for row, data in zip(rows, encoded):
        row[: len(_MARKER)] = torch.tensor(_MARKER)
        row[len(_MARKER)] = role
        row[_HEADER : _HEADER + len(data)] = torch.tensor(list(data), dtype=torch.float32)
    return rows.view(len(requests), tokens, width).to(dtype)


def is_scheduled(features: torch.Tensor) -> bool:
    """Whether these are the features `scheduled_conditioning` makes (rows of requests)."""
    features = plain(features)
    if features.ndim != 3 or features.shape[0] == 0 or features.shape[1] * features.shape[2] < _HEADER:
        return False
    head = features.reshape(features.shape[0], -1)[:, : len(_MARKER)].float().cpu()
    return bool((head == torch.tensor(_MARKER)).all())


def read_rows(features: torch.Tensor) -> list[tuple[float, Request]]:
    """(role, request) of each row of scheduled features."""
    values = plain(features).reshape(features.shape[0], -1).float().cpu()
    rows = []
    for row in values:
        end = int((row[_HEADER:] == 0).nonzero()[0]) + _HEADER
        data = bytes(int(value) for value in row[_HEADER:end].tolist())
        rows.append((float(row[len(_MARKER)]), Request(*json.loads(data.decode("ascii")))))
    return rows


def conditioning_at_step(
    conditioner: Any, features: torch.Tensor, step: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor | None] | ComposedRows:
    """What the denoiser receives at `step` = (k, N), the k-th (1-based) of N denoising steps, for these rows;
    None: the step `denoising_step_context` set.

    Without AND: (encoder_hidden_states, pooled or None), each row `encode(prompt at k, negative at k)`.
    With AND: a ComposedRows with one positive row per sub-prompt.
    """
    step = step if step is not None else _DENOISING_STEP.get()
    if step is None:
        raise ValueError(
            "prompts with A1111 prompt editing, alternation or AND need the denoising step: run the pipeline inside "
            "`with condkit.attach(pipe, conditioner):` (a timestep that is not one of the scheduler's cannot be placed)"
        )
    current, steps = step
    rows = read_rows(features)
    requests = list(dict.fromkeys(request for _, request in rows))
    for request in requests:
        for text in request.texts():
            check_schedule(text, steps)
    parts = [request.subprompts(current, steps) for request in requests]
    first_row = [sum(len(p) for p in parts[:index]) for index in range(len(parts))]
    texts = [text for part in parts for text, _ in part]
    repeated = [request for request, part in zip(requests, parts) for _ in part]

    def at_step(values: list[str | None]) -> list[str] | None:
        if all(value is None for value in values):
            return None
        return [prompt_at_step(value or "", current, steps) for value in values]

    negatives = at_step([r.negative_prompt for r in repeated])
    negatives_2 = at_step([r.negative_prompt_2 for r in repeated])
    prompts_2 = at_step([r.prompt_2 for r in repeated])
    if prompts_2 is not None:
        prompts_2 = [text if r.prompt_2 is None else second for text, r, second in zip(texts, repeated, prompts_2)]
    with torch.no_grad():
        encoded = conditioner.embed(texts, negatives, 1, prompt_2=prompts_2, negative_prompt_2=negatives_2)

    def row_of(role: float, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if role == NEGATIVE:
            pooled = encoded.negative_pooled_prompt_embeds
            return encoded.negative_prompt_embeds[index], None if pooled is None else pooled[index]
        pooled = encoded.pooled_prompt_embeds
        return encoded.prompt_embeds[index], None if pooled is None else pooled[index]

    composing = any(role == POSITIVE and request.composable for role, request in rows)
    if not composing:
        chosen = [row_of(role, first_row[requests.index(request)]) for role, request in rows]
        return _stack(chosen)
    return _compose(rows, requests, parts, first_row, row_of)


def _stack(chosen: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = torch.stack([h for h, _ in chosen])
    pooled = None if chosen[0][1] is None else torch.stack([p for _, p in chosen])
    return hidden, pooled


def _compose(rows, requests, parts, first_row, row_of) -> ComposedRows:
    half = len(rows) // 2
    layout_ok = len(rows) % 2 == 0 and all(
        rows[index][0] == NEGATIVE and rows[index + half][0] == POSITIVE and rows[index][1] == rows[index + half][1]
        for index in range(half)
    )
    if not layout_ok:
        raise ValueError(
            "AND (or a trailing ':weight') needs classifier-free guidance: run with guidance_scale > 1 and the "
            "negative prompt embeddings from the same encode()"
        )
    chosen, source_rows, combination = [], [], []
    for index, (role, request) in enumerate(rows):  # the negative rows first: their outputs are the bases
        position = requests.index(request)
        if role == NEGATIVE or not request.composable:  # a row of its own, passed through as it comes out
            chosen.append(row_of(role, first_row[position]))
            source_rows.append(index)
            combination.append((len(chosen) - 1, ()))
            continue
        base = index - half  # the unconditional row of the same image (same latents)
        terms = []
        for offset, (_, weight) in enumerate(parts[position]):
            chosen.append(row_of(POSITIVE, first_row[position] + offset))
            source_rows.append(index)
            terms.append((len(chosen) - 1, weight))
        combination.append((combination[base][0], tuple(terms)))
    hidden, pooled = _stack(chosen)
    return ComposedRows(hidden, pooled, source_rows, combination)


def batch_key(conditioning: Conditioning) -> tuple[Request, ...] | None:
    """The requests behind scheduled features, or None for any other Conditioning.

    Two requests in one pipeline call are encoded together at every step, so a prompt would be padded
    to its batch-mate's length wherever their texts differ in length; batching only equal requests
    keeps an image independent of its batch-mates.
    """
    embeds = conditioning.prompt_embeds
    if not conditioning.needs_attach or not is_scheduled(embeds):
        return None
    return tuple(request for _, request in read_rows(embeds))
