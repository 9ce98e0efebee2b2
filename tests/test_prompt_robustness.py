"""Hostile prompts: what strict parsing refuses, and encoding that never crashes or goes non-finite.

From a fuzzing campaign: prompts with lone surrogates crashed the tokenizer; weights of 39 nines,
5,000 nested "(" and "(red:1.3" x 1000 gave NaN embeddings without a word; a weight of 1e40 and
20,000 nested "(" gave black images. The policy (prompt_syntax's module docstring): refuse, with a
one-line ValueError naming the value, surrogates and control characters other than tab, newline
and carriage return, weights beyond +-MAX_PROMPT_WEIGHT and nesting deeper than MAX_NESTING_DEPTH;
and apply_emphasis never turns finite states into non-finite ones.

CONDKIT_FUZZ_EXAMPLES sets the examples of the encode property test: default 3,000, about 15 s on
2 CPU cores at about 5 ms each (mostly Hypothesis generating the text; 10,000 take about 55 s).
CONDKIT_PARSE_FUZZ_EXAMPLES sets those of the parse-only one: default 3,000, about 7 s (parsing
takes under 0.2 ms of the 2.4 ms per example; 10,000 take about 40 s).
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

from condkit.conditioning.clip import CLIPConditioner, apply_emphasis
from condkit.conditioning.prompt_syntax import (
    MAX_NESTING_DEPTH,
    MAX_PROMPT_WEIGHT,
    WeightedRun,
    check_prompt_characters,
    parse_prompt,
)

FUZZ_EXAMPLES = int(os.environ.get("CONDKIT_FUZZ_EXAMPLES", "3000"))
PARSE_FUZZ_EXAMPLES = int(os.environ.get("CONDKIT_PARSE_FUZZ_EXAMPLES", "3000"))


@pytest.fixture(scope="module")
def sd() -> CLIPConditioner:
    return CLIPConditioner.from_pipeline(tiny_sd_pipeline())


@pytest.fixture(scope="module")
def sdxl() -> CLIPConditioner:
    return CLIPConditioner.from_pipeline(tiny_sdxl_pipeline())


def short_id(value: object) -> str:
    text = ascii(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


def refusal(prompt: str) -> str:
    """The message of the ValueError that strict parsing raises for `prompt`; checks it is one line."""
    with pytest.raises(ValueError) as caught:
        parse_prompt(prompt, strict=True)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 400, message
    return message


# (prompt, pieces the message must contain: the value, where it is, what was expected)
REFUSED_CHARACTERS = [
    ("a \ud800 b", ["surrogate", "'\\ud800'", "U+D800", "index 2", "expected"]),
    ("\udfff", ["surrogate", "U+DFFF", "index 0"]),
    ("smile \ud83d\ude00", ["surrogate", "U+D83D", "index 6"]),  # a UTF-16 pair is still two code points
    ("(red:1.3) \udcff", ["surrogate", "U+DCFF", "index 10"]),  # what errors="surrogateescape" leaves for 0xFF
    ("a\x00b", ["control character", "'\\x00'", "U+0000", "index 1", "tab, newline and carriage return"]),
    ("\x1b[31mred", ["control character", "U+001B", "index 0"]),
    ("a\x0bb", ["U+000B", "index 1"]),  # vertical tab: a control character, not one of the three allowed
    ("a\x0cb", ["U+000C"]),
    ("a\x7fb", ["U+007F"]),
    ("a\x85b", ["U+0085"]),
    ("a\x9fb", ["U+009F"]),
    ("line one\nline two\x08", ["U+0008", "index 17"]),
]

REFUSED_WEIGHTS = [
    ("(a:" + "9" * 39 + ")", ["prompt weight 9999", "1e+39", "index 3", "between -100 and 100"]),
    ("(a:" + "9" * 400 + ")", ["= inf", "index 3", "finite number"]),
    ("(a:101)", ["weight 101 ", "(= 101.0)", "index 3"]),
    ("(a: -100.5 )", ["weight -100.5", "index 4"]),
    ("(x:1e40) (y:1000000)", ["weight 1000000", "index 12"]),  # "1e40" is no weight: "x:1e40" is text
    ("[(a:200)]", ["weight 200", "index 4"]),  # refused as written, though 200 / 1.1 would be fine
    # Effective weights: the product of the brackets around a token.
    ("(((a:100)))", ["token weight 121.0", "'a'", "index 3", "after multiplying"]),
    ("x ((big:10):11)", ["token weight 110.0 ", "'big'", "index 4"]),
    ("(" * 49 + "long word", ["token weight 106.71", "'long word'", "index 49"]),  # 1.1 ** 49
    ("((a:-50) BREAK b:3)", ["token weight -150.0 ", "'a'", "index 2"]),
]

REFUSED_NESTING = [
    ("(" * (MAX_NESTING_DEPTH + 1) + "a", ["65 deep", "index 64", "at most 64"]),
    ("[" * (MAX_NESTING_DEPTH + 1) + "a", ["65 deep", "index 64"]),
    ("([" * 40 + "a", ["65 deep", "index 64"]),
    ("(" * 5000 + "a", ["65 deep"]),
    ("(" * 20000 + "a", ["65 deep"]),
    ("(red:1.3" * 1000, ["65 deep", "index 512", "(red:1.3(red"]),  # never closed: every "(" stays open
]


@pytest.mark.parametrize(("prompt", "pieces"), REFUSED_CHARACTERS + REFUSED_WEIGHTS + REFUSED_NESTING, ids=short_id)
def test_strict_parsing_refuses_in_one_line_naming_the_value(prompt: str, pieces: list[str]) -> None:
    message = refusal(prompt)
    for piece in pieces:
        assert piece in message, (piece, message)
    # The lenient parser, the web UI's behaviour, still accepts it.
    assert parse_prompt(prompt)


def test_deep_nesting_is_refused_at_once_without_recursion() -> None:
    start = time.perf_counter()
    for depth in (MAX_NESTING_DEPTH + 1, 20_000, 200_000):
        refusal("(" * depth + "x")
        refusal("[" * depth + "x" + "]" * depth)
    assert time.perf_counter() - start < 1.0


ACCEPTED = [
    "a\tb\nc\r\nd",  # the three whitespace control characters
    "family \U0001f469\u200d\U0001f469\u200d\U0001f467 \ufeff\u200e, \ue000 \U0010fffd",  # Cf, Co
    "(a:100) (b:-100) (c:0) (d:100.0)",
    "(" * 48 + "a",  # 1.1 ** 48 = 97.0
    "[" * MAX_NESTING_DEPTH + "a",  # 64 levels, weight 0.0022
    "(" * 32 + "[" * 32 + "a",
    "(x:1e40)",  # not a weight: the text "x:1e40" at 1.1
    "(a:" + "0" * 400 + "1)",  # a long way of writing 1
    "(red:1.3)" * 1000,
    "\\(" * 1000 + "a",  # escaped brackets open nothing
    ")" * 1000 + "]" * 1000,  # closers with nothing to close are text
    "((a:100):0.5)",  # 100 as written, 50 in effect
]


@pytest.mark.parametrize("prompt", ACCEPTED, ids=short_id)
def test_strict_parsing_accepts_and_parses_ordinary_and_edge_prompts_like_the_web_ui(prompt: str) -> None:
    assert parse_prompt(prompt, strict=True) == parse_prompt(prompt)


def test_an_effective_weight_is_checked_once_all_brackets_are_closed() -> None:
    # Only the final product counts: 0.5 * 10 * 10 * 10 = 500 is refused, 0.5 * 10 * 10 * 2 = 100 is not.
    assert "token weight 500" in refusal("((((a:0.5):10):10):10)")
    assert parse_prompt("((((a:0.5):10):10):2)", strict=True) == [WeightedRun("a", 100.0)]
    # Weights on no text weight nothing and are not checked.
    assert parse_prompt("((\\:100):100)", strict=True) == parse_prompt("((\\:100):100)")


def test_check_prompt_characters_alone() -> None:
    check_prompt_characters("plain text, (weights:1.2) and\ttabs")
    with pytest.raises(ValueError, match=r"U\+D800\) at index 0"):
        check_prompt_characters("\ud800")


def test_excerpts_stay_short_and_on_one_line() -> None:
    long_prompt = "word\n" * 1000 + "\x00" + "more\n" * 1000
    message = refusal(long_prompt)
    assert "index 5000" in message and len(message) < 300
    assert "\\n" in message  # the excerpt is a repr: newlines shown escaped


# Encoding: the fuzzing campaign's cases end in the one-line error or in finite tensors.

def encode_or_refuse(conditioner: CLIPConditioner, prompt: str, negative: str | None = None) -> str | None:
    """None when encoding gave finite tensors; the message when it raised ValueError (one line)."""
    try:
        with torch.no_grad():
            cond = conditioner.encode(prompt, negative)
    except ValueError as error:
        message = str(error)
        assert "\n" not in message and "\r" not in message, message
        return message
    tensors = [cond.prompt_embeds, cond.negative_prompt_embeds, cond.pooled_prompt_embeds, cond.negative_pooled_prompt_embeds]
    for tensor in tensors:
        assert tensor is None or bool(torch.isfinite(tensor).all()), prompt[:80]
    return None


FUZZ_CAMPAIGN = [
    ("a lone \ud800 surrogate", "U+D800"),
    ("(red:" + "9" * 39 + ")", "1e+39"),
    ("(" * 5000 + "red", "65 deep"),
    ("(red:1.3" * 1000, "65 deep"),
    ("(" * 20000 + "red", "65 deep"),
    ("(red:1" + "0" * 40 + ")", "1e+40"),
    ("(red:1.3)" * 1000, None),
    ("(x:1e40)", None),
    ("(red and blue:0)", None),  # gave NaN: the weighted mean of the chunk rounded to exactly 0
    ("(a b c d e f:0)", None),
    ("(red:-100) (blue:100)", None),
    ("[" * MAX_NESTING_DEPTH + "red", None),
    ("(" * 48 + "red", None),
    ("a\tb\r\nc BREAK (d:0) BREAK [e]", None),
]


@pytest.mark.parametrize("conditioner_name", ["sd", "sdxl"])
@pytest.mark.parametrize(("prompt", "refused_with"), FUZZ_CAMPAIGN, ids=short_id)
def test_fuzzing_campaign_prompts_give_finite_tensors_or_the_one_line_error(
    conditioner_name: str, prompt: str, refused_with: str | None, request: pytest.FixtureRequest
) -> None:
    conditioner = request.getfixturevalue(conditioner_name)
    start = time.perf_counter()
    outcome = encode_or_refuse(conditioner, prompt)
    if refused_with is None:
        assert outcome is None
    else:
        assert outcome is not None and refused_with in outcome
        assert time.perf_counter() - start < 1.0
    # The negative prompt goes through the same parser.
    assert (encode_or_refuse(conditioner, "a cat", prompt) is None) == (refused_with is None)


def test_a_surrogate_is_refused_even_with_a_multi_vector_embedding_loaded() -> None:
    from condkit.conditioning.embedding_formats import LearnedEmbedding
    from condkit.conditioning.embeddings import load_embedding

    pipe = tiny_sd_pipeline(0)
    load_embedding(pipe, LearnedEmbedding("<cat-toy>", [torch.randn(3, 32, generator=torch.Generator().manual_seed(0))]))
    assert "U+D800" in encode_or_refuse(CLIPConditioner.from_pipeline(pipe), "a <cat-toy> \ud800")


# apply_emphasis itself.

def a1111_original(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's own code, per chunk: z * multipliers, then z * (original_mean / new_mean)."""
    original_mean = hidden.mean(dim=(-2, -1), keepdim=True)
    scaled = hidden * weights.unsqueeze(-1)
    return scaled * (original_mean / scaled.mean(dim=(-2, -1), keepdim=True))


