"""SD3CLIPConditioner on a tiny StableDiffusion3Pipeline: the pipeline's own tensors and images, then A1111 syntax.

SD3 cases live here rather than in tests/conformance/pipeline_cases.py: the suite would run every
registered conditioner (long-clip, projected, llm-adapter, concat, ELLA, plugins) on them, and those
do not serve transformer pipelines yet.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from condkit import generate, load_conditioner
from condkit.conditioning.sd3_clip import SD3CLIPConditioner
from condkit.pipelines.generate import GenerationSettings, PromptRequest
from tiny_transformer_models import tiny_sd3_pipeline

PROMPTS = ["a red cube", "a blue ball"]
NEGATIVES = ["", "blurry"]
LENGTH = 32  # T5 tokens; the pipeline default (256) is tested once


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


def reference(pipe, **kwargs):
    with torch.no_grad():
        return pipe.encode_prompt(prompt=kwargs.pop("prompt"), prompt_2=kwargs.pop("prompt_2", None),
                                  prompt_3=kwargs.pop("prompt_3", None), **kwargs)


def ours(conditioning):
    return (conditioning.prompt_embeds, conditioning.negative_prompt_embeds, conditioning.pooled_prompt_embeds,
            conditioning.negative_pooled_prompt_embeds)


def assert_all_equal(expected, got):
    for index, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert a.shape == b.shape and torch.equal(a, b), index


def test_load_conditioner_clip_gives_the_sd3_conditioner(pipe):
    conditioner = load_conditioner("clip", pipe)
    assert isinstance(conditioner, SD3CLIPConditioner)
    assert conditioner.max_sequence_length == 256  # the pipeline's default


@pytest.mark.parametrize("length", [LENGTH, 256])
def test_tensors_are_the_pipelines_own(pipe, length):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=length)
    expected = reference(pipe, prompt=PROMPTS, negative_prompt=NEGATIVES, max_sequence_length=length)
    assert_all_equal(expected, ours(conditioner.encode(PROMPTS, NEGATIVES)))
    assert expected[0].shape == (2, 77 + length, 96)


def test_per_encoder_prompts_omitted_negative_and_copies_are_the_pipelines_own(pipe):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    texts = {"prompt_2": ["a green cone", "x"], "prompt_3": ["a tall tower", "y"], "negative_prompt_2": ["dark", "dim"],
             "negative_prompt_3": ["noisy", "flat"]}
    expected = reference(pipe, prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2,
                         max_sequence_length=LENGTH, **texts)
    assert_all_equal(expected, ours(conditioner.encode(PROMPTS, NEGATIVES, 2, **texts)))
    assert_all_equal(reference(pipe, prompt=PROMPTS, max_sequence_length=LENGTH), ours(conditioner.encode(PROMPTS)))


def test_clip_skip_matches_the_pipelines_positive(pipe):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH, clip_skip=1)
    expected = reference(pipe, prompt=PROMPTS, negative_prompt=NEGATIVES, clip_skip=1, max_sequence_length=LENGTH)
    got = conditioner.encode(PROMPTS, NEGATIVES)
    assert torch.equal(got.prompt_embeds, expected[0]) and torch.equal(got.pooled_prompt_embeds, expected[2])
    unskipped = reference(pipe, prompt=PROMPTS, negative_prompt=NEGATIVES, max_sequence_length=LENGTH)
    assert not torch.equal(got.prompt_embeds, unskipped[0])
    # diffusers encodes negatives without clip_skip; here they come from the same layer as the positive
    assert not torch.equal(got.negative_prompt_embeds[:, :77], unskipped[1][:, :77])


def test_without_t5_the_t5_part_is_zeros_as_in_diffusers():
    pipe = tiny_sd3_pipeline(with_t5=False)
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    expected = reference(pipe, prompt=PROMPTS, negative_prompt=NEGATIVES, max_sequence_length=LENGTH)
    got = conditioner.encode(PROMPTS, NEGATIVES)
    assert_all_equal(expected, ours(got))
    assert not got.prompt_embeds[:, 77:].any()


@torch.no_grad()
def test_images_equal_the_pipeline_called_with_prompt_strings(pipe):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    settings = GenerationSettings(steps=2, guidance=5.0, seed=3, height=32, width=32, batch_size=2)
    requests = [PromptRequest(p, n) for p, n in zip(PROMPTS, NEGATIVES)]
    results = generate(pipe, conditioner, requests, settings, max_sequence_length=LENGTH)
    expected = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                    generator=[torch.Generator().manual_seed(seed) for seed in (3, 4)], max_sequence_length=LENGTH).images
    for result, image in zip(results, expected, strict=True):
        assert np.array_equal(np.asarray(result.image), np.asarray(image))


def test_saves_and_loads_back_as_clip(pipe, tmp_path):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH, t5_weighting="multiply", clip_skip=1)
    loaded = load_conditioner(conditioner.save_pretrained(tmp_path / "sd3"), pipe)
    assert isinstance(loaded, SD3CLIPConditioner) and loaded.config == conditioner.config
    assert_all_equal(ours(conditioner.encode(PROMPTS, NEGATIVES)), ours(loaded.encode(PROMPTS, NEGATIVES)))


def test_weights_act_on_clip_and_t5_tokens(pipe):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    plain = conditioner.encode("a red cube").prompt_embeds
    assert torch.equal(conditioner.encode("a (red:1) cube").prompt_embeds, plain)
    weighted = conditioner.encode("a (red:1.5) cube").prompt_embeds
    clip_changed = (weighted[0, :77] != plain[0, :77]).any(-1)
    assert clip_changed.any()
    t5_changed = (weighted[0, 77:] != plain[0, 77:]).any(-1).nonzero().flatten().tolist()
    assert t5_changed == [1, 2, 3]  # "▁a", then "▁r" "e" "d": only the weighted tokens move on T5


def test_break_and_long_clip_prompts_add_windows_before_t5(pipe, caplog):
    length = 128  # holds the whole long prompt on T5, so only CLIP truncates below
    conditioner = load_conditioner("clip", pipe, max_sequence_length=length)
    split = conditioner.encode("a red cube BREAK a blue ball")
    assert split.prompt_embeds.shape == (1, 2 * 77 + length, 96)
    long_prompt = "a red cube, " * 10  # 120 characters: two CLIP windows on the byte tokenizer
    both = conditioner.encode(long_prompt)
    assert both.prompt_embeds.shape == (1, 2 * 77 + length, 96)
    truncating = load_conditioner("clip", pipe, max_sequence_length=length, max_chunks=1)
    with caplog.at_level(logging.WARNING):
        first = truncating.encode(long_prompt)
    assert first.prompt_embeds.shape == (1, 77 + length, 96)
    assert "prompt truncated to 1 chunk(s) of 77 tokens: dropped 15 of 90 tokens" in caplog.text
    # a batch of one window rounds a little differently on CPU from a batch of two
    torch.testing.assert_close(first.pooled_prompt_embeds, both.pooled_prompt_embeds)  # pooled from the first window
    torch.testing.assert_close(first.prompt_embeds[:, :77], both.prompt_embeds[:, :77])
    assert torch.equal(first.prompt_embeds[:, 77:], both.prompt_embeds[:, 2 * 77 :])


def test_t5_beyond_max_sequence_length_warns_with_the_count(pipe, caplog):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=8)
    with caplog.at_level(logging.WARNING):
        conditioner.encode("a red cube")  # 8 tokens + "</s>" in 8 places: one dropped
    assert "dropped 1 of 8 tokens" in caplog.text


@pytest.mark.parametrize("options, message", [
    ({"max_sequence_length": 513}, "max_sequence_length must be an integer from 2 to 512, got 513"),
    ({"t5_weighting": "add"}, "t5_weighting must be one of 'interpolate', 'multiply', got 'add'"),
    ({"clip_skip": 9}, "clip_skip must be between 0 and 3"),
])
def test_bad_options_are_refused_in_one_line(pipe, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_conditioner("clip", pipe, **options)


@pytest.mark.parametrize("prompt", ["a [red:blue:2] cube", "a [red|blue] cube", "a cube AND a ball"])
def test_prompt_editing_alternation_and_and_are_refused_in_one_line(pipe, prompt):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    with pytest.raises(ValueError, match="A1111 prompt editing, alternation and AND are not supported on SD3/Flux"):
        conditioner.encode(prompt)
    assert conditioner.encode("a [red] cube").prompt_embeds.shape == (1, 77 + LENGTH, 96)  # de-emphasis still is syntax


def test_denoiser_inputs_are_the_positive_rows_of_embed(pipe):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH, clip_skip=1)
    hidden, pooled = conditioner.denoiser_inputs(PROMPTS, torch.tensor([500.0, 500.0]))
    with torch.no_grad():
        full = conditioner.embed(PROMPTS, NEGATIVES)
    # with gradients on, attention may take another kernel than under no_grad: equal up to rounding
    torch.testing.assert_close(hidden, full.prompt_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, full.pooled_prompt_embeds, rtol=0, atol=1e-5)
    assert hidden.shape == (2, 77 + LENGTH, 96)
