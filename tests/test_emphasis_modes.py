"""A1111's emphasis modes (sd_emphasis.py): "original" (default), "no_norm", "ignore", "none".

- original: multiply by the weights, restore each chunk's mean (today's behaviour, pinned elsewhere).
- no_norm: multiply, no restore.
- ignore: parse the syntax (brackets and weights leave the text, BREAK still breaks), weights all 1.
- none: no parsing; the prompt is tokenized as written (brackets, weights, backslashes and BREAK
  are literal text, as A1111's tokenize_line does with `parsed = [[line, 1.0]]`).
"""

import pytest
import torch

from condkit import load_conditioner
from condkit.conditioning.clip import EMPHASIS_MODES, CLIPConditioner, apply_emphasis, normalize_emphasis
from condkit.conditioning.long_clip import LongCLIPConditioner
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

NAMES = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


@pytest.fixture(params=["sd", "sdxl"])
def pipe(request, sd, sdxl):
    return {"sd": sd, "sdxl": sdxl}[request.param]


def assert_same(first, second):
    for name in NAMES:
        a, b = getattr(first, name), getattr(second, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b), name


def clip(pipe, emphasis=None, cls=CLIPConditioner):
    return cls.from_pipeline(pipe) if emphasis is None else cls.from_pipeline(pipe, emphasis=emphasis)


# --- the option -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("original", "original"), ("no_norm", "no_norm"), ("ignore", "ignore"), ("none", "none"),
     ("Original", "original"), ("No norm", "no_norm"), ("Ignore", "ignore"), ("None", "none"),
     ("NO NORM", "no_norm"), ("no Norm", "no_norm"), ("NONE", "none"), ("ORIGINAL", "original")],
)  # fmt: skip
def test_values_and_a1111_display_names_are_normalised(sd, value, expected):
    assert normalize_emphasis(value) == expected
    assert CLIPConditioner.from_pipeline(sd, emphasis=value).emphasis == expected


def test_default_is_original(sd):
    assert EMPHASIS_MODES == ("original", "no_norm", "ignore", "none")
    assert CLIPConditioner.from_pipeline(sd).emphasis == "original"
    assert "emphasis" in CLIPConditioner.config_names and "emphasis" in LongCLIPConditioner.config_names


@pytest.mark.parametrize("value", ["bogus", "nonorm", "", None, 1, "originalx"])
def test_unknown_value_is_refused_in_one_line_listing_the_choices(sd, value):
    with pytest.raises(ValueError) as error:
        CLIPConditioner.from_pipeline(sd, emphasis=value)
    message = str(error.value)
    assert "\n" not in message and repr(value) in message
    for choice in EMPHASIS_MODES:
        assert repr(choice) in message
    with pytest.raises(ValueError):
        LongCLIPConditioner.from_pipeline(sd, emphasis=value)


@torch.no_grad()
@pytest.mark.parametrize("name, options", [("clip", {}), ("long-clip", {"pad_token": "zero"})])
def test_emphasis_survives_save_and_load(sd, tmp_path, name, options):
    saved = load_conditioner(name, sd, emphasis="No norm", **options)
    assert saved.config["emphasis"] == "no_norm"
    loaded = load_conditioner(saved.save_pretrained(tmp_path / name), sd)
    assert type(loaded) is type(saved) and loaded.emphasis == "no_norm"
    prompts = ["a (red:1.5) circle", "[blue] squares"]
    assert_same(saved.encode(prompts, "(blurry)"), loaded.encode(prompts, "(blurry)"))
    default = load_conditioner(load_conditioner(name, sd, **options).save_pretrained(tmp_path / f"{name}-default"), sd)
    assert default.emphasis == "original"


# --- original --------------------------------------------------------------------------------


@torch.no_grad()
def test_original_is_the_default_bit_for_bit(pipe):
    prompts = ["a (red:1.5) [circle] BREAK on the (left)", "two ((blue)) squares, " * 10]
    assert_same(clip(pipe).encode(prompts, "[[blurry]]"), clip(pipe, "Original").encode(prompts, "[[blurry]]"))


