"""The SDXL refiner layout (no first text encoder): CLIP, projected and Long-CLIP conditioners run on it."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from PIL import Image

from condkit import attach, load_conditioner
from tiny_models import tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def refiner():
    parts = tiny_sdxl_pipeline().components
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=5 * 8 + 32, cross_attention_dim=32,
        norm_num_groups=4,
    )  # fmt: skip
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=parts["vae"], text_encoder=None, text_encoder_2=parts["text_encoder_2"], tokenizer=None,
        tokenizer_2=parts["tokenizer_2"], unet=unet, scheduler=parts["scheduler"], requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **inputs):
    return pipe(**inputs, image=Image.new("RGB", (32, 32), (200, 40, 40)), strength=1.0, num_inference_steps=2,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np").images


@torch.no_grad()
def test_clip_matches_the_refiners_own_encoding(refiner):
    clip = load_conditioner("clip", refiner)
    assert clip.is_sdxl and len(clip.text_encoders) == 1
    cond = clip.encode("a red circle", "blurry")
    theirs = refiner.encode_prompt(prompt="a red circle", negative_prompt="blurry", device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=True)
    for ours, reference in zip((cond.prompt_embeds, cond.negative_prompt_embeds, cond.pooled_prompt_embeds,
                                cond.negative_pooled_prompt_embeds), theirs):
        assert torch.equal(ours, reference)
    assert np.array_equal(run(refiner, **cond.kwargs()), run(refiner, prompt="a red circle", negative_prompt="blurry"))


@pytest.mark.parametrize("name, options", [("projected", {"projection": "wiclp"}), ("long-clip", {})])
@torch.no_grad()
def test_other_clip_family_conditioners_run(refiner, name, options):
    conditioner = load_conditioner(name, refiner, **options)
    with attach(refiner, conditioner):
        images = run(refiner, **conditioner.encode("a red circle", "blurry").kwargs())
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
