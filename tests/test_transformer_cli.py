"""`condkit generate|eval --model` an SD3 or Flux folder: the images the pipeline draws from prompt strings,
--true-cfg-scale for Flux negatives, --max-sequence-length, and their one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from cli_helpers import run
from pixel_asserts import assert_same_pixels
from tiny_models import tiny_sd_pipeline
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline

SIZE = ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-models")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    return root


@torch.no_grad()
def test_flux_generate_with_true_cfg_draws_what_the_pipeline_draws_from_strings(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", "--model", folders / "flux", "--prompt", "a red cube", "--prompt", "a blue ball",
                       "--negative", "blurry", "--true-cfg-scale", "2", "--guidance", "3.5", "--max-sequence-length", "16",
                       "--seed", "7", "--out", out, "--quiet", *SIZE)
    assert code == 0, err
    pipe = DiffusionPipeline.from_pretrained(folders / "flux")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(["a red cube", "a blue ball"], negative_prompt="blurry", true_cfg_scale=2.0, guidance_scale=3.5,
                    num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                    generator=[torch.Generator().manual_seed(seed) for seed in (7, 8)]).images
    for index, image in enumerate(expected):
        written = Image.open(out / f"{index:05d}_{7 + index}.png")
        assert_same_pixels(written, image)  # condkit encodes each prompt on its own, the pipeline both at once
    metadata = json.loads((out / "00001_8.json").read_text())
    assert metadata["true_cfg_scale"] == 2.0 and metadata["conditioner_options"] == {"max_sequence_length": 16}
    assert metadata["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_flux_negative_without_true_cfg_scale_is_said_once(folders, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model", folders / "flux", "--prompt", "a", "--prompt", "b", "--negative", "dark",
                       "--max-sequence-length", "8", "--out", tmp_path / "o", "--quiet", "--no-grid", *SIZE)
    assert code == 0, err
    assert err.count("ignores negative prompts unless --true-cfg-scale is above 1") == 1
    assert "the negative prompt of 2 request(s) does not change the images" in err


def test_sd3_generate_warns_for_t5_tokens_beyond_max_sequence_length(folders, tmp_path, capsys):
    out = tmp_path / "sd3"
    code, _, err = run(capsys, "generate", "--model", folders / "sd3", "--prompt", "a red cube", "--negative", "blurry",
                       "--max-sequence-length", "4", "--out", out, "--quiet", *SIZE)
    assert code == 0, err
    assert "T5 prompt truncated to max_sequence_length=4 tokens: dropped 5 of 8 tokens of 'a red cube'" in err
    metadata = json.loads((out / "00000_0.json").read_text())
    assert metadata["height"] == 32 and metadata["negative_prompt"] == "blurry"


def test_eval_runs_on_an_sd3_folder(folders, tmp_path, capsys):
    code, stdout, err = run(capsys, "eval", "--model", folders / "sd3", "--limit", "1", "-n", "1", "--max-sequence-length", "32",
                            "--out", tmp_path / "eval", "--quiet", *SIZE)
    assert code == 0, err
    assert "all_correct" in stdout and (tmp_path / "eval" / "eval.json").is_file()


@pytest.mark.parametrize("model, argv, message", [
    ("sd3", ["--true-cfg-scale", "2"], "--true-cfg-scale applies to Flux pipelines (their negatives need it); this model is a "
                                       "StableDiffusion3Pipeline, whose CFG scale is --guidance"),
    ("sd3", ["--max-sequence-length", "513"], "--max-sequence-length must be at most 512 (SD3's and Flux's limit), got 513"),
    ("flux", ["--clip-skip", "1"], "clip_skip=1 does not apply to Flux"),
    ("sd", ["--max-sequence-length", "64"], "--max-sequence-length 64 applies to SD3 and Flux pipelines (T5 tokens); "
                                            "this model is a StableDiffusionPipeline"),
    (None, ["--true-cfg-scale", "2"], "--true-cfg-scale applies to Flux pipelines (their negatives need it); this model is a "
                                      "StableDiffusionPipeline"),  # the embedded model, refused before it loads
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(folders, tmp_path, capsys, model, argv, message):
    if model == "sd" and not (folders / "sd").exists():
        tiny_sd_pipeline().save_pretrained(folders / "sd")
    out = tmp_path / "out"
    model_arguments = [] if model is None else ["--model", folders / model]
    code, _, err = run(capsys, "generate", *model_arguments, "--prompt", "x", "--out", out, "--quiet", *argv, *SIZE)
    assert code == 2 and message in err
    assert len([line for line in err.splitlines() if line.startswith("condkit: error")]) == 1
    assert not out.exists() or not any(out.iterdir())
