"""CLIPConditioner against diffusers' own encode_prompt, and the A1111 behaviours on top of it."""

import pytest
import torch

from condkit.conditioning.registry import get_conditioner_class
from condkit.conditioning.clip import CLIPConditioner, apply_emphasis
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red circle", "two blue squares, to the left"]
NEGATIVES = ["blurry", "a green triangle"]


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_sd_pipeline()
    # diffusers 0.42 reads text_encoder.text_model.final_layer_norm for clip_skip, a path that
    # transformers 5.x removed; alias it (outside nn.Module registration) so diffusers' own
    # reference code can run.
    object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    return pipe


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_sd_bit_identical_to_encode_prompt(sd, clip_skip):
    ours = CLIPConditioner.from_pipeline(sd, clip_skip=clip_skip).encode(PROMPTS, NEGATIVES, num_images_per_prompt=2)
    positive, negative = sd.encode_prompt(PROMPTS, "cpu", 2, True, negative_prompt=NEGATIVES, clip_skip=clip_skip)
    assert torch.equal(ours.prompt_embeds, positive)
    if clip_skip is None:
        assert torch.equal(ours.negative_prompt_embeds, negative)
    else:
        # diffusers ignores clip_skip for the negative prompt; we apply it to both sides (as A1111),
        # so the negative equals diffusers' encoding of the negative text as a prompt.
        negative_as_prompt, _ = sd.encode_prompt(NEGATIVES, "cpu", 2, False, clip_skip=clip_skip)
        assert torch.equal(ours.negative_prompt_embeds, negative_as_prompt)


@torch.no_grad()
def test_sd_omitted_negative_is_empty_prompt(sd):
    ours = CLIPConditioner.from_pipeline(sd).encode("a red circle")
    _, negative = sd.encode_prompt("a red circle", "cpu", 1, True)
    assert torch.equal(ours.negative_prompt_embeds, negative)


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("negative", [None, NEGATIVES])
def test_sdxl_bit_identical_to_encode_prompt(sdxl, clip_skip, negative):
    ours = CLIPConditioner.from_pipeline(sdxl, clip_skip=clip_skip).encode(PROMPTS, negative, num_images_per_prompt=2)
    reference = sdxl.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=2, do_classifier_free_guidance=True,
        negative_prompt=negative, clip_skip=clip_skip,
    )
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    for name, expected in zip(names, reference):
        if name == "negative_prompt_embeds" and clip_skip is not None and negative is not None:
            continue  # diffusers ignores clip_skip for the negative (see the SD test)
        assert torch.equal(getattr(ours, name), expected), name
    if negative is None:
        assert not ours.negative_prompt_embeds.any() and not ours.negative_pooled_prompt_embeds.any()


@torch.no_grad()
def test_weights_scale_tokens_and_keep_the_chunk_mean(sd):
    conditioner = CLIPConditioner.from_pipeline(sd)
    plain = conditioner.encode("a red circle").prompt_embeds
    weighted = conditioner.encode("a (red:1.5) circle").prompt_embeds
    assert not torch.equal(plain, weighted)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    # byte tokenizer: BOS, "a</w>", then "red" is tokens 2..4; everything else keeps weight 1
    rescale = weighted[0, 5:] / plain[0, 5:]
    torch.testing.assert_close(rescale, torch.full_like(rescale, rescale[0, 0].item()))
    torch.testing.assert_close(weighted[0, 2:5], plain[0, 2:5] * 1.5 * rescale[0, 0])


def test_apply_emphasis_leaves_unweighted_chunks_untouched():
    hidden = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(2, 3, 5)
    weights[1, 2, 1] = 2.0
    out = apply_emphasis(hidden, weights)
    assert torch.equal(out[0], hidden[0]) and torch.equal(out[1, :2], hidden[1, :2])
    assert not torch.equal(out[1, 2], hidden[1, 2])
    torch.testing.assert_close(out[1, 2].mean(), hidden[1, 2].mean())


@torch.no_grad()
@pytest.mark.parametrize("pipe_name", ["sd", "sdxl"])
def test_long_prompts_chunk_and_pad_negative_to_the_same_length(pipe_name, request):
    pipe = request.getfixturevalue(pipe_name)
    conditioner = CLIPConditioner.from_pipeline(pipe)
    long_prompt = "word " * 40  # 160 tokens with the byte tokenizer: 3 chunks of up to 75
    cond = conditioner.encode([long_prompt, "short"], ["(ugly:1.2)", "x"])
    assert cond.prompt_embeds.shape[1] == 3 * 77
    assert cond.negative_prompt_embeds.shape == cond.prompt_embeds.shape
    short_alone = conditioner.encode("short").prompt_embeds
    # the short prompt's first chunk is the same whatever the batch's chunk count
    torch.testing.assert_close(cond.prompt_embeds[1:2, :77], short_alone, atol=1e-6, rtol=0)
    # and the pipeline accepts the chunked tensors
    image = pipe(**cond.kwargs(), num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (2, 32, 32, 3)


@torch.no_grad()
def test_break_starts_a_new_chunk(sd):
    conditioner = CLIPConditioner.from_pipeline(sd)
    split = conditioner.encode("a red BREAK circle").prompt_embeds
    assert split.shape[1] == 2 * 77
    torch.testing.assert_close(split[:, :77], conditioner.encode("a red").prompt_embeds)
    torch.testing.assert_close(split[:, 77:], conditioner.encode("circle").prompt_embeds)


@torch.no_grad()
def test_max_chunks_truncates_with_a_warning_that_counts_tokens(sd, caplog):
    conditioner = CLIPConditioner.from_pipeline(sd, max_chunks=1)
    with caplog.at_level("WARNING", logger="condkit"):
        cond = conditioner.encode("word " * 40)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "dropped 85 of 160 tokens" in caplog.text
    assert cond.prompt_embeds.shape[1] == 77


def test_registry_and_bad_options(sd):
    assert get_conditioner_class("clip") is CLIPConditioner
    with pytest.raises(ValueError, match="unknown conditioner 'nope'; expected one of: .*clip"):
        get_conditioner_class("nope")
    with pytest.raises(ValueError, match="clip_skip must be between 0 and 3 for these 3-layer text encoders, got -1"):
        CLIPConditioner.from_pipeline(sd, clip_skip=-1)
    with pytest.raises(ValueError, match="got 3 negative prompts for 2 prompts"):
        CLIPConditioner.from_pipeline(sd).encode(["a", "b"], ["x", "y", "z"])
