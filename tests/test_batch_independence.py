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


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
@pytest.mark.parametrize("conditioner_name", ["clip", "long-clip"])
def test_every_image_of_a_mixed_batch_equals_the_image_made_alone(make_pipe, conditioner_name):
    pipe = make_pipe()
    conditioner = load_conditioner(conditioner_name, pipe)
    requests = [PromptRequest(SHORT, seed=1), PromptRequest(LONG, "blurry", seed=2), PromptRequest(SHORT, None, seed=3),
                PromptRequest(LONGER, seed=4), PromptRequest("a blue square", "dark", seed=5)]
    settings = GenerationSettings(steps=2, height=32, width=32, batch_size=4)
    together = generate(pipe, conditioner, requests, settings)
    for request, result in zip(requests, together):
        alone = generate(pipe, conditioner, [request], settings)[0]
        assert (result.prompt, result.seed) == (request.prompt, request.seed)
        difference = np.abs(np.asarray(result.image, dtype=int) - np.asarray(alone.image, dtype=int)).max()
        assert difference == 0, (request.prompt[:20], difference)


def test_batches_hold_only_conditionings_of_one_shape():
    pipe = tiny_sd_pipeline()
    clip = load_conditioner("clip", pipe)
    encoded = [clip.encode(prompt) for prompt in (SHORT, LONG, SHORT, SHORT, LONG, SHORT)]
    assert batches_of_equal_shape(encoded, 2) == [[0, 2], [3, 5], [1, 4]]
    assert {tuple(encoded[i].prompt_embeds.shape) for i in (1, 4)} != {tuple(encoded[0].prompt_embeds.shape)}
    assert torch.equal(encoded[0].prompt_embeds, encoded[2].prompt_embeds)
