"""condkit's text-encoder step in diffusers' modular SDXL pipeline draws what the classic pipeline draws through attach."""

import numpy as np
import pytest
import torch
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

from condkit import attach, load_conditioner
from condkit.pipelines.modular import ConditionerTextEncoderStep
from pixel_asserts import assert_same_pixels
from tiny_models import tiny_sdxl_pipeline

CALL = dict(num_inference_steps=3, height=32, width=32)
GUIDANCE = 7.5  # the modular pipeline's default guider; the classic pipeline is given the same
PROMPT, NEGATIVE = "a red circle to the left of a (blue:1.2) square", "blurry"


def modular_pipeline(pipe, text_encoder_step=None):
    blocks = StableDiffusionXLAutoBlocks()
    if text_encoder_step is not None:
        blocks.sub_blocks["text_encoder"] = text_encoder_step
    modular = blocks.init_pipeline()
    modular.update_components(**{name: component for name, component in pipe.components.items() if component is not None})
    return modular


def pixels(images):
    return np.stack([np.asarray(image, dtype=int) for image in images])


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


def test_the_clip_step_equals_diffusers_own_text_encoder_step(pipe):
    prompts = ["a red circle", "a blue square"]
    ours = modular_pipeline(pipe, ConditionerTextEncoderStep(load_conditioner("clip", pipe)))
    theirs = modular_pipeline(pipe)
    kwargs = dict(prompt=prompts, negative_prompt=["blurry", "dark"], **CALL)
    ours_images = ours(**kwargs, generator=torch.Generator().manual_seed(3), output="images")
    theirs_images = theirs(**kwargs, generator=torch.Generator().manual_seed(3), output="images")
    assert np.array_equal(pixels(ours_images), pixels(theirs_images))


@pytest.mark.parametrize("name", ["clip", "projected"])
def test_the_step_draws_what_the_classic_pipeline_draws_through_attach(pipe, name):
    conditioner = load_conditioner(name, pipe, **({"projection": "wiclp"} if name == "projected" else {}))
    if name == "projected":
        torch.manual_seed(0)
        for parameter in conditioner.projection.parameters():
            parameter.data.add_(0.05 * torch.randn_like(parameter))  # a projection that changes what the UNet sees
    assert conditioner.encode(PROMPT).needs_attach == (name == "projected")  # features the hooks must map
    modular = modular_pipeline(pipe, ConditionerTextEncoderStep(conditioner))
    with attach(modular, conditioner):
        drawn = modular(prompt=PROMPT, negative_prompt=NEGATIVE, **CALL, generator=torch.Generator().manual_seed(5), output="images")
    with attach(pipe, conditioner):
        classic = pipe(**conditioner.encode(PROMPT, NEGATIVE).kwargs(), **CALL, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(5)).images
    assert_same_pixels(pixels(drawn), pixels(classic))  # the guider calls the UNet per branch, the classic pipeline on both at once


def test_the_conditioner_is_shared_not_copied_into_the_pipeline(pipe):
    conditioner = load_conditioner("clip", pipe)
    modular = modular_pipeline(pipe, ConditionerTextEncoderStep(conditioner))
    assert modular.blocks.sub_blocks["text_encoder"].conditioner is conditioner


def test_a_missing_prompt_is_one_clear_error(pipe):
    modular = modular_pipeline(pipe, ConditionerTextEncoderStep(load_conditioner("clip", pipe)))
    with pytest.raises(ValueError, match="needs `prompt`"):
        modular(**CALL, output="images")
