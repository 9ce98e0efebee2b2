"""A LoRA in the text encoder: CLIPConditioner(lora_scale=s) gives exactly encode_prompt(lora_scale=s)."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from condkit import load_conditioner
from tiny_models import tiny_sd_pipeline


@pytest.fixture
def pipe_with_text_lora():
    pipe = tiny_sd_pipeline()
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, pipe.text_encoder)  # what load_lora_weights does, without a file
    return pipe


@torch.no_grad()
@pytest.mark.parametrize("scale", [0.5, 0.0, 1.7])
def test_lora_scale_matches_the_pipeline(pipe_with_text_lora, scale):
    pipe = pipe_with_text_lora
    theirs, their_negative = pipe.encode_prompt("a red circle", "cpu", 1, True, "blurry", lora_scale=scale)
    ours = load_conditioner("clip", pipe, lora_scale=scale).encode("a red circle", "blurry")
    assert torch.equal(ours.prompt_embeds, theirs) and torch.equal(ours.negative_prompt_embeds, their_negative)
    unscaled = load_conditioner("clip", pipe).encode("a red circle").prompt_embeds
    assert torch.equal(unscaled, pipe.encode_prompt("a red circle", "cpu", 1, False)[0])  # the layers are put back
    if scale != 1.0:
        assert not torch.equal(ours.prompt_embeds, unscaled)


def test_lora_scale_is_saved_and_checked(pipe_with_text_lora, tmp_path):
    pipe = pipe_with_text_lora
    saved = load_conditioner("clip", pipe, lora_scale=0.25).save_pretrained(tmp_path / "clip")
    assert load_conditioner(saved, pipe).lora_scale == 0.25
    with pytest.raises(ValueError, match="lora_scale must be a finite number or None, got nan"):
        load_conditioner("clip", pipe, lora_scale=float("nan"))
