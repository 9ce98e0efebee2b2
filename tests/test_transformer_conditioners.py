"""condkit's conditioners on SD3 and Flux: the conformance contract of tests/conformance, on transformer pipelines.

The conformance suite's cases are UNet pipelines and it runs every registered conditioner, third-party ones
included; these SD3/Flux cases run condkit's own conditioners that serve transformer pipelines:
- every transformer call gets exactly the conditioning it should: a static conditioner's embeddings, a
  timestep-aware one's `at_timestep` of the right rows at that call's timestep in σ·1000 (SD3 batches
  [negative, positive]; Flux's true CFG calls positive, then negative), pooled_projections included;
- it saves and loads back as one unit with identical `encode` outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from condkit import attach, load_conditioner
from condkit.conditioning.features import plain
from condkit.conditioning.registry import get_conditioner_class
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline

CONDITIONERS = ["clip", "long-clip", "concat", "projected", "llm-adapter"]
PROMPTS = ["a red cube", "a blue ball"]
NEGATIVES = ["", "blurry"]
BUILD = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def example(name: str, pipe):
    torch.manual_seed(0)
    return load_conditioner(name, pipe, **get_conditioner_class(name).example_options(pipe))


def run(pipe, family: str, **inputs) -> np.ndarray:
    cfg = {"true_cfg_scale": 2.0, "guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 5.0}
    return pipe(**inputs, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(2)], **cfg).images


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("name", CONDITIONERS)
@torch.no_grad()
def test_every_transformer_call_gets_its_conditioning(name, family):
    pipe = BUILD[family]()
    conditioner = example(name, pipe)
    cond = conditioner.encode(PROMPTS, NEGATIVES)
    calls = []
    with attach(pipe, conditioner):
        handle = pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append({key: kwargs[key] for key in ("timestep", "encoder_hidden_states",
                                                                                     "pooled_projections")}),
            with_kwargs=True,
        )
        try:
            images = run(pipe, family, **cond.kwargs())
        finally:
            handle.remove()
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    per_step = 2 if family == "flux" else 1
    assert len(calls) == per_step * pipe.num_timesteps
    for index, call in enumerate(calls):
        if family == "sd3":
            rows = plain(torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]))
            pooled_rows = torch.cat([cond.negative_pooled_prompt_embeds, cond.pooled_prompt_embeds])
            timestep = call["timestep"]
        else:
            positive = index % 2 == 0
            rows = plain(cond.prompt_embeds if positive else cond.negative_prompt_embeds)
            pooled_rows = cond.pooled_prompt_embeds if positive else cond.negative_pooled_prompt_embeds
            timestep = call["timestep"] * 1000  # Flux's pipeline passes σ
        expected, expected_pooled = rows, pooled_rows
        if conditioner.timestep_aware:
            mapped = conditioner.at_timestep(rows, timestep)
            expected, expected_pooled = mapped if isinstance(mapped, tuple) else (mapped, pooled_rows)
        assert torch.equal(plain(call["encoder_hidden_states"]), expected), (name, index)
        assert torch.equal(call["pooled_projections"], expected_pooled), (name, index)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("name", CONDITIONERS)
@torch.no_grad()
def test_saves_and_loads_as_one_unit(name, family, tmp_path):
    pipe = BUILD[family]()
    conditioner = example(name, pipe)
    loaded = load_conditioner(conditioner.save_pretrained(tmp_path / "saved"), pipe)
    assert type(loaded) is type(conditioner) and loaded.config == conditioner.config
    before, after = conditioner.encode(PROMPTS, NEGATIVES), loaded.encode(PROMPTS, NEGATIVES)
    assert before.tensors().keys() == after.tensors().keys()
    for key, tensor in before.tensors().items():
        assert torch.equal(plain(tensor), plain(after.tensors()[key])), key


@pytest.mark.parametrize("family, task", [("sd3", "img2img"), ("flux", "img2img"), ("flux", "inpaint")])
@torch.no_grad()
def test_image_to_image_pipelines_draw_what_prompt_strings_draw(family, task):
    import PIL.Image
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    base = BUILD[family]()
    auto = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
    pipe = auto.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    pixels = np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    images = {"image": [PIL.Image.fromarray(pixels)] * 2, "strength": 0.7}
    if task == "inpaint":
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        images["mask_image"] = [PIL.Image.fromarray(mask, mode="L")] * 2
    conditioner = load_conditioner("clip", base, max_sequence_length=32)
    with attach(pipe, conditioner):
        ours = run(pipe, family, **conditioner.encode(PROMPTS, NEGATIVES).kwargs(), **images)
    theirs = run(pipe, family, prompt=PROMPTS, negative_prompt=NEGATIVES, max_sequence_length=32, **images)
    assert np.array_equal(ours, theirs)


def test_a_transformer_pipeline_of_another_layout_is_refused_in_one_line():
    from types import SimpleNamespace

    other = SimpleNamespace(transformer=torch.nn.Linear(2, 2), text_encoder=torch.nn.Linear(2, 2), components={})
    for name in ("clip", "long-clip"):
        with pytest.raises(ValueError, match="has a transformer but neither SD3's"):
            load_conditioner(name, other)
