"""A1111-syntax prompts on a T5 encoder: SD3's text_encoder_3 and Flux's text_encoder_2.

Tokens: the prompt is parsed into weighted runs (as for CLIP), each run tokenized without special
tokens, the tokens concatenated, cut to `max_sequence_length - 1`, closed with "</s>" and padded with
"<pad>" to `max_sequence_length` — the layout of the pipelines' own `tokenizer_3(prompt,
padding="max_length", truncation=True)`, so a prompt without syntax gets exactly their ids. With
several runs each run's text is stripped: a T5 tokenizer marks a word start ("▁") at the start of
every piece it is given, so "red(dish:1.2)" becomes two words. BREAK means nothing to T5 (it has no
windows) and is dropped. Tokens beyond max_sequence_length are dropped with a warning that counts them.

Weights (`T5_WEIGHTINGS`):
- "interpolate" (the default): a token of weight w gets e_empty + w · (e − e_empty), where e_empty
  is T5's state at the same position for the empty prompt (ComfyUI's rule for its token weights).
  Why not sd_embed's plain multiplication: both SD3's and Flux's transformers put the text tokens
  through a per-token LayerNorm (AdaLayerNormZero's norm1_context) after the context embedder, which
  divides a token's scale out again, so multiplying mostly changes a norm the first block discards.
  Moving the state along the direction that separates it from "no text" changes what the token
  says, which a LayerNorm keeps; weight 0 gives the empty prompt's state (the token is removed), not
  a zero vector the model never saw.
- "multiply": e · w, sd_embed's rule, for parity with prompts tuned on it.
Weights 1 leave the states bit for bit as the pipeline computes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from condkit.conditioning.chunking import prompt_runs
from condkit.conditioning.embeddings import expand_prompt

logger = logging.getLogger(__name__)

T5_WEIGHTINGS: tuple[str, ...] = ("interpolate", "multiply")
LONGEST_SEQUENCE = 512  # SD3's and Flux's pipelines refuse a longer max_sequence_length


def check_t5_options(max_sequence_length: int, t5_weighting: str) -> None:
    length = max_sequence_length
    if isinstance(length, bool) or not isinstance(length, int) or not 1 < length <= LONGEST_SEQUENCE:
        raise ValueError(f"max_sequence_length must be an integer from 2 to {LONGEST_SEQUENCE}, got {max_sequence_length!r}")
    if t5_weighting not in T5_WEIGHTINGS:
        raise ValueError(f"t5_weighting must be one of {', '.join(map(repr, T5_WEIGHTINGS))}, got {t5_weighting!r}")


def refuse_scheduled_prompts(*texts: list[str] | None) -> None:
    """SD3/Flux conditioning is static: refuse (one line) A1111 prompt editing, alternation and AND rather than
    read "[a:b:5]" as emphasis. `texts`: the prompt list, then any negatives or per-encoder prompts."""
    from condkit.conditioning.prompt_schedule import needs_steps

    for index, group in enumerate(texts):
        for text in group or ():
            if needs_steps(text, positive=index == 0):
                raise ValueError(
                    f"A1111 prompt editing, alternation and AND are not supported on SD3/Flux pipelines yet (they are on "
                    f"SD and SDXL); got {text[:80]!r}"
                )


@dataclass
class T5Tokens:
    """Token ids and weights of a batch of prompts: shape (batch, max_sequence_length) each."""

    input_ids: torch.Tensor
    weights: torch.Tensor


def t5_tokens(tokenizer: Any, prompts: list[str], max_sequence_length: int, *, parse_emphasis: bool = True) -> T5Tokens:
    """The ids the pipeline would give each prompt, with the A1111 weight of every token (see the module docstring)."""
    rows, weight_rows = [], []
    for prompt in prompts:
        runs = [run for run in prompt_runs(expand_prompt(prompt, tokenizer), parse_emphasis=parse_emphasis) if not run.is_break]
        ids: list[int] = []
        weights: list[float] = []
        for run in runs:
            text = run.text if len(runs) == 1 else run.text.strip()
            if not text:
                continue
            run_ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
            ids += run_ids
            weights += [run.weight] * len(run_ids)
        capacity = max_sequence_length - 1
        if len(ids) > capacity:
            logger.warning(
                f"T5 prompt truncated to max_sequence_length={max_sequence_length} tokens: dropped "
                f"{len(ids) - capacity} of {len(ids)} tokens of {prompt[:60]!r} "
                f"(raise --max-sequence-length, at most {LONGEST_SEQUENCE})"
            )
            ids, weights = ids[:capacity], weights[:capacity]
        padding = max_sequence_length - len(ids) - 1
        rows.append([*ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weight_rows.append([*weights, 1.0] + [1.0] * padding)
    return T5Tokens(torch.tensor(rows), torch.tensor(weight_rows))


def encode_t5(
    tokenizer: Any,
    encoder: nn.Module,
    prompts: list[str],
    max_sequence_length: int,
    *,
    emphasis: str = "original",
    t5_weighting: str = "interpolate",
) -> torch.Tensor:
    """T5 last_hidden_state for `prompts` (batch, max_sequence_length, d_model), weighted by their syntax.

    `emphasis` is the conditioner's A1111 mode: "none" tokenizes the text as written, "ignore" parses
    it and drops the weights; the other modes apply the weights by `t5_weighting`.
    """
    tokens = t5_tokens(tokenizer, prompts, max_sequence_length, parse_emphasis=emphasis != "none")
    device = encoder.device  # under CPU offload, accelerate's hook moves the ids on and the states come back elsewhere
    hidden = encoder(tokens.input_ids.to(device))[0]
    weights = tokens.weights.to(hidden.device)
    if emphasis in ("ignore", "none") or not (weights != 1.0).any():
        return hidden
    compute = torch.promote_types(hidden.dtype, torch.float32)
    states, factor = hidden.to(compute), weights.unsqueeze(-1).to(compute)
    if t5_weighting == "multiply":
        weighted = states * factor
    else:
        empty = t5_tokens(tokenizer, [""], max_sequence_length).input_ids.to(device)
        empty_states = encoder(empty)[0].to(hidden.device, compute)
        weighted = empty_states + (states - empty_states) * factor
    largest = torch.finfo(hidden.dtype).max
    weighted = weighted.clamp(-largest, largest).to(hidden.dtype)
    return torch.where((weights != 1.0).unsqueeze(-1), weighted, hidden)
