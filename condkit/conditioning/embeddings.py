"""Textual-inversion embeddings into a pipeline's tokenizer(s) and text encoder(s).

`load_embedding` adds a learned token the way diffusers' `load_textual_inversion` does — a token
with n vectors becomes the tokenizer entries "<tok>", "<tok>_1", …, "<tok>_{n-1}", each with its
own row in the token-embedding table — so diffusers pipelines expand prompts with their own
`maybe_convert_prompt` and give the same tensors. Conditioners that tokenize prompts themselves
call `expand_prompt` first. Differences from diffusers' loader:

- every format in `embedding_formats` loads, SDXL ones into both encoders (clip_l → 1, clip_g → 2);
- nothing is changed unless the whole embedding fits: a token already in any vocabulary (as an
  entry, or as text that already tokenizes to one existing token) and a vector width that is not
  the encoder's are refused first;
- an old CLIP config with eos_token_id == 2 makes transformers pool at argmax(input_ids), which an
  added token (id above the real EOS) takes over; the config is pointed at the tokenizer's real EOS
  id so the pooled output stays on the EOS token (`fix_pooled_eos`);
- `expand_prompt` finds tokens the way the tokenizer itself does (case-insensitively for CLIP,
  longest match first) and leaves an already expanded prompt as it is.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from condkit.conditioning.embedding_formats import LearnedEmbedding, read_embedding

# The eos_token_id that old CLIP configs carry; transformers then pools at argmax(input_ids).
LEGACY_CLIP_EOS_TOKEN_ID = 2

Target = Any  # a diffusers pipeline, a conditioner with .tokenizers/.text_encoders, or (tokenizers, text_encoders)


def load_embedding(
    target: Target,
    embedding: LearnedEmbedding | str | os.PathLike,
    token: str | None = None,
) -> list[str]:
    """Add a textual-inversion token to every text encoder of `target`; returns the tokenizer entries added.

    `target` is a StableDiffusion(XL) pipeline, a conditioner with `tokenizers` and `text_encoders`,
    or a pair (tokenizers, text_encoders). `embedding` is a LearnedEmbedding or a file in any format
    `read_embedding` knows; `token` renames it.
    """
    tokenizers, encoders = text_encoder_pairs(target)
    if not isinstance(embedding, LearnedEmbedding):
        embedding = read_embedding(embedding, token)
    elif token is not None:
        embedding = replace(embedding, token=token)
    _check_fits(embedding, tokenizers, encoders)

    names = embedding.token_names
    for tokenizer, encoder, vectors in zip(tokenizers, encoders, embedding.vectors):
        fix_pooled_eos(encoder, tokenizer)
        vocabulary = tokenizer.get_vocab()
        if any(name not in vocabulary for name in names):  # a tokenizer shared by two encoders is filled once
            tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        _set_rows(encoder, ids, vectors)
    return names


def extract_embedding(target: Target, token: str) -> LearnedEmbedding:
    """The vectors of an added token (and its "_1", "_2", … entries) as they stand in `target`'s encoders."""
    tokenizers, encoders = text_encoder_pairs(target)
    vectors = []
    for index, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders), start=1):
        names = [token] + _followers(token, tokenizer.added_tokens_encoder)
        if token not in tokenizer.added_tokens_encoder:
            raise ValueError(f"token {token!r} was not added to tokenizer {index}; load it before extracting it")
        ids = tokenizer.convert_tokens_to_ids(names)
        vectors.append(encoder.get_input_embeddings().weight[ids].detach().clone())
    return LearnedEmbedding(token, vectors)


def expand_prompt(prompt: str | list[str], tokenizer: Any) -> str | list[str]:
    """Replace every multi-vector token "<tok>" by "<tok> <tok>_1 …", as diffusers' maybe_convert_prompt does."""
    if isinstance(prompt, (list, tuple)):
        return [expand_prompt(p, tokenizer) for p in prompt]
    followers = _multi_vector_followers(tokenizer)
    if not followers:
        return prompt
    if getattr(tokenizer, "is_fast", False):
        return _expand_by_token_offsets(prompt, tokenizer, followers)
    return _expand_by_text(prompt, followers)


def fix_pooled_eos(text_encoder: nn.Module, tokenizer: Any) -> bool:
    """Point a legacy eos_token_id == 2 CLIP config at the tokenizer's EOS id; True if anything changed.

    transformers then takes the pooled output at the first EOS token instead of at argmax(input_ids),
    which is the same position until tokens with ids above EOS are added.
    """
    eos = tokenizer.eos_token_id
    if eos is None or eos == LEGACY_CLIP_EOS_TOKEN_ID:
        return False
    changed = False
    config = getattr(text_encoder, "config", None)
    if getattr(config, "eos_token_id", None) == LEGACY_CLIP_EOS_TOKEN_ID:
        config.eos_token_id = eos
        changed = True
    for module in text_encoder.modules():
        # CLIPTextTransformer copies the id from its config at construction time.
        if vars(module).get("eos_token_id") == LEGACY_CLIP_EOS_TOKEN_ID:
            module.eos_token_id = eos
            changed = True
    return changed


