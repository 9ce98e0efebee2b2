"""Conditioning reaches diffusers pipelines: the kwargs path and the timestep-aware hook path."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from condkit.conditioning.base import Conditioner, Conditioning
from condkit.conditioning.clip import CLIPConditioner
from condkit.pipelines.attach import attach
from condkit.pipelines.generate import GenerationSettings, PromptRequest, generate, save_results
from tiny_models import tiny_sd_components, tiny_sd_pipeline, tiny_sdxl_pipeline


class TimestepRecorder(Conditioner):
    """Features are CLIP embeddings; the UNet sees them scaled by a function of t, and every call is logged."""

    timestep_aware = True

    def __init__(self, clip: CLIPConditioner) -> None:
        super().__init__()
        self.clip = clip
        self.calls: list[tuple[float, torch.Tensor]] = []

    def embed(self, prompt, negative_prompt=None, num_images_per_prompt=1) -> Conditioning:
        return replace(self.clip.embed(prompt, negative_prompt, num_images_per_prompt), needs_attach=True)

    def at_timestep(self, features, timestep):
        self.calls.append((float(timestep), features.clone()))
        return features * (1.0 + float(timestep) / 1000.0)


def test_hook_sees_every_timestep_for_both_cfg_halves():
    pipe = tiny_sd_pipeline()
    original_unet = pipe.unet
    recorder = TimestepRecorder(CLIPConditioner.from_pipeline(pipe))
    with torch.no_grad():
        cond = recorder.encode(["a red circle", "a blue square"], "ugly")
    with attach(pipe, recorder):
        assert pipe.unet is original_unet and len(pipe.unet._forward_pre_hooks) == 1
        pipe(**cond.kwargs(), num_inference_steps=5, guidance_scale=5.0, height=32, width=32, output_type="np")
    assert pipe.unet is original_unet and not pipe.unet._forward_pre_hooks
    assert [t for t, _ in recorder.calls] == [float(t) for t in pipe.scheduler.timesteps]
    expected_rows = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])
    for _, features in recorder.calls:
        assert torch.equal(features, expected_rows)


def test_timestep_dependent_conditioning_changes_the_image():
    pipe = tiny_sd_pipeline()
    clip = CLIPConditioner.from_pipeline(pipe)
    recorder = TimestepRecorder(clip)
    settings = dict(num_inference_steps=4, height=32, width=32, output_type="np")
    plain = pipe(**clip.encode("a red circle").kwargs(), generator=torch.Generator().manual_seed(0), **settings).images
    with attach(pipe, recorder):
        proxied = pipe(**recorder.encode("a red circle").kwargs(), generator=torch.Generator().manual_seed(0), **settings).images
    assert np.abs(plain - proxied).max() > 1e-4


def test_attach_removes_its_hooks_on_error():
    pipe = tiny_sd_pipeline()
    original_unet = pipe.unet
    with pytest.raises(RuntimeError, match="boom"):
        with attach(pipe, TimestepRecorder(CLIPConditioner.from_pipeline(pipe))):
            raise RuntimeError("boom")
    assert pipe.unet is original_unet and not pipe.unet._forward_pre_hooks
    assert pipe.config.unet[1] == "UNet2DConditionModel"


def test_features_refuse_to_run_without_attach():
    pipe = tiny_sd_pipeline()
    recorder = TimestepRecorder(CLIPConditioner.from_pipeline(pipe))
    with pytest.raises(RuntimeError, match=r"features of a timestep-aware conditioner.*condkit.attach"):
        pipe(**recorder.encode("a red circle").kwargs(), num_inference_steps=2, height=32, width=32, output_type="np")


def test_clip_hooks_leave_plain_embeddings_alone_and_leave_with_the_block():
    # CLIP prompts may schedule (A1111 prompt editing), so attach hooks the UNet; plain embeddings pass untouched.
    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    clip = CLIPConditioner.from_pipeline(pipe)
    cond = clip.encode("a red circle", "blurry")
    settings = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    alone = pipe(**cond.kwargs(), generator=torch.Generator().manual_seed(0), **settings).images
    with attach(pipe, clip):
        assert pipe.unet is unet and len(unet._forward_pre_hooks) == 1
        attached = pipe(**cond.kwargs(), generator=torch.Generator().manual_seed(0), **settings).images
    assert np.array_equal(attached, alone)
    assert not unet._forward_pre_hooks and not unet._forward_hooks


@pytest.mark.parametrize("kind", ["sd", "img2img", "sdxl"])
def test_kwargs_path_matches_prompt_strings(kind):
    if kind == "sd":
        pipe = tiny_sd_pipeline()
        extra = {"height": 32, "width": 32}
    elif kind == "img2img":
        pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_components())
        pipe.set_progress_bar_config(disable=True)
        extra = {"image": Image.new("RGB", (32, 32), (200, 30, 30)), "strength": 0.8}
    else:
        pipe = tiny_sdxl_pipeline()
        extra = {"height": 32, "width": 32}
    with torch.no_grad():
        cond = CLIPConditioner.from_pipeline(pipe).encode("a red circle", "blurry")
    common = dict(num_inference_steps=3, guidance_scale=6.0, output_type="np", **extra)
    ours = pipe(**cond.kwargs(), generator=torch.Generator().manual_seed(3), **common).images
    theirs = pipe(prompt="a red circle", negative_prompt="blurry", generator=torch.Generator().manual_seed(3), **common).images
    assert np.array_equal(ours, theirs)


def test_generate_seeds_batches_and_metadata(tmp_path):
    pipe = tiny_sd_pipeline()
    clip = CLIPConditioner.from_pipeline(pipe)
    requests = [PromptRequest("a red circle"), PromptRequest("a blue square", "blurry", seed=100)]
    settings = GenerationSettings(steps=2, guidance=5.0, seed=7, num_images_per_prompt=2, batch_size=3, height=32, width=32)
    results = generate(pipe, clip, requests, settings)
    assert [r.seed for r in results] == [7, 8, 100, 101]
    one_by_one = generate(pipe, clip, requests, GenerationSettings(**{**settings.__dict__, "batch_size": 1}))
    for a, b in zip(results, one_by_one):
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1

    paths = save_results(results, tmp_path / "out", {"conditioner": "clip", "model": "tiny", **settings.__dict__})
    assert [p.name for p in paths] == ["00000_7.png", "00001_8.png", "00002_100.png", "00003_101.png"]
    metadata = json.loads(paths[2].with_suffix(".json").read_text())
    assert metadata["prompt"] == "a blue square" and metadata["negative_prompt"] == "blurry" and metadata["seed"] == 100
    assert metadata["conditioner"] == "clip" and metadata["steps"] == 2
    assert Image.open(tmp_path / "out" / "grid.png").size == (64, 64)
    assert not list((tmp_path / "out").glob("*.tmp"))


@pytest.mark.parametrize("field,value", [("steps", 0), ("num_images_per_prompt", -1), ("height", 30)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"got {value}"):
        GenerationSettings(**{field: value})
