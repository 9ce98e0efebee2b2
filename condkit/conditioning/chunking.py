"""Weighted prompts → fixed-size token chunks, as AUTOMATIC1111 builds them.

A prompt is parsed into weighted runs, each run tokenized without special tokens, and the tokens
packed into chunks of `window - 2` content tokens; every chunk is wrapped as BOS … EOS and padded
to `window` with the tokenizer's pad token, exactly the layout a CLIP tokenizer produces for a
short prompt with padding="max_length". BREAK closes the current chunk. When a chunk fills up, the
tokens after its last comma (if that comma is close to the end) move to the next chunk, so a
phrase is not cut in half.

Prompts are parsed strictly (`parse_prompt(prompt, strict=True)`): a prompt with a surrogate or
control character, a weight out of range or brackets nested too deep is refused with a one-line
ValueError before anything is tokenized (the policy is in `prompt_syntax`'s module docstring).

With parse_emphasis=False (A1111's "None" emphasis) the prompt is not parsed at all: it is one run
of weight 1 tokenized as written, so brackets, ":1.3", backslashes and BREAK are literal text, as
in A1111, where that mode tokenizes the whole line (`parsed = [[line, 1.0]]`) and BREAK, which its
emphasis parser splits out, is never seen. Only the character check (surrogates, control
characters) still applies; weight and nesting bounds concern parsed syntax and do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condkit.conditioning.prompt_syntax import WeightedRun, check_prompt_characters, parse_prompt

COMMA_BACKTRACK = 20


@dataclass
class TokenChunks:
    """Token ids and per-token weights of one prompt: shape (n_chunks, window) each."""

    input_ids: torch.Tensor
    weights: torch.Tensor
    n_content_tokens: int

    @property
    def n_chunks(self) -> int:
        return self.input_ids.shape[0]


def prompt_runs(prompt: str, *, parse_emphasis: bool = True) -> list[WeightedRun]:
    """The weighted runs a prompt is tokenized from: strict A1111 parsing, or with
    parse_emphasis=False the whole prompt as one literal run of weight 1 (after the character check).

    Raises ValueError (one line) for a prompt that is refused (see `prompt_syntax`).
    """
    if parse_emphasis:
        return parse_prompt(prompt, strict=True)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    check_prompt_characters(prompt)
    return [WeightedRun(prompt, 1.0)]


def chunk_prompt(tokenizer, prompt: str, window: int | None = None, *, parse_emphasis: bool = True) -> TokenChunks:
    """Tokenize an A1111-syntax prompt into BOS…EOS-wrapped chunks of `window` tokens.

    parse_emphasis=False tokenizes the prompt as written (A1111's "None" emphasis; see the module
    docstring). Raises ValueError (one line) for a prompt that is refused (see `prompt_syntax`).
    """
    window = window or tokenizer.model_max_length
    capacity = window - 2
    comma_id = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    n_content = 0

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for run in prompt_runs(prompt, parse_emphasis=parse_emphasis):
        if run.is_break:
            close_chunk()
            continue
        if not run.text:
            continue
        ids = tokenizer(run.text, add_special_tokens=False, verbose=False).input_ids
        n_content += len(ids)
        group_lengths = multi_vector_groups(tokenizer, ids)
        for position, token in enumerate(ids):
            group = group_lengths.get(position)
            if group is not None and len(tokens) + group > capacity:
                close_chunk()  # a multi-vector embedding moves whole to the next chunk, as in A1111
            if token == comma_id:
                last_comma = len(tokens)
            elif len(tokens) == capacity and last_comma >= 0 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                carry_tokens, carry_weights = tokens[last_comma + 1 :], weights[last_comma + 1 :]
                tokens, weights = tokens[: last_comma + 1], weights[: last_comma + 1]
                close_chunk()
                tokens, weights = carry_tokens, carry_weights
            if len(tokens) == capacity:
                close_chunk()
            tokens.append(token)
            weights.append(run.weight)
    if tokens or not chunks:
        close_chunk()

    ids_rows = [_wrap(tokenizer, chunk_tokens, window) for chunk_tokens, _ in chunks]
    weight_rows = [[1.0] + chunk_weights + [1.0] * (window - 1 - len(chunk_weights)) for _, chunk_weights in chunks]
    return TokenChunks(torch.tensor(ids_rows), torch.tensor(weight_rows), n_content)


def multi_vector_groups(tokenizer, ids: list[int]) -> dict[int, int]:
    """{position: length} of each multi-vector textual-inversion token in `ids`: an added token "<t>"
    followed by "<t>_1", "<t>_2", … (the expansion `embeddings.expand_prompt` writes)."""
    added = {index: name for name, index in tokenizer.get_added_vocab().items()}
    groups = {}
    for position, token in enumerate(ids):
        name = added.get(token)
        if name is None:
            continue
        length = 1
        while position + length < len(ids) and added.get(ids[position + length]) == f"{name}_{length}":
            length += 1
        if length > 1:
            groups[position] = length
    return groups


def _wrap(tokenizer, tokens: list[int], window: int) -> list[int]:
    row = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    return row + [tokenizer.pad_token_id] * (window - len(row))


def empty_chunk(tokenizer, window: int | None = None) -> TokenChunks:
    return chunk_prompt(tokenizer, "", window)


def pad_chunks(chunks: TokenChunks, n_chunks: int, filler: TokenChunks) -> TokenChunks:
    """Append copies of `filler` (an empty prompt's chunk) until there are `n_chunks` chunks."""
    missing = n_chunks - chunks.n_chunks
    if missing <= 0:
        return chunks
    return TokenChunks(
        torch.cat([chunks.input_ids, filler.input_ids.repeat(missing, 1)]),
        torch.cat([chunks.weights, filler.weights.repeat(missing, 1)]),
        chunks.n_content_tokens,
    )
