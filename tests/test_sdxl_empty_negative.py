"""An explicit "" negative on SDXL: text, as diffusers' encode_prompt (default), or zeros, as A1111 (empty_negative="zeros").

Both only where the pipeline forces zeros for empty prompts (force_zeros_for_empty_prompt); an omitted negative
gives zeros either way.
"""

import pytest
import torch

from condkit import load_conditioner
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

NAMES = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]


@pytest.fixture(scope="module")
def sdxl():
    pipe = tiny_sdxl_pipeline()
    assert pipe.config.force_zeros_for_empty_prompt
    return pipe


def diffusers_encoding(pipe, negative_prompt):
    with torch.no_grad():
        tensors = pipe.encode_prompt("a red cube", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                     negative_prompt=negative_prompt)
    return dict(zip(NAMES, tensors))


def assert_same(conditioning, expected):
    for name in NAMES:
        assert torch.equal(getattr(conditioning, name), expected[name]), name


def test_default_encodes_an_explicit_empty_negative_as_text_like_diffusers(sdxl):
    clip = load_conditioner("clip", sdxl)
    assert clip.empty_negative == "text"
    conditioning = clip.encode("a red cube", "")
    assert_same(conditioning, diffusers_encoding(sdxl, ""))
    assert conditioning.negative_prompt_embeds.abs().sum() > 0


def test_zeros_gives_zeros_for_an_explicit_empty_negative_like_a1111(sdxl):
    clip = load_conditioner("clip", sdxl, empty_negative="zeros")
    conditioning = clip.encode("a red cube", "")
    assert not conditioning.negative_prompt_embeds.any() and not conditioning.negative_pooled_prompt_embeds.any()
    assert_same(conditioning, diffusers_encoding(sdxl, None))  # the same as an omitted negative
    assert_same(clip.encode("a red cube"), diffusers_encoding(sdxl, None))


@pytest.mark.parametrize("empty_negative", ["text", "zeros"])
def test_non_empty_negatives_are_text_in_both_modes(sdxl, empty_negative):
    clip = load_conditioner("clip", sdxl, empty_negative=empty_negative)
    assert_same(clip.encode("a red cube", "blurry"), diffusers_encoding(sdxl, "blurry"))
    mixed = clip.encode(["a red cube", "a blue ball"], ["", "blurry"])  # as A1111: zeros only when every negative is empty
    assert mixed.negative_prompt_embeds[0].abs().sum() > 0


def test_zeros_needs_a_pipeline_that_forces_zeros():
    pipe = tiny_sd_pipeline()
    text, zeros = load_conditioner("clip", pipe), load_conditioner("clip", pipe, empty_negative="zeros")
    assert torch.equal(text.encode("a red cube", "").negative_prompt_embeds, zeros.encode("a red cube", "").negative_prompt_embeds)


def test_long_clip_takes_the_option_too(sdxl):
    conditioning = load_conditioner("long-clip", sdxl, empty_negative="zeros").encode("a red cube", "")
    assert not conditioning.negative_prompt_embeds.any()


def test_the_option_is_saved_and_a_bad_value_is_refused(sdxl, tmp_path):
    clip = load_conditioner("clip", sdxl, empty_negative="zeros")
    folder = clip.save_pretrained(tmp_path / "saved")
    assert load_conditioner(folder, sdxl).empty_negative == "zeros"
    with pytest.raises(ValueError, match=r"empty_negative must be one of 'text', 'zeros', got 'none'"):
        load_conditioner("clip", sdxl, empty_negative="none")