# --- no norm ---------------------------------------------------------------------------------


@torch.no_grad()
def test_no_norm_multiplies_without_restoring_the_mean(pipe):
    plain = clip(pipe).encode("a red circle", "blurry")
    weighted = clip(pipe, "no_norm").encode("a (red:1.5) [circle]", "(blurry:0.5)")
    # byte tokenizer: BOS, "a</w>", "r", "e", "d</w>" (2..4), "c" ... "e</w>" (5..10), EOS, padding
    expected = plain.prompt_embeds.clone()
    expected[0, 2:5] = plain.prompt_embeds[0, 2:5] * 1.5
    expected[0, 5:11] = plain.prompt_embeds[0, 5:11] * (1 / 1.1)
    assert torch.equal(weighted.prompt_embeds, expected)
    negative = plain.negative_prompt_embeds.clone()
    negative[0, 1:7] = plain.negative_prompt_embeds[0, 1:7] * 0.5
    assert torch.equal(weighted.negative_prompt_embeds, negative)
    # the pooled vector is taken before emphasis, as in A1111
    if plain.pooled_prompt_embeds is not None:
        assert torch.equal(weighted.pooled_prompt_embeds, plain.pooled_prompt_embeds)


@torch.no_grad()
def test_no_norm_unweighted_prompt_is_untouched(pipe):
    assert_same(clip(pipe).encode("a red circle, two squares"), clip(pipe, "no_norm").encode("a red circle, two squares"))


def test_apply_emphasis_no_norm_is_a1111_formula_and_stays_finite_in_half():
    torch.manual_seed(0)
    hidden = torch.randn(2, 1, 5, 4)
    weights = torch.tensor([[[1.0, 1.5, 0.5, 1.0, 1.0]], [[1.0] * 5]])
    out = apply_emphasis(hidden, weights, "no_norm")
    assert torch.equal(out[0], hidden[0] * weights[0].unsqueeze(-1))
    assert torch.equal(out[1], hidden[1])  # unweighted chunk: bit for bit
    shifted = hidden + 1.0  # a chunk mean well away from rounding noise, so "original" rescales
    original, no_norm = apply_emphasis(shifted, weights), apply_emphasis(shifted, weights, "no_norm")
    torch.testing.assert_close(original[0].mean(), shifted[0].mean())
    assert not torch.allclose(no_norm[0].mean(), shifted[0].mean())
    assert torch.equal(no_norm[0], shifted[0] * weights[0].unsqueeze(-1))
    half = torch.full((1, 1, 3, 2), 60000.0, dtype=torch.float16)
    big = apply_emphasis(half, torch.tensor([[[1.0, 2.0, 1.0]]]), "No norm")
    assert big.dtype == torch.float16 and torch.isfinite(big).all()
    for mode in ("ignore", "none"):
        assert apply_emphasis(hidden, weights, mode) is hidden
    with pytest.raises(ValueError, match="emphasis must be one of"):
        apply_emphasis(hidden, weights, "bogus")


# --- ignore ----------------------------------------------------------------------------------


@torch.no_grad()
def test_ignore_equals_the_prompt_with_the_markup_stripped(pipe):
    ignore, original = clip(pipe, "ignore"), clip(pipe)
    assert_same(ignore.encode("a (red:1.5) [circle]", "((blurry))"), original.encode("a red circle", "blurry"))
    assert_same(
        ignore.encode(["(two:0.2) [[blue]] squares", "a \\(literal\\) (bracket:1.3)"]),
        original.encode(["two blue squares", "a \\(literal\\) bracket"]),
    )


@torch.no_grad()
def test_ignore_keeps_break(pipe):
    ignore = clip(pipe, "ignore").encode("a (red:1.4) circle BREAK [blue] square")
    assert ignore.prompt_embeds.shape[1] == 2 * 77
    assert_same(ignore, clip(pipe).encode("a red circle BREAK blue square"))


def test_ignore_still_parses_strictly(sd):
    ignore = CLIPConditioner.from_pipeline(sd, emphasis="ignore")
    with pytest.raises(ValueError, match="out of range"):
        ignore.encode("a (red:1000) circle")
    with pytest.raises(ValueError, match="nests brackets"):
        ignore.encode("(" * 65 + "red")