def test_apply_emphasis_is_a1111_bit_for_bit_where_the_chunk_mean_is_meaningful() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 77, 16, generator=generator) + 0.5
    weights = torch.ones(2, 3, 77)
    weights[0, 1, 3:9] = 1.3
    weights[1, :, 10:40] = torch.rand(3, 30, generator=generator) * 4 - 1
    out = apply_emphasis(hidden, weights)
    assert torch.equal(out[0, 0], hidden[0, 0]) and torch.equal(out[0, 2], hidden[0, 2])
    assert torch.equal(out[0, 1], a1111_original(hidden[0, 1], weights[0, 1]))
    assert torch.equal(out[1], a1111_original(hidden[1], weights[1]))


def layer_norm_states(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """States as a LayerNorm without bias leaves them: every token averages 0 up to rounding."""
    states = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    return torch.nn.functional.layer_norm(states, shape[-1:])


@pytest.mark.parametrize("content_weight", [0.0, 1e-30, 0.5, 1.3, -1.0, MAX_PROMPT_WEIGHT, -MAX_PROMPT_WEIGHT])
def test_apply_emphasis_stays_finite_and_bounded_where_the_mean_is_rounding_noise(content_weight: float) -> None:
    hidden = layer_norm_states((4, 77, 32))
    weights = torch.ones(4, 77)
    weights[:, 1:76] = content_weight
    weights[3] = 1.0
    out = apply_emphasis(hidden, weights)
    assert torch.isfinite(out).all()
    # No rescale by a ratio of two noise values: the weighted states come back as they are.
    assert torch.equal(out[:3], hidden[:3] * weights[:3, :, None])
    assert torch.equal(out[3], hidden[3])


def test_apply_emphasis_keeps_a_chunk_whose_mean_is_exactly_zero() -> None:
    hidden = torch.tensor([[1.0, -1.0], [2.0, -2.0], [0.5, -0.5]])  # mean exactly 0
    weights = torch.tensor([1.0, 1.3, 1.0])
    out = apply_emphasis(hidden, weights)  # A1111: factor 0 / x = 0 wipes the chunk out
    assert torch.equal(out, hidden * weights[:, None])
    zeros = torch.zeros(1, 3, 4)
    assert torch.equal(apply_emphasis(zeros, torch.tensor([[0.0, 2.0, 1.0]])), zeros)  # 0 / 0


def test_apply_emphasis_half_precision_neither_overflows_nor_loses_the_rescale() -> None:
    hidden = (torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1)) * 300 + 200).half()
    weights = torch.ones(2, 77)
    weights[:, 1:76] = MAX_PROMPT_WEIGHT  # 500 * 100 overflows float16
    out = apply_emphasis(hidden, weights)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = a1111_original(hidden.float(), weights).clamp(-65504, 65504).half()
    assert torch.equal(out, expected)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.floats(-MAX_PROMPT_WEIGHT, MAX_PROMPT_WEIGHT),
    st.floats(-MAX_PROMPT_WEIGHT, MAX_PROMPT_WEIGHT),
    st.sampled_from([0.0, 1e-6, 1.0, 1e3]),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_apply_emphasis_is_finite_for_bounded_weights(seed, weight_a, weight_b, offset, dtype) -> None:
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(2, 9, 4, generator=generator) * 10 + offset).to(dtype)
    weights = torch.ones(2, 9)
    weights[:, 1:5], weights[:, 5:8] = weight_a, weight_b
    out = apply_emphasis(hidden, weights)
    assert out.dtype == dtype and torch.isfinite(out).all()


