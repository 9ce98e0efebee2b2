"""CPU offloading: conditioners put their inputs where the offload hooks run the text encoder (diffusers'
get_module_execution_device), generation under `enable_model_cpu_offload` draws the same images, and the
CLI's --offload installs diffusers' hooks. This machine has no accelerator, so the execution device is the
CPU; a text encoder whose weights "wait" on another device is simulated by its `device` attribute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.hooks import CpuOffload, add_hook_to_module
from PIL import Image

from condkit import load_conditioner
from condkit.cli import main
from condkit.pipelines.generate import GenerationSettings, PromptRequest, generate
from condkit.pipelines.offload import enable_offload
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

REQUESTS = [PromptRequest("a red circle", "blurry"), PromptRequest("a (blue:1.2) square " * 12)]  # one and two chunks
SETTINGS = GenerationSettings(steps=2, height=32, width=32, seed=4)


def images(pipe, conditioner) -> list[np.ndarray]:
    return [np.asarray(result.image) for result in generate(pipe, conditioner, REQUESTS, SETTINGS)]


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
@pytest.mark.parametrize("conditioner_name", ["clip", "long-clip"])
def test_model_offload_installs_hooks_and_keeps_the_images(make_pipe, conditioner_name):
    expected = images(plain := make_pipe(), load_conditioner(conditioner_name, plain))
    pipe = make_pipe()
    conditioner = load_conditioner(conditioner_name, pipe)
    enable_offload(pipe, "model", torch.device("cpu"))
    offloaded = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]
    assert offloaded and all(isinstance(getattr(pipe, name)._hf_hook, CpuOffload) for name in offloaded)
    assert pipe._execution_device == torch.device("cpu", 0)
    assert all(np.array_equal(ours, theirs) for ours, theirs in zip(images(pipe, conditioner), expected))


def _waiting(encoder: torch.nn.Module, monkeypatch) -> None:
    """The encoder's class reports its weights on the meta device, as sequential offload leaves them between calls, and
    a hook runs it on the CPU."""
    monkeypatch.setattr(type(encoder), "device", property(lambda self: torch.device("meta")))
    add_hook_to_module(encoder, CpuOffload(execution_device=torch.device("cpu")))


@torch.no_grad()
@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_the_conditioner_sends_tokens_to_the_hooks_execution_device(make_pipe, monkeypatch):
    expected = load_conditioner("clip", make_pipe()).encode("a (red:1.3) circle", "blurry")
    pipe = make_pipe()
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            _waiting(encoder, monkeypatch)
    assert pipe.text_encoder.device.type == "meta"  # where `.device` would have sent the token ids
    ours = load_conditioner("clip", pipe).encode("a (red:1.3) circle", "blurry")
    for name, tensor in expected.tensors().items():
        assert torch.equal(ours.tensors()[name], tensor), name


def test_cli_offload_model_draws_the_same_images(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_sd_pipeline().save_pretrained(model)
    capsys.readouterr()
    common = ["generate", "--model", str(model), "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32",
              "--device", "cpu", "--quiet", "--no-grid"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--offload", "model", "--out", str(tmp_path / "offloaded")]) == 0
    plain, offloaded = (np.asarray(Image.open(tmp_path / name / "00000_0.png")) for name in ("plain", "offloaded"))
    assert np.array_equal(plain, offloaded)
    code = main([*common, "--offload", "sequential", "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--offload sequential needs an accelerator" in err, err
    assert not (tmp_path / "never").exists()
