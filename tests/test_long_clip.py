"""Long-CLIP: knowledge-preserved stretching of position tables, and the 248-token conditioner."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condkit.conditioning.registry import get_conditioner_class
from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.long_clip import (
    LongCLIPConditioner,
    position_count,
    stretch_position_table,
    stretch_text_model,
    stretch_tokenizer,
    stretched_length,
)
from tiny_models import byte_tokenizer, tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


# --- the position table -------------------------------------------------------------------------


def test_long_clip_numbers_on_a_77_row_table():
    old = torch.randn(77, 6, dtype=torch.float64)
    new = stretch_position_table(old)
    assert new.shape == (248, 6) and stretched_length(77) == 248
    assert torch.equal(new[:20], old[:20])
    assert torch.equal(new[20], old[20]) and torch.equal(new[24], old[21]) and torch.equal(new[244], old[76])
    torch.testing.assert_close(new[22], 0.5 * old[20] + 0.5 * old[21])
    torch.testing.assert_close(new[21], 0.75 * old[20] + 0.25 * old[21])
    # p = 247: s = 76.75 lies past the last row; lo is capped at 75, f = 1.75 extrapolates.
    torch.testing.assert_close(new[247], -0.75 * old[75] + 1.75 * old[76])


@settings(max_examples=40, deadline=None)
@given(length=st.integers(2, 40), keep_fraction=st.floats(0, 1, exclude_max=True), ratio=st.integers(1, 6))
def test_stretching_keeps_linear_tables_linear(length, keep_fraction, ratio):
    keep = 1 + int(keep_fraction * (length - 1))
    slope, offset = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    old = offset + torch.arange(length, dtype=torch.float64)[:, None] * slope
    new = stretch_position_table(old, keep, ratio)
    assert new.shape[0] == ratio * length - (ratio - 1) * keep
    p = torch.arange(new.shape[0], dtype=torch.float64)
    source = torch.where(p < keep, p, keep + (p - keep) / ratio)
    torch.testing.assert_close(new, offset + source[:, None] * slope)


def test_ratio_one_is_identity():
    old = torch.randn(77, 4)
    assert torch.equal(stretch_position_table(old, 20, 1), old)


@pytest.mark.parametrize(
    "keep, ratio, message",
    [(77, 4, r"keep must be an integer in \[1, 76\].*got 77"), (0, 4, "keep.*got 0"), (20, 0, "ratio must be an integer >= 1, got 0"), (20, 2.5, "ratio.*2.5")],
)
def test_bad_stretch_arguments_are_named(keep, ratio, message):
    with pytest.raises(ValueError, match=message):
        stretch_position_table(torch.zeros(77, 4), keep, ratio)


# --- stretching models and tokenizers -----------------------------------------------------------


@pytest.mark.parametrize("which", ["sd", "sdxl_1", "sdxl_2"])
def test_stretched_copy_of_every_encoder_kind(sd, sdxl, which):
    encoder = {"sd": sd.text_encoder, "sdxl_1": sdxl.text_encoder, "sdxl_2": sdxl.text_encoder_2}[which]
    original = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}
    stretched = stretch_text_model(encoder)
    assert position_count(stretched) == 248 and stretched.config.max_position_embeddings == 248
    assert position_count(encoder) == 77 and encoder.config.max_position_embeddings == 77
    # The input is untouched.
    assert all(torch.equal(tensor, original[name]) for name, tensor in encoder.state_dict().items())

    ids = torch.randint(0, 500, (2, 248))
    ids[:, -1] = 513  # end of text, for the pooled output
    with torch.no_grad():
        output = stretched(ids, output_hidden_states=True)
    assert output.last_hidden_state.shape == (2, 248, 32)
    # Knowledge preservation: the causal encoder's first 20 positions see only copied rows.
    with torch.no_grad():
        short = encoder(ids[:, :20]).last_hidden_state
    torch.testing.assert_close(output.last_hidden_state[:, :20], short, atol=1e-6, rtol=0)


def test_stretch_in_place_changes_the_model_and_keeps_requires_grad():
    encoder = tiny_sd_pipeline().text_encoder
    encoder.requires_grad_(False)
    same = stretch_text_model(encoder, keep=10, ratio=2, inplace=True)
    assert same is encoder and position_count(encoder) == 144
    assert encoder.embeddings.position_ids.shape == (1, 144)
    assert not encoder.embeddings.position_embedding.weight.requires_grad


def test_stretch_tokenizer_pads_to_length_with_the_chosen_token():
    tokenizer = byte_tokenizer()
    for pad_token, pad_id in [(None, tokenizer.pad_token_id), ("eos", tokenizer.eos_token_id), ("zero", 0)]:
        stretched = stretch_tokenizer(tokenizer, 248, pad_token)
        ids = stretched("abc", padding="max_length").input_ids
        assert len(ids) == 248 and ids[5:] == [pad_id] * 243
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="pad_token must be 'eos', 'zero' or None, got 'one'"):
        stretch_tokenizer(tokenizer, 248, "one")


# --- the conditioner ----------------------------------------------------------------------------


def test_registered_and_built_by_reusing_clip_conditioner(sd):
    assert get_conditioner_class("long-clip") is LongCLIPConditioner
    conditioner = LongCLIPConditioner.from_pipeline(sd)
    assert isinstance(conditioner, CLIPConditioner) and conditioner.window == 248
    # The pipeline keeps its own 77-position encoder.
    assert position_count(sd.text_encoder) == 77 and conditioner.text_encoders[0] is not sd.text_encoder


@torch.no_grad()
def test_sd_embeddings_are_the_stretched_encoder_with_a_248_window(sd):
    conditioner = LongCLIPConditioner.from_pipeline(sd, pad_to_multiple_of=None)
    prompt = "a red circle above a blue square"
    cond = conditioner.encode(prompt, "blurry", num_images_per_prompt=2)
    assert cond.prompt_embeds.shape == (2, 248, 32) == cond.negative_prompt_embeds.shape

    tokenizer = conditioner.tokenizers[0]
    ids = tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 248)
    expected = conditioner.text_encoders[0](ids).last_hidden_state
    assert torch.equal(cond.prompt_embeds[0], expected[0])


@torch.no_grad()
@pytest.mark.parametrize(
    "prompts,negative,rows",
    [
        (["a red circle"], None, 77),
        (["x" * 60, "x" * 100], None, 154),  # the longest prompt sets the length: 102 tokens → 2 × 77
        (["a red circle"], "y" * 80, 154),  # so does a longer negative
        (["x" * 240], None, 248),  # never past the window
        (["x" * 300], None, 248 + 77),  # a second window holding 54 tokens + BOS/EOS
    ],
)
def test_by_default_the_last_window_stops_at_a_multiple_of_77(sd, prompts, negative, rows):
    trimmed = LongCLIPConditioner.from_pipeline(sd).encode(prompts, negative)
    whole = LongCLIPConditioner.from_pipeline(sd, pad_to_multiple_of=None).encode(prompts, negative)
    assert trimmed.prompt_embeds.shape[1] == rows == trimmed.negative_prompt_embeds.shape[1]
    assert torch.equal(trimmed.prompt_embeds, whole.prompt_embeds[:, :rows])
    assert torch.equal(trimmed.negative_prompt_embeds, whole.negative_prompt_embeds[:, :rows])
    embedded = LongCLIPConditioner.from_pipeline(sd).embed(prompts).prompt_embeds  # training: positives alone set the length
    assert torch.equal(embedded, whole.prompt_embeds[:, : 77 if negative else rows])


def test_pad_to_multiple_of_outside_the_window_is_refused(sd):
    with pytest.raises(ValueError, match="pad_to_multiple_of must be between 1 and the window \\(248\\) or None, got 300"):
        LongCLIPConditioner.from_pipeline(sd, pad_to_multiple_of=300)


@torch.no_grad()
def test_long_prompts_chunk_into_windows_or_truncate_with_a_warning(sd, caplog):
    prompt = "x" * 300  # the byte tokenizer gives one token per character
    with caplog.at_level("WARNING", logger="condkit"):
        chunked = LongCLIPConditioner.from_pipeline(sd, pad_to_multiple_of=None).encode(prompt)
    assert not caplog.records
    assert chunked.prompt_embeds.shape == (1, 2 * 248, 32) == chunked.negative_prompt_embeds.shape

    truncating = LongCLIPConditioner.from_pipeline(sd, max_chunks=1)
    with caplog.at_level("WARNING", logger="condkit"):
        truncated = truncating.encode(prompt)
    assert "dropped 54 of 300 tokens" in caplog.text
    assert truncated.prompt_embeds.shape == (1, 248, 32)
    torch.testing.assert_close(truncated.prompt_embeds, chunked.prompt_embeds[:, :248])


@torch.no_grad()
def test_emphasis_syntax_works_as_in_clip_conditioner(sd):
    conditioner = LongCLIPConditioner.from_pipeline(sd)
    plain = conditioner.encode("a red circle").prompt_embeds
    weighted = conditioner.encode("a (red:1.5) circle").prompt_embeds
    assert not torch.allclose(plain, weighted)
    torch.testing.assert_close(weighted.mean(), plain.mean())


@torch.no_grad()
def test_pad_token_choice_changes_only_padded_positions_and_the_image(sd):
    prompt = "a red circle"
    eos = LongCLIPConditioner.from_pipeline(sd, pad_token="eos").encode(prompt)
    zero = LongCLIPConditioner.from_pipeline(sd, pad_token="zero").encode(prompt)
    end = len(sd.tokenizer(prompt).input_ids)  # BOS, content, EOS
    assert torch.equal(eos.prompt_embeds[:, :end], zero.prompt_embeds[:, :end])
    assert not torch.allclose(eos.prompt_embeds[:, end:], zero.prompt_embeds[:, end:])

    def image(cond):
        generator = torch.Generator().manual_seed(0)
        return sd(**cond.kwargs(), num_inference_steps=2, generator=generator, output_type="np").images

    assert np.abs(image(eos) - image(zero)).max() > 0


@torch.no_grad()
def test_sdxl_both_encoders_stretched_with_pooled_output(sdxl):
    conditioner = LongCLIPConditioner.from_pipeline(sdxl)
    assert [position_count(e) for e in conditioner.text_encoders] == [248, 248]
    assert position_count(sdxl.text_encoder) == 77 and position_count(sdxl.text_encoder_2) == 77
    assert conditioner.zero_empty_negative
    cond = conditioner.encode(["a red circle", "a green triangle"], num_images_per_prompt=2)
    assert cond.prompt_embeds.shape == (4, 77, 64)
    assert cond.pooled_prompt_embeds.shape == (4, 32)
    assert torch.count_nonzero(cond.negative_prompt_embeds) == 0
    images = sdxl(**cond.kwargs(), num_inference_steps=2, output_type="np", height=32, width=32).images
    assert images.shape == (4, 32, 32, 3) and np.isfinite(images).all()


def test_encoders_with_different_windows_are_refused(sd):
    encoder = sd.text_encoder
    with pytest.raises(ValueError, match=r"different numbers of positions \[77, 248\]"):
        LongCLIPConditioner([sd.tokenizer, sd.tokenizer], [encoder, stretch_text_model(encoder)])
