"""A condkit conditioner as the text-encoder step of diffusers' modular SDXL pipeline.

    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    blocks = StableDiffusionXLAutoBlocks()
    blocks.sub_blocks["text_encoder"] = ConditionerTextEncoderStep(conditioner)
    modular = blocks.init_pipeline()
    modular.update_components(**{name: c for name, c in pipe.components.items() if c is not None})
    with condkit.attach(modular, conditioner):  # needed by timestep-aware conditioners only
        images = modular(prompt="a red circle", negative_prompt="blurry", output="images")

The step reads the same inputs as diffusers' own text-encoder step (prompt, prompt_2 and their
negatives) and writes the same four outputs, so every later block runs unchanged. The
conditioner is shared, not copied, when the blocks are copied into a pipeline: it keeps using the
pipeline's encoders and follows their LoRAs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers.modular_pipelines import ModularPipelineBlocks, PipelineState
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam

from condkit.conditioning.base import Conditioner

OUTPUTS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


class ConditionerTextEncoderStep(ModularPipelineBlocks):
    model_name = "stable-diffusion-xl"

    def __init__(self, conditioner: Conditioner) -> None:
        super().__init__()
        self.conditioner = conditioner

    def __deepcopy__(self, memo: dict[int, Any]) -> ConditionerTextEncoderStep:
        memo[id(self.conditioner)] = self.conditioner  # init_pipeline deep-copies the blocks
        clone = object.__new__(type(self))
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    @property
    def description(self) -> str:
        return f"condkit {type(self.conditioner).__name__}: prompts to the embeddings the denoise blocks take"

    @property
    def expected_components(self) -> list:
        return []  # the conditioner holds its own encoders

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam(name) for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam(name, type_hint=torch.Tensor, kwargs_type="denoiser_input_fields") for name in OUTPUTS]

    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        block_state = self.get_block_state(state)
        if block_state.prompt is None:
            raise ValueError("the condkit text-encoder step needs `prompt` (a string or a list of strings)")
        per_encoder = {
            name: getattr(block_state, name)
            for name in ("prompt_2", "negative_prompt_2")
            if getattr(block_state, name) is not None
        }
        conditioning = self.conditioner.encode(block_state.prompt, block_state.negative_prompt, **per_encoder)
        conditioning = conditioning.to(components._execution_device)
        for name in OUTPUTS:
            setattr(block_state, name, getattr(conditioning, name))
        self.set_block_state(state, block_state)
        return components, state
