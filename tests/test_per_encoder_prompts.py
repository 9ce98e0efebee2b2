"""SDXL's prompt_2 / negative_prompt_2: each encoder its own text, exactly as diffusers' encode_prompt."""

import pytest
import torch

from condkit import load_conditioner
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline


@torch.no_grad()
@pytest.mark.parametrize("negative, negative_2", [("blurry", "dark"), ("blurry", None), (None, None)])
def test_per_encoder_prompts_match_diffusers(negative, negative_2):
    pipe = tiny_sdxl_pipeline()
    prompts, prompts_2 = ["a red circle", "a blue square"], ["watercolor", "an oil painting"]
    ours = load_conditioner("clip", pipe).encode(prompts, negative, prompt_2=prompts_2, negative_prompt_2=negative_2)
    theirs = pipe.encode_prompt(prompt=prompts, prompt_2=prompts_2, negative_prompt=negative, negative_prompt_2=negative_2,
                                device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, reference in zip(names, theirs):
        assert torch.equal(getattr(ours, name), reference), name
    same = load_conditioner("clip", pipe).encode(prompts, negative)
    assert not torch.equal(ours.pooled_prompt_embeds, same.pooled_prompt_embeds)  # the second encoder read prompt_2


@torch.no_grad()
def test_projected_passes_them_on_and_one_encoder_refuses_them():
    pipe = tiny_sdxl_pipeline()
    projected = load_conditioner("projected", pipe, projection="wiclp")
    clip = load_conditioner("clip", pipe)
    marked = projected.encode("a red circle", prompt_2="watercolor").prompt_embeds.as_subclass(torch.Tensor)
    assert torch.equal(marked[:, :-1], clip.encode("a red circle", prompt_2="watercolor").prompt_embeds)
    with pytest.raises(ValueError, match="apply to two text encoders"):
        load_conditioner("clip", tiny_sd_pipeline()).encode("a red circle", prompt_2="watercolor")
    with pytest.raises(ValueError, match="got 3 prompt_2 values for 1 prompts"):
        clip.encode("a red circle", prompt_2=["a", "b", "c"])
