"""The shapes world's training recipe: tokenizer, tiny end-to-end run, interrupt and resume."""

from __future__ import annotations

import json
import random
import re
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import CLIPModel

from condkit.shapes_world.dataset import ShapesDataset, world_words
from condkit.shapes_world.hard_negatives import change_shape, flip_relation, hard_negative, swap_colours
from condkit.shapes_world.recipe import train_world
from condkit.shapes_world.stage_runner import StageRunner
from condkit.shapes_world.tokenizer import bytes_to_unicode, build_tokenizer

WORD_PATTERN = re.compile(r"[a-z]+|[^\sa-z]")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(world_words(), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("tiny_run")
    train_world(out_dir, scale="tiny", progress=False)
    return out_dir


def test_tokenizer_layout_matches_sd_clip(tokenizer):
    assert tokenizer.model_max_length == 77
    assert tokenizer.convert_ids_to_tokens([len(tokenizer) - 2, len(tokenizer) - 1]) == [
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(list(range(256))) == list(bytes_to_unicode().values())


def test_every_world_word_is_one_token(tokenizer):
    for word in world_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))


def test_world_captions_tokenize_one_token_per_word(tokenizer):
    dataset = ShapesDataset(30, seed=3)
    for i in range(len(dataset)):
        caption = dataset[i]["caption"]
        ids = tokenizer(caption, add_special_tokens=False).input_ids
        assert len(ids) == len(WORD_PATTERN.findall(caption)), caption


@settings(max_examples=40, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from(" \t\n"), max_size=40))
def test_any_text_round_trips_without_unknown_tokens(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.eos_token_id not in ids and tokenizer.bos_token_id not in ids
    byte_decoder = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    symbols = "".join(tokenizer.convert_ids_to_tokens(ids)).replace("</w>", "")
    decoded = bytes(byte_decoder[s] for s in symbols).decode("utf-8")
    expected = re.sub(r"\s+", "", unicodedata.normalize("NFC", text).lower())
    assert decoded == expected


def test_hard_negatives_change_one_fact():
    rng = random.Random(0)
    caption = "a red circle is to the left of a blue square"
    assert swap_colours(caption, rng) == "a blue circle is to the left of a red square"
    assert flip_relation(caption, rng) == "a red circle is to the right of a blue square"
    changed = change_shape(caption, rng)
    assert changed != caption and len(changed.split()) == len(caption.split())
    assert change_shape("two crosses", rng) in {"two circles", "two squares", "two triangles", "two diamonds"}
    assert hard_negative("nothing to change here", rng) is None


def test_tiny_run_gives_a_loadable_generating_pipeline(tiny_run):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_run / "model")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    clip = CLIPModel.from_pretrained(tiny_run / "model" / "clip")
    text_weights = load_file(tiny_run / "model" / "text_encoder" / "model.safetensors")
    for name, value in clip.text_model.state_dict().items():
        assert torch.equal(text_weights[name], value), name
    assert clip.config.vision_config.image_size == 64
    shipped_vae = load_file(tiny_run / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    fine_tuned_vae = load_file(tiny_run / "decoder" / "final" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped_vae[name], fine_tuned_vae[name]) for name in fine_tuned_vae)


def test_clip_report_says_which_facts_the_encoder_tells_apart(tiny_run):
    report = json.loads((tiny_run / "clip" / "done.json").read_text())
    for kind in ("colour", "shape", "relation"):
        assert 0.0 <= report[f"prefers_caption_over_{kind}_negative"] <= 1.0


def test_finished_stages_are_skipped_on_resume(tiny_run):
    before = (tiny_run / "clip" / "done.json").stat().st_mtime_ns
    train_world(tiny_run, scale="tiny", stages=("tokenizer", "clip"), progress=False)
    assert (tiny_run / "clip" / "done.json").stat().st_mtime_ns == before


TRAINED_STAGES = ["clip", "vae", "unet", "decoder"]


@pytest.mark.parametrize("stage", ["clip", "unet", "decoder"])
def test_interrupted_stage_resumes_to_the_same_weights(tiny_run, tmp_path, monkeypatch, stage):
    out_dir = tmp_path / "run"
    shutil.copytree(tiny_run, out_dir, ignore=shutil.ignore_patterns("model", "report-*"))
    for later in TRAINED_STAGES[TRAINED_STAGES.index(stage) :]:
        shutil.rmtree(out_dir / later)
    stages = ("tokenizer", stage)

    original_save = StageRunner.save_checkpoint

    def save_then_die(runner: StageRunner, step: int) -> None:
        original_save(runner, step)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(StageRunner, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_world(out_dir, scale="tiny", stages=stages, progress=False)
    assert not (out_dir / stage / "final").exists()
    assert torch.load(out_dir / stage / "checkpoint.pt", weights_only=True)["step"] == 2

    train_world(out_dir, scale="tiny", stages=stages, progress=False)
    weights_file = "model.safetensors" if stage == "clip" else "diffusion_pytorch_model.safetensors"
    resumed = load_file(out_dir / stage / "final" / weights_file)
    uninterrupted = load_file(tiny_run / stage / "final" / weights_file)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_unknown_scale_or_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'huge'"):
        train_world(tmp_path, scale="huge")
    with pytest.raises(ValueError, match="'upscaler'"):
        train_world(tmp_path, scale="tiny", stages=("tokenizer", "upscaler"))