# Property tests over arbitrary text.

ANY_CHARACTER = st.characters(exclude_categories=())  # every code point: surrogates, controls, unassigned
WEIGHT_TEXTS = st.one_of(
    st.sampled_from(["1.3", "0", "-0.5", ".5", "3.", "+2", "100", "-100", "100.0001", "1e40", "inf", "nan", "1.2.3"]),
    st.integers(0, 400).map(lambda n: "9" * n),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str),
)
A1111_PIECES = st.one_of(
    st.sampled_from(
        [*"()[]:\\ ,.", "BREAK", " BREAK ", "\\(", "\\)", "\\[", "\\]", "\\\\", "red", " blue", "cat", "\n", "\t", "\r\n"]
    ),
    WEIGHT_TEXTS.map(lambda weight: f":{weight})"),
    st.tuples(WEIGHT_TEXTS, st.sampled_from(["", " "])).map(lambda pair: f"(word:{pair[1]}{pair[0]}{pair[1]})"),
    st.tuples(st.sampled_from("(["), st.integers(1, 100)).map(lambda pair: pair[0] * pair[1]),
    st.tuples(st.sampled_from(")]"), st.integers(1, 100)).map(lambda pair: pair[0] * pair[1]),
    st.text(ANY_CHARACTER, max_size=8),
)
A1111_PROMPTS = st.lists(A1111_PIECES, max_size=40).map("".join)
ANY_PROMPT = st.one_of(st.text(ANY_CHARACTER, max_size=120), st.text(max_size=120), A1111_PROMPTS)


@settings(max_examples=PARSE_FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_PROMPT)
def test_strict_parsing_refuses_in_one_line_or_agrees_with_the_web_ui_within_bounds(prompt: str) -> None:
    lenient = parse_prompt(prompt)
    try:
        strict = parse_prompt(prompt, strict=True)
    except ValueError as error:
        message = str(error)
        assert "\n" not in message and "\r" not in message and "expected" in message, message
        return
    assert strict == lenient
    assert all(math.isfinite(run.weight) and abs(run.weight) <= MAX_PROMPT_WEIGHT for run in strict if run.text)
    refused = {*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), *map(chr, range(0xD800, 0xE000))} - set("\t\n\r")
    assert not refused.intersection(prompt)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_PROMPT)
def test_encoding_any_text_gives_finite_tensors_or_the_one_line_error(sd: CLIPConditioner, prompt: str) -> None:
    encode_or_refuse(sd, prompt)
