"""A small CLIP BPE tokenizer for the shapes world.

The vocabulary follows the layout of OpenAI's CLIP tokenizer: the 256 byte-unicode symbols,
the same symbols with the end-of-word marker "</w>", one entry per merge, and finally
<|startoftext|> and <|endoftext|>. Because every byte has a symbol, any text tokenizes without
unknown tokens; the merges are chosen so that every world word becomes a single token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

from condkit.conditioning import CLIP_POSITIONS

END_OF_WORD = "</w>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = CLIP_POSITIONS  # the world's CLIP has stock CLIP's window

# The pre-tokenizer pattern of CLIP (without the special-token alternatives); a world
# "word" containing several of these pieces gets one token per piece.
_PRE_TOKEN_PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character, as GPT-2 and CLIP do."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codepoints)))


def _pieces(words: Iterable[str]) -> list[str]:
    """Split world words the way CLIP's pre-tokenizer will, in first-seen order."""
    seen: dict[str, None] = {}
    for word in words:
        for piece in _PRE_TOKEN_PATTERN.findall(word.lower()):
            seen.setdefault(piece, None)
    return list(seen)


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one pre-token: repeatedly merge the lowest-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return a CLIP-layout vocabulary and merge list in which every word is one token.

    Words are processed in order. Each word is first encoded with the merges made so far, then
    its remaining pieces are joined left to right by new merges. New merges rank after all
    earlier ones, so they never change how an earlier word is encoded.
    """
    byte_symbols = list(bytes_to_unicode().values())
    byte_encoder = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for piece in _pieces(words):
        mapped = [byte_encoder[b] for b in piece.encode("utf-8")]
        symbols = mapped[:-1] + [mapped[-1] + END_OF_WORD]
        symbols = _apply_merges(symbols, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]

    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer(words: Iterable[str], out_dir: str | Path) -> CLIPTokenizer:
    """Write a CLIPTokenizer folder whose merges make each of `words` a single token, and load it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (out_dir / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return load_tokenizer(out_dir)


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Load a tokenizer folder written by `build_tokenizer`."""
    folder = Path(folder)
    if not (folder / "vocab.json").is_file():
        raise FileNotFoundError(f"No tokenizer in {str(folder)!r}: expected vocab.json and merges.txt there.")
    return CLIPTokenizer.from_pretrained(str(folder))
