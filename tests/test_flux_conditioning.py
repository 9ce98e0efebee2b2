"""FluxCLIPConditioner on a tiny FluxPipeline: the pipeline's own tensors and images (negatives with
true_cfg_scale included), then prompt syntax on T5.

Flux cases live here rather than in tests/conformance/pipeline_cases.py (see test_sd3_conditioning.py).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from condkit import generate, load_conditioner
from condkit.conditioning.flux_clip import FluxCLIPConditioner
from condkit.conditioning.t5_prompts import t5_tokens
from condkit.pipelines.generate import GenerationSettings, PromptRequest
from tiny_transformer_models import tiny_flux_pipeline

PROMPTS = ["a red cube", "a blue ball"]
NEGATIVES = ["", "blurry"]
LENGTH = 32


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def reference(pipe, prompt, prompt_2=None, length=LENGTH, copies=1):
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2, max_sequence_length=length, num_images_per_prompt=copies)
    return embeds, pooled


def test_load_conditioner_clip_gives_the_flux_conditioner(pipe):
    conditioner = load_conditioner("clip", pipe)
    assert isinstance(conditioner, FluxCLIPConditioner) and conditioner.max_sequence_length == 512


@pytest.mark.parametrize("length", [LENGTH, 512])
def test_tensors_and_true_cfg_negatives_are_the_pipelines_own(pipe, length):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=length)
    got = conditioner.encode(PROMPTS, NEGATIVES, 2, prompt_2=["a green cone", "x"])
    embeds, pooled = reference(pipe, PROMPTS, ["a green cone", "x"], length, copies=2)
    negative_embeds, negative_pooled = reference(pipe, NEGATIVES, length=length, copies=2)  # as __call__ for true CFG
    for expected, ours in [(embeds, got.prompt_embeds), (pooled, got.pooled_prompt_embeds),
                           (negative_embeds, got.negative_prompt_embeds), (negative_pooled, got.negative_pooled_prompt_embeds)]:
        assert expected.shape == ours.shape and torch.equal(expected, ours)


def test_no_negative_prompt_gives_no_negatives(pipe):
    got = load_conditioner("clip", pipe, max_sequence_length=LENGTH).encode(PROMPTS)
    assert got.negative_prompt_embeds is None and got.negative_pooled_prompt_embeds is None
    assert set(got.kwargs()) == {"prompt_embeds", "pooled_prompt_embeds"}


@pytest.mark.parametrize("true_cfg_scale", [1.0, 2.0])
@torch.no_grad()
def test_images_equal_the_pipeline_called_with_prompt_strings(pipe, true_cfg_scale):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    settings = GenerationSettings(steps=2, guidance=3.5, seed=5, height=32, width=32, batch_size=2)
    requests = [PromptRequest(p, n) for p, n in zip(PROMPTS, NEGATIVES)]
    results = generate(pipe, conditioner, requests, settings, max_sequence_length=LENGTH, true_cfg_scale=true_cfg_scale)
    expected = pipe(PROMPTS, negative_prompt=NEGATIVES, true_cfg_scale=true_cfg_scale, num_inference_steps=2,
                    guidance_scale=3.5, height=32, width=32, max_sequence_length=LENGTH,
                    generator=[torch.Generator().manual_seed(seed) for seed in (5, 6)]).images
    for result, image in zip(results, expected, strict=True):
        assert np.array_equal(np.asarray(result.image), np.asarray(image))


def test_saves_and_loads_back_as_clip(pipe, tmp_path):
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH, t5_weighting="multiply")
    loaded = load_conditioner(conditioner.save_pretrained(tmp_path / "flux"), pipe)
    assert isinstance(loaded, FluxCLIPConditioner) and loaded.config == conditioner.config
    for name, tensor in conditioner.encode(PROMPTS, NEGATIVES).tensors().items():
        assert torch.equal(tensor, loaded.encode(PROMPTS, NEGATIVES).tensors()[name]), name


def test_t5_weights_interpolate_from_the_empty_prompt_or_multiply(pipe):
    interpolating = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    multiplying = load_conditioner("clip", pipe, max_sequence_length=LENGTH, t5_weighting="multiply")
    plain = interpolating.encode("a red cube")
    assert torch.equal(interpolating.encode("a (red:1) cube").prompt_embeds, plain.prompt_embeds)
    weighted_tokens = [1, 2, 3]  # "▁r" "e" "d" after "▁a"
    tokens = t5_tokens(pipe.tokenizer_2, ["a (red:1.5) cube"], LENGTH)
    assert tokens.input_ids.tolist() == t5_tokens(pipe.tokenizer_2, ["a red cube"], LENGTH).input_ids.tolist()
    assert (tokens.weights[0] != 1).nonzero().flatten().tolist() == weighted_tokens

    empty = interpolating.encode("").prompt_embeds
    removed = interpolating.encode("a (red:0) cube").prompt_embeds
    assert torch.equal(removed[0, weighted_tokens], empty[0, weighted_tokens])  # weight 0: the empty prompt's states
    scaled = multiplying.encode("a (red:1.5) cube")
    torch.testing.assert_close(scaled.prompt_embeds[0, weighted_tokens], plain.prompt_embeds[0, weighted_tokens] * 1.5)
    others = [i for i in range(LENGTH) if i not in weighted_tokens]
    for got in (removed, scaled.prompt_embeds):
        assert torch.equal(got[0, others], plain.prompt_embeds[0, others])
    assert torch.equal(scaled.pooled_prompt_embeds, plain.pooled_prompt_embeds)  # CLIP-L's pooled vector ignores weights


def test_emphasis_none_reads_brackets_as_text(pipe):
    literal = load_conditioner("clip", pipe, max_sequence_length=LENGTH, emphasis="none")
    tokens = t5_tokens(pipe.tokenizer_2, ["a (red:1.5) cube"], LENGTH, parse_emphasis=False)
    assert pipe.tokenizer_2.convert_tokens_to_ids("▁(") in tokens.input_ids[0].tolist()
    with torch.no_grad():
        expected, _, _ = pipe.encode_prompt("a (red:1.5) cube", max_sequence_length=LENGTH)
    assert torch.equal(literal.encode("a (red:1.5) cube").prompt_embeds, expected)


def test_t5_beyond_max_sequence_length_warns_with_the_count(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        load_conditioner("clip", pipe, max_sequence_length=4).encode("a red cube")
    assert "T5 prompt truncated to max_sequence_length=4 tokens: dropped 5 of 8 tokens" in caplog.text


def test_bad_input_is_refused_in_one_line(pipe):
    with pytest.raises(ValueError, match="clip_skip=1 does not apply to Flux"):
        load_conditioner("clip", pipe, clip_skip=1)
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    with pytest.raises(ValueError, match="negative_prompt_2 needs negative_prompt on Flux"):
        conditioner.encode(PROMPTS, negative_prompt_2="dark")


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_lora_scale_matches_encode_prompt(family):
    from peft import LoraConfig, inject_adapter_in_model

    from tiny_transformer_models import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, pipe.text_encoder)  # what load_lora_weights does, without a file
    if family == "sd3":
        inject_adapter_in_model(config, pipe.text_encoder_2)
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH, lora_scale=0.5)
    if family == "sd3":
        expected = pipe.encode_prompt(PROMPTS, None, None, negative_prompt=NEGATIVES, max_sequence_length=LENGTH, lora_scale=0.5)
        got = conditioner.encode(PROMPTS, NEGATIVES)
        ours = [got.prompt_embeds, got.negative_prompt_embeds, got.pooled_prompt_embeds, got.negative_pooled_prompt_embeds]
    else:
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=LENGTH, lora_scale=0.5)
        expected, got = [embeds, pooled], conditioner.encode(PROMPTS)
        ours = [got.prompt_embeds, got.pooled_prompt_embeds]
    unscaled = load_conditioner("clip", pipe, max_sequence_length=LENGTH).encode(PROMPTS).pooled_prompt_embeds
    assert not torch.equal(unscaled, ours[-2 if family == "sd3" else 1])  # the scale changed something
    for a, b in zip(expected, ours, strict=True):
        assert torch.equal(a, b)