# --- none ------------------------------------------------------------------------------------


@torch.no_grad()
def test_none_tokenizes_brackets_and_weights_as_text(pipe):
    none, original = clip(pipe, "none"), clip(pipe)
    assert_same(none.encode("(red:1.3)", "[blurry]"), original.encode("\\(red:1.3\\)", "\\[blurry\\]"))
    assert_same(none.encode("a (red:1.3) [circle]"), original.encode("a \\(red:1.3\\) \\[circle\\]"))
    # token ids: exactly the tokenizer's own on the raw text
    for tokenizer, chunks in zip(none.tokenizers, none._chunk([["a (red:1.3) \\[circle]"]] * len(none.tokenizers))):
        expected = tokenizer("a (red:1.3) \\[circle]", padding="max_length", max_length=77).input_ids
        assert chunks[0].input_ids[0].tolist() == expected
        assert torch.equal(chunks[0].weights, torch.ones(1, 77))
    assert not torch.equal(none.encode("(red:1.3)").prompt_embeds, original.encode("(red:1.3)").prompt_embeds)


@torch.no_grad()
def test_none_treats_break_as_the_word_as_a1111_does(pipe):
    # A1111 splits BREAK out in parse_prompt_attention, which its "None" mode does not call.
    none = clip(pipe, "none")
    encoded = none.encode("a red circle BREAK a blue square")
    assert encoded.prompt_embeds.shape[1] == 77
    for tokenizer, chunks in zip(none.tokenizers, none._chunk([["a red circle BREAK a blue square"]] * len(none.tokenizers))):
        expected = tokenizer("a red circle BREAK a blue square", padding="max_length", max_length=77).input_ids
        assert chunks[0].input_ids[0].tolist() == expected
    assert clip(pipe).encode("a red circle BREAK a blue square").prompt_embeds.shape[1] == 2 * 77


@torch.no_grad()
def test_none_still_chunks_long_prompts(pipe):
    text = "two (blue) squares, " * 8  # 136 tokens: two 75-token windows, cut after a comma
    encoded = clip(pipe, "none").encode(text)
    assert encoded.prompt_embeds.shape[1] == 2 * 77
    assert_same(encoded, clip(pipe).encode("two \\(blue\\) squares, " * 8))


@torch.no_grad()
def test_none_skips_weight_and_nesting_bounds_but_checks_characters(sd):
    none, original = CLIPConditioner.from_pipeline(sd, emphasis="none"), CLIPConditioner.from_pipeline(sd)
    for prompt in ["a (red:1000) circle", "(" * 65 + "red", "(red:1.3" * 70]:
        with pytest.raises(ValueError):
            original.encode(prompt)
        assert torch.isfinite(none.encode(prompt).prompt_embeds).all()
    for prompt in ["a red\x00 circle", "a \ud800 circle", "a circle\x7f"]:
        with pytest.raises(ValueError) as error:
            none.encode(prompt)
        assert "\n" not in str(error.value) and "expected text" in str(error.value)
    with pytest.raises(ValueError, match="control character"):
        none.encode("fine", "bad\x1b negative")


# --- Long-CLIP passes the option through ----------------------------------------------------------


@torch.no_grad()
def test_long_clip_modes(pipe):
    def long_clip(emphasis):
        return LongCLIPConditioner.from_pipeline(pipe, emphasis=emphasis)

    assert LongCLIPConditioner.from_pipeline(pipe).emphasis == "original"
    assert_same(long_clip("Ignore").encode("a (red:1.5) [circle]"), long_clip("original").encode("a red circle"))
    assert_same(long_clip("None").encode("(red:1.3)"), long_clip("original").encode("\\(red:1.3\\)"))
    plain = long_clip("original").encode("a red circle").prompt_embeds
    no_norm = long_clip("no_norm").encode("a (red:1.5) circle").prompt_embeds
    expected = plain.clone()
    expected[0, 2:5] = plain[0, 2:5] * 1.5
    assert torch.equal(no_norm, expected)
