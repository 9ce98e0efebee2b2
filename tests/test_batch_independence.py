"""An image depends only on its own prompt, negative, seed and settings — never on its batch-mates."""

import numpy as np
import pytest
import torch

from condkit import GenerationSettings, PromptRequest, generate, load_conditioner
from condkit.pipelines.generate import batches_of_equal_shape
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

SHORT = "a red circle"
LONG = " ".join(["a red circle to the left of a blue square"] * 12)  # 2+ chunks of 75 tokens in the byte tokenizer
LONGER = " ".join(["a green triangle above a big yellow star"] * 20)


# Prompts of the same token length as SHORT, LONG and LONGER, to stand in as other batch-mates.
OTHER_OF_LENGTH = {
    SHORT: "a blue star",
    "a blue cube": "a green star",
    LONG: " ".join(["a blue square to the left of a red circle"] * 12),
    LONGER: " ".join(["a yellow star above a big green triangle"] * 20),
}


CHUNKS = {SHORT: 1, "a blue cube": 1, LONG: 6, LONGER: 9}  # 75-token chunks in the tiny byte-level tokenizer
LONGEST = " ".join(["a pink cross below a small cyan diamond"] * 30)


def with_other_batch_mates(requests, keep):
    """The same requests, each but `keep` replaced by another prompt, negative and seed: of the same
    length as the one it replaces when both share `keep`'s batch (so that batch keeps its size), else
    LONGEST, a length no request has (so a batch that padded to its longest member would differ)."""
    kept_chunks = CHUNKS[requests[keep].prompt]
    return [request if index == keep else PromptRequest(
                OTHER_OF_LENGTH[request.prompt] if CHUNKS[request.prompt] == kept_chunks else LONGEST, "dull", seed=100 + index)
            for index, request in enumerate(requests)]


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
@pytest.mark.parametrize("conditioner_name", ["clip", "long-clip"])
def test_every_image_of_a_mixed_batch_is_the_same_whatever_its_batch_mates(make_pipe, conditioner_name):
    """Exact: swapping every batch-mate for other prompts, negatives and seeds changes no pixel.

    Against an image generated *alone* the batch size differs, and CPU and GPU kernels round a batch of
    one differently from a batch of four (about 3e-7 in the UNet's output); that can move a pixel
    by one level, which benchmarks/batch_independence.py measures. `batch_size=1` is exact to it."""
    pipe = make_pipe()
    conditioner = load_conditioner(conditioner_name, pipe)
    requests = [PromptRequest(SHORT, seed=1), PromptRequest(LONG, "blurry", seed=2), PromptRequest(SHORT, None, seed=3),
                PromptRequest(LONGER, seed=4), PromptRequest("a blue cube", "dark", seed=5), PromptRequest(LONG, seed=6)]
    settings = GenerationSettings(steps=2, height=32, width=32, batch_size=4)
    together = generate(pipe, conditioner, requests, settings)
    for index, request in enumerate(requests):
        elsewhere = generate(pipe, conditioner, with_other_batch_mates(requests, index), settings)[index]
        assert (together[index].prompt, together[index].seed) == (request.prompt, request.seed)
        difference = np.abs(np.asarray(together[index].image, dtype=int) - np.asarray(elsewhere.image, dtype=int)).max()
        assert difference == 0, (request.prompt[:20], difference)


def test_with_batch_size_one_an_image_equals_the_image_made_alone():
    pipe = tiny_sd_pipeline()
    conditioner = load_conditioner("clip", pipe)
    requests = [PromptRequest(prompt, seed=seed) for seed, prompt in enumerate(["a red cube", "a blue cube", LONG, "a (blue:1.2) cube"])]
    settings = GenerationSettings(steps=2, height=32, width=32, batch_size=1)
    together = generate(pipe, conditioner, requests, settings)
    for request, result in zip(requests, together):
        alone = generate(pipe, conditioner, [request], settings)[0]
        assert np.array_equal(np.asarray(result.image), np.asarray(alone.image)), request.prompt[:20]


def test_batches_hold_only_conditionings_of_one_shape():
    pipe = tiny_sd_pipeline()
    clip = load_conditioner("clip", pipe)
    encoded = [clip.encode(prompt) for prompt in (SHORT, LONG, SHORT, SHORT, LONG, SHORT)]
    assert batches_of_equal_shape(encoded, 2) == [[0, 2], [3, 5], [1, 4]]
    assert {tuple(encoded[i].prompt_embeds.shape) for i in (1, 4)} != {tuple(encoded[0].prompt_embeds.shape)}
    assert torch.equal(encoded[0].prompt_embeds, encoded[2].prompt_embeds)
