"""attach leaves the pipeline as diffusers built it: saving, from_pipe, torch.compile, one mapping per step."""

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline, UNet2DConditionModel

from condkit import attach, load_conditioner
from conformance.pipeline_cases import case
from tiny_models import tiny_sd_pipeline

SETTINGS = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def projected(pipe, **options):
    return load_conditioner("projected", pipe, projection="wiclp", **options)


def seeded():
    return torch.Generator().manual_seed(0)


@torch.no_grad()
def test_save_pretrained_while_attached_writes_a_pipeline_that_reloads(tmp_path):
    pipe = tiny_sd_pipeline()
    def components(config):
        return {key: value for key, value in config.items() if not key.startswith("_")}

    config_before = components(pipe.config)
    with attach(pipe, projected(pipe)):
        assert isinstance(pipe.unet, UNet2DConditionModel)
        pipe.save_pretrained(tmp_path / "saved")
    assert components(pipe.config) == config_before and pipe.config.unet == ("diffusers", "UNet2DConditionModel")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded.unet, UNet2DConditionModel)
    reloaded.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a red cube", generator=seeded(), **SETTINGS).images
    assert np.array_equal(reloaded(prompt="a red cube", generator=seeded(), **SETTINGS).images, expected)


@torch.no_grad()
def test_from_pipe_inside_the_block_runs_plainly_and_keeps_no_condkit_state():
    pipe = tiny_sd_pipeline()
    expected = pipe(prompt="a red cube", generator=seeded(), **SETTINGS).images
    with attach(pipe, projected(pipe)):
        other = AutoPipelineForText2Image.from_pipe(pipe)
        other.set_progress_bar_config(disable=True)
        inside = other(prompt="a red cube", generator=seeded(), **SETTINGS).images  # plain embeddings pass untouched
    assert np.array_equal(inside, expected)
    assert isinstance(other.unet, UNet2DConditionModel) and not other.unet._forward_pre_hooks
    assert other.config.unet == ("diffusers", "UNet2DConditionModel")


def test_a_second_conditioner_on_the_same_denoiser_is_refused_and_the_same_one_nests():
    pipe = tiny_sd_pipeline()
    conditioner = projected(pipe)
    with attach(pipe, conditioner):
        with pytest.raises(RuntimeError, match="already attached"):
            with attach(pipe, projected(pipe)):
                pass
        with attach(pipe, conditioner):  # generate() inside a user's attach block: nothing more is hooked
            assert len(pipe.unet._forward_pre_hooks) == 1
        assert len(pipe.unet._forward_pre_hooks) == 1  # the inner block leaves the outer one's hook in place
    assert not pipe.unet._forward_pre_hooks


@torch.no_grad()
def test_unet_and_controlnet_share_one_mapping_per_step():
    controlnet_case = case("sd-controlnet")
    pipe = controlnet_case.build()
    conditioner = projected(pipe)
    calls = []
    original = conditioner.at_timestep
    conditioner.at_timestep = lambda features, timestep: calls.append(float(timestep)) or original(features, timestep)
    with attach(pipe, conditioner):
        pipe(**conditioner.encode(["a red cube", "a blue ball"]).kwargs(), num_inference_steps=3, output_type="np",
             **controlnet_case.call_kwargs())
    assert calls == [float(t) for t in pipe.scheduler.timesteps]


@torch.no_grad()
def test_compiled_unet_is_not_recompiled_by_attach():
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    pipe = tiny_sd_pipeline()
    conditioner = projected(pipe, switch_off_timestep=0)
    pipe.unet = torch.compile(pipe.unet, backend=counting_backend, dynamic=False)
    plain = pipe(**load_conditioner("clip", pipe).encode("a red cube").kwargs(), generator=seeded(), **SETTINGS).images
    compiled_graphs = len(graphs)
    with attach(pipe, conditioner):
        attached = pipe(**conditioner.encode("a red cube").kwargs(), generator=seeded(), **SETTINGS).images
    assert compiled_graphs >= 1 and len(graphs) == compiled_graphs
    assert np.array_equal(attached, plain)  # a fresh WiCLP is the identity
    torch._dynamo.reset()


def test_a_first_run_prints_no_library_noise(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "condkit", "generate", "--prompt", "a red circle", "--steps", "1", "--out", tmp_path / "o"],
        capture_output=True, text=True, timeout=300,
    )  # without --quiet, which would silence warnings
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower() and "deprecat" not in result.stderr.lower(), result.stderr