def text_encoder_pairs(target: Target) -> tuple[list[Any], list[nn.Module]]:
    """The (tokenizers, text encoders) of a pipeline, a conditioner, or an explicit pair."""
    if isinstance(target, tuple) and len(target) == 2:
        tokenizers, encoders = (list(part) if isinstance(part, (list, tuple, nn.ModuleList)) else [part] for part in target)
    elif hasattr(target, "tokenizers") and hasattr(target, "text_encoders"):
        tokenizers, encoders = list(target.tokenizers), list(target.text_encoders)
    else:
        pairs = [
            (getattr(target, tokenizer_name, None), getattr(target, encoder_name, None))
            for tokenizer_name, encoder_name in (
                ("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")
            )  # SD: one; SDXL: CLIP-L, CLIP-G; SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5
        ]
        pairs = [pair for pair in pairs if pair[0] is not None and pair[1] is not None]
        if not pairs:
            raise ValueError(
                f"{type(target).__name__} has no tokenizer/text_encoder; expected a diffusers pipeline, a conditioner, "
                "or (tokenizers, text_encoders)"
            )
        tokenizers, encoders = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    if len(tokenizers) != len(encoders) or not tokenizers:
        raise ValueError(f"got {len(tokenizers)} tokenizers and {len(encoders)} text encoders; expected the same number, at least one")
    return tokenizers, encoders


def _check_fits(embedding: LearnedEmbedding, tokenizers: list[Any], encoders: list[nn.Module]) -> None:
    if len(embedding.vectors) != len(encoders):
        raise ValueError(
            f"embedding {embedding.token!r} has vectors for {len(embedding.vectors)} text encoder(s), "
            f"but the target has {len(encoders)} ({', '.join(type(encoder).__name__ for encoder in encoders)}); expected one "
            "vector set per text encoder"
        )
    for index, (encoder, width) in enumerate(zip(encoders, embedding.widths), start=1):
        expected = encoder.get_input_embeddings().weight.shape[1]
        if width != expected:
            raise ValueError(
                f"embedding {embedding.token!r} is {width} wide for text encoder {index}, but that encoder's "
                f"token embeddings are {expected} wide"
            )
    checked: set[int] = set()
    for index, tokenizer in enumerate(tokenizers, start=1):
        if id(tokenizer) in checked:
            continue
        checked.add(id(tokenizer))
        vocabulary = tokenizer.get_vocab()
        for name in embedding.token_names:
            existing = existing_token(tokenizer, name, vocabulary)
            if existing is not None:
                raise ValueError(
                    f"token {name!r} already exists in tokenizer {index} (as {existing!r}); "
                    "expected a new token name: pass token=... to rename the embedding"
                )


def existing_token(tokenizer: Any, text: str, vocabulary: dict[str, int] | None = None) -> str | None:
    """The token `text` already is for `tokenizer` — an entry, or text that tokenizes to one existing
    token (e.g. "circle" → "circle</w>") — or None if it would be new."""
    vocabulary = tokenizer.get_vocab() if vocabulary is None else vocabulary
    if text in vocabulary:
        return text
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer.convert_ids_to_tokens(ids[0]) if len(ids) == 1 else None


def _set_rows(encoder: nn.Module, ids: list[int], vectors: torch.Tensor) -> None:
    table = encoder.get_input_embeddings()
    if max(ids) >= table.num_embeddings:
        encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        table = encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[torch.tensor(ids, device=table.weight.device)] = vectors.to(table.weight.device, table.weight.dtype)


def _followers(token: str, added: dict[str, int]) -> list[str]:
    names = []
    while f"{token}_{len(names) + 1}" in added:
        names.append(f"{token}_{len(names) + 1}")
    return names


def _multi_vector_followers(tokenizer: Any) -> dict[str, list[str]]:
    added = tokenizer.added_tokens_encoder
    found = {name: _followers(name, added) for name in added}
    return {name: followers for name, followers in found.items() if followers}


def _expand_by_token_offsets(prompt: str, tokenizer: Any, followers: dict[str, list[str]]) -> str:
    """Expand at the character spans where the tokenizer itself finds each multi-vector token."""
    by_id = {tokenizer.convert_tokens_to_ids(name): names for name, names in followers.items()}
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = encoding["input_ids"]
    pieces, cursor = [], 0
    for position, (token_id, (_, end)) in enumerate(zip(ids, encoding["offset_mapping"])):
        names = by_id.get(token_id)
        if names is None or ids[position + 1 : position + 1 + len(names)] == tokenizer.convert_tokens_to_ids(names):
            continue
        pieces += [prompt[cursor:end], " ", " ".join(names)]
        cursor = end
    return "".join(pieces) + prompt[cursor:]


def _expand_by_text(prompt: str, followers: dict[str, list[str]]) -> str:
    """For tokenizers without offsets: exact, longest-first matches of the added names."""
    names = sorted({name for base, rest in followers.items() for name in [base, *rest]}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(name) for name in names))

    def expand(match: re.Match[str]) -> str:
        rest = followers.get(match.group(0))
        if rest is None or re.match(r"\s*" + re.escape(rest[0]) + r"(?!\S)", prompt[match.end() :]):
            return match.group(0)
        return " ".join([match.group(0), *rest])

    return pattern.sub(expand, prompt)
