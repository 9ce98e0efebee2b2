"""Every conformance pipeline case builds, runs deterministically, calls its denoisers and accepts prompt embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from conformance.pipeline_cases import CASES, PipelineCase

PROMPT = ["a red cube", "a blue ball"]
NEGATIVE = ["", "blurry"]


def _run(pipe, case: PipelineCase, **prompt_kwargs) -> np.ndarray:
    return pipe(
        **prompt_kwargs,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        output_type="np",
        **case.call_kwargs(),
    ).images


def _with_pooled(embeds, negative, pooled, negative_pooled) -> dict:
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}


def _embeddings(pipe, case: PipelineCase) -> dict:
    if case.family == "sd3":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=PROMPT, prompt_2=None, prompt_3=None, negative_prompt=NEGATIVE, device=pipe.device,
            do_classifier_free_guidance=True,
        )
        return _with_pooled(embeds, negative, pooled, negative_pooled)
    if case.family == "flux":  # one encode_prompt per text: Flux has no negative in it
        embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, device=pipe.device)
        negative, negative_pooled, _ = pipe.encode_prompt(prompt=NEGATIVE, prompt_2=None, device=pipe.device)
        return _with_pooled(embeds, negative, pooled, negative_pooled)
    if case.family == "sdxl":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
        )
        return _with_pooled(embeds, negative, pooled, negative_pooled)
    embeds, negative = pipe.encode_prompt(PROMPT, pipe.device, 1, True, NEGATIVE)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def _denoiser_modules(pipe, name: str) -> dict[str, torch.nn.Module]:
    module = getattr(pipe, name)
    if isinstance(module, MultiControlNetModel):
        return {f"{name}.nets[{i}]": net for i, net in enumerate(module.nets)}
    return {name: module}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_runs_calls_denoisers_and_accepts_embeddings(case: PipelineCase):
    pipe = case.build()
    modules = {}
    for name in case.denoisers:
        assert hasattr(pipe, name), name
        modules.update(_denoiser_modules(pipe, name))

    calls = {label: [] for label in modules}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, kwargs, label=label: calls[label].append(kwargs), with_kwargs=True)
        for label, module in modules.items()
    ]
    try:
        images = _run(pipe, case, prompt=PROMPT, negative_prompt=NEGATIVE)
    finally:
        for hook in hooks:
            hook.remove()

    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all()
    assert pipe.num_timesteps >= 1
    for label, kwargs_per_call in calls.items():
        assert len(kwargs_per_call) == case.calls_per_step * pipe.num_timesteps, label
        assert all("encoder_hidden_states" in kwargs for kwargs in kwargs_per_call), label

    np.testing.assert_array_equal(_run(pipe, case, prompt=PROMPT, negative_prompt=NEGATIVE), images)

    with torch.no_grad():
        embeddings = _embeddings(pipe, case)
    np.testing.assert_array_equal(_run(pipe, case, **embeddings), images)
