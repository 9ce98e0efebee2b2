"""A1111's AND as composable diffusion: ε = ε_uncond + Σ wᵢ·g·(εᵢ − ε_uncond).

The hooks give the UNet one row per sub-prompt and fold its output back to one row per image,
ε_uncond + Σ wᵢ (εᵢ − ε_uncond); the pipeline's guidance scales that by g. The reference below calls the
UNet itself on each sub-prompt's static encoding and applies the formula.
"""

import pytest
import torch

from condkit import attach, load_conditioner
from condkit.conditioning.prompt_schedule import prompt_table, split_subprompts
from conformance.pipeline_cases import case
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPT = "a red cube AND a blue [ball|cone] :1.5 AND a green floor:0.5"
NEGATIVE = "[blurry|dark]"
STEPS = 3


def record_unet(pipe, conditioner, conditioning, **call):
    """Per UNet call: the inputs as the pipeline made them (before attach's hook) and the output after folding."""
    calls = []

    def before(module, args, kwargs):
        calls.append({"args": args, "kwargs": dict(kwargs)})

    def after(module, args, kwargs, output):
        calls[-1]["output"] = output[0].clone()

    pre = pipe.unet.register_forward_pre_hook(before, with_kwargs=True)  # registered before attach's: sees the raw call
    try:
        with attach(pipe, conditioner):
            post = pipe.unet.register_forward_hook(after, with_kwargs=True)  # after attach's fold
            try:
                pipe(**conditioning.kwargs(), output_type="np", **call)
            finally:
                post.remove()
    finally:
        pre.remove()
    return calls


def reference_prediction(pipe, conditioner, call, step):
    """ε_uncond + Σ wᵢ (εᵢ − ε_uncond) for the one image of `call`, from our own UNet call."""
    parts = split_subprompts(PROMPT)
    texts = [prompt_table(part.text, STEPS)[step] for part in parts]
    negative = prompt_table(NEGATIVE, STEPS)[step]
    static = conditioner.encode(texts, [negative] * len(texts))  # each sub-prompt's static encoding
    latents, timestep = call["args"]
    rows = [0] + [1] * len(parts)  # the unconditional row, then the image's latents once per sub-prompt
    hidden = torch.cat([static.negative_prompt_embeds[:1], static.prompt_embeds])
    added = call["kwargs"].get("added_cond_kwargs")
    if added is not None:
        added = {"text_embeds": torch.cat([static.negative_pooled_prompt_embeds[:1], static.pooled_prompt_embeds]),
                 "time_ids": added["time_ids"][rows]}
    kwargs = {k: v for k, v in call["kwargs"].items() if k not in ("encoder_hidden_states", "added_cond_kwargs")}
    out = pipe.unet(latents[rows], timestep, encoder_hidden_states=hidden, added_cond_kwargs=added, **kwargs)[0]
    uncond = out[0]
    combined = uncond
    for index, part in enumerate(parts):
        combined = combined + (out[1 + index] - uncond) * part.weight
    return torch.stack([uncond, combined])


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
@pytest.mark.parametrize("name", ["clip", "long-clip"])
@torch.no_grad()
def test_and_prediction_is_the_composable_diffusion_formula(make_pipe, name):
    pipe = make_pipe()
    clip = load_conditioner(name, pipe)
    calls = record_unet(pipe, clip, clip.encode(PROMPT, NEGATIVE), num_inference_steps=STEPS, height=32, width=32,
                        guidance_scale=4.0)
    assert len(calls) == STEPS
    for step, call in enumerate(calls):
        assert call["output"].shape[0] == 2  # one row per image and CFG half, as the pipeline expects
        assert torch.equal(call["output"], reference_prediction(pipe, clip, call, step)), step


@torch.no_grad()
def test_a_prompt_without_and_is_unaffected():
    pipe = tiny_sdxl_pipeline()
    clip = load_conditioner("clip", pipe)
    conditioning = clip.encode("a red cube and a blue ball", "blurry")  # lower-case "and" is a word
    assert not conditioning.needs_attach
    settings = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    alone = pipe(**conditioning.kwargs(), generator=torch.Generator().manual_seed(0), **settings).images
    with attach(pipe, clip):
        attached = pipe(**conditioning.kwargs(), generator=torch.Generator().manual_seed(0), **settings).images
    assert (alone == attached).all()


@torch.no_grad()
def test_a_lone_trailing_weight_scales_guidance_as_a1111():
    pipe = tiny_sd_pipeline()
    clip = load_conditioner("clip", pipe)
    settings = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    with attach(pipe, clip):
        weighted = pipe(**clip.encode("a red cube :2", "blurry").kwargs(), guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(0), **settings).images
    plain = pipe(**clip.encode("a red cube", "blurry").kwargs(), guidance_scale=6.0,
                 generator=torch.Generator().manual_seed(0), **settings).images
    assert abs(weighted - plain).max() < 1e-4  # ε_u + 2·3·(ε − ε_u) = ε_u + 6·(ε − ε_u), up to rounding


@torch.no_grad()
def test_and_with_a_controlnet_is_refused_in_one_line():
    controlnet_case = case("sd-controlnet")
    pipe = controlnet_case.build()
    clip = load_conditioner("clip", pipe)
    with attach(pipe, clip), pytest.raises(ValueError, match="cannot run with a ControlNet") as error:
        pipe(**clip.encode("a red cube AND a blue ball").kwargs(), num_inference_steps=2, output_type="np",
             **controlnet_case.call_kwargs())
    assert "\n" not in str(error.value)


@torch.no_grad()
def test_and_without_guidance_is_refused_in_one_line():
    pipe = tiny_sd_pipeline()
    clip = load_conditioner("clip", pipe)
    with attach(pipe, clip), pytest.raises(ValueError, match="needs classifier-free guidance") as error:
        pipe(**clip.encode("a red cube AND a blue ball").kwargs(), guidance_scale=1.0, num_inference_steps=2,
             height=32, width=32, output_type="np")
    assert "\n" not in str(error.value)


def test_and_weights_beyond_100_are_refused():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="AND weight 150 .* out of range"):
        load_conditioner("clip", pipe).encode("a red cube AND a blue ball:150")
