"""The shapes world's training recipe: tokenizer, tiny end-to-end run, interrupt and resume."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import CLIPModel

from condkit.shapes_world.dataset import ShapesDataset, world_words
from condkit.shapes_world.hard_negatives import change_shape, flip_relation, hard_negative, swap_colours
from condkit.shapes_world.assemble import text_encoder_from_clip
from condkit.shapes_world.recipe import SCALES, train_world
from condkit.shapes_world.tokenizer import bytes_to_unicode, build_tokenizer, load_tokenizer
from condkit.shapes_world.train_unet import MIN_SNR_GAMMA, UnetStage, build_unet, training_scheduler
from condkit.shapes_world.train_vae import build_vae
from condkit.shapes_world.world_data import render_pool
from condkit.training import loop
from condkit.training.loop import TrainingConfig
from condkit.training.checkpoint import TRAINABLE_FILE, Checkpoints, list_checkpoints

WORD_PATTERN = re.compile(r"[a-z]+|[^\sa-z]")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(world_words(), tmp_path_factory.mktemp("tokenizer"))


def record_losses(patch: pytest.MonkeyPatch) -> dict[tuple[str, int], float]:
    """Collects every optimizer step's loss of the runs that follow, by (stage, step number)."""
    losses: dict[tuple[str, int], float] = {}
    original = loop._TrainingRun._optimizer_step

    def recorded(run, step: int) -> float:
        losses[(Path(run.config.output_dir).name, step + 1)] = loss = original(run, step)
        return loss

    patch.setattr(loop._TrainingRun, "_optimizer_step", recorded)
    return losses


@pytest.fixture(scope="module")
def tiny_run_and_losses(tmp_path_factory) -> tuple[Path, dict[tuple[str, int], float]]:
    out_dir = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as patch:
        losses = record_losses(patch)
        train_world(out_dir, scale="tiny")
    return out_dir, losses


@pytest.fixture(scope="module")
def tiny_run(tiny_run_and_losses) -> Path:
    return tiny_run_and_losses[0]


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


def test_model_card_holds_the_recipe_and_every_stage_report(tiny_run):
    card = (tiny_run / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers")
    clip_report = json.loads((tiny_run / "clip" / "done.json").read_text())
    vae_report = json.loads((tiny_run / "vae" / "done.json").read_text())
    assert f"| prefers_caption_over_relation_negative | {clip_report['prefers_caption_over_relation_negative']:.4g} |" in card
    assert f"| scorer.reconstructions.colour_shape_binding | {vae_report['scorer']['reconstructions']['colour_shape_binding']:.4g} |" in card
    for stage in ("clip", "vae", "unet", "decoder"):
        assert f"## {stage}\n" in card
    assert "| negatives_per_image | 3 |" in card  # the tiny recipe's setting


def test_finished_stages_are_skipped_on_resume(tiny_run):
    before = (tiny_run / "clip" / "done.json").stat().st_mtime_ns
    train_world(tiny_run, scale="tiny", stages=("tokenizer", "clip"))
    assert (tiny_run / "clip" / "done.json").stat().st_mtime_ns == before


TRAINED_STAGES = ["clip", "vae", "unet", "decoder"]
TINY_STEPS = 4


def interrupt_and_resume(
    tiny_run: Path, tmp_path: Path, stage: str, patch: pytest.MonkeyPatch,
    after_interrupt: Callable[[Path], None] = lambda checkpoint: None,
) -> tuple[Path, dict]:
    """Rerun `stage` (and not the later ones) on a copy of the tiny run, killed right after its first
    checkpoint (step 2), then resumed; returns the copy and the losses of both runs.
    after_interrupt(checkpoint) sees the step-2 checkpoint before the resume replaces it."""
    out_dir = tmp_path / "run"
    shutil.copytree(tiny_run, out_dir, ignore=shutil.ignore_patterns("model", "report-*"))
    for later in TRAINED_STAGES[TRAINED_STAGES.index(stage) :]:
        shutil.rmtree(out_dir / later)
    stages = ("tokenizer", stage)
    losses = record_losses(patch)

    original_save = Checkpoints.save

    def save_then_die(checkpoints: Checkpoints, step: int) -> Path:
        original_save(checkpoints, step)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as dying:
        dying.setattr(Checkpoints, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_world(out_dir, scale="tiny", stages=stages)
    assert not (out_dir / stage / "final").exists()
    assert not (out_dir / stage / "done.json").exists()
    assert [path.name for path in list_checkpoints(out_dir / stage / "checkpoints")] == ["step-000002"]
    assert sorted(losses) == [(stage, 1), (stage, 2)]
    after_interrupt(out_dir / stage / "checkpoints" / "step-000002")

    train_world(out_dir, scale="tiny", stages=stages)
    assert sorted(losses) == [(stage, step) for step in range(1, TINY_STEPS + 1)]
    return out_dir, losses


def assert_same_stage(resumed_dir: Path, uninterrupted_dir: Path, stage: str) -> None:
    """Final model and last checkpoint's trainable state (EMA included) are bit-identical."""
    weights_file = "model.safetensors" if stage == "clip" else "diffusion_pytorch_model.safetensors"
    last_checkpoint = Path("checkpoints") / f"step-{TINY_STEPS:06d}" / TRAINABLE_FILE
    for file in (Path("final") / weights_file, last_checkpoint):
        resumed = load_file(resumed_dir / stage / file)
        uninterrupted = load_file(uninterrupted_dir / stage / file)
        assert resumed.keys() == uninterrupted.keys()
        for name in resumed:
            assert torch.equal(resumed[name], uninterrupted[name]), (file, name)


@pytest.mark.parametrize("stage", ["clip", "vae", "decoder"])
def test_interrupted_stage_resumes_to_the_same_losses_and_weights(tiny_run_and_losses, tmp_path, monkeypatch, stage):
    tiny_run, uninterrupted_losses = tiny_run_and_losses
    out_dir, losses = interrupt_and_resume(tiny_run, tmp_path, stage, monkeypatch)
    assert losses == {key: loss for key, loss in uninterrupted_losses.items() if key[0] == stage}
    assert_same_stage(out_dir, tiny_run, stage)


def test_interrupted_unet_stage_resumes_its_ema(tiny_run_and_losses, tmp_path, monkeypatch):
    """The resumed UNet stage continues the same curve, weights and EMA (diffusers' EMAModel) as the uninterrupted one."""
    tiny_run, uninterrupted_losses = tiny_run_and_losses
    restored: list[tuple[int, dict[str, torch.Tensor]]] = []
    original_load = UnetStage.load_trainable_state_dict

    def load_and_record(method: UnetStage, state: dict[str, torch.Tensor]) -> None:
        original_load(method, state)
        names = [UnetStage.EMA_PREFIX + name for name, _ in method.unet.named_parameters()]
        shadows = {name: shadow.clone() for name, shadow in zip(names, method.ema.shadow_params, strict=True)}
        restored.append((method.ema.optimization_step, shadows))

    monkeypatch.setattr(UnetStage, "load_trainable_state_dict", load_and_record)
    interrupted_state: dict[str, torch.Tensor] = {}
    out_dir, losses = interrupt_and_resume(
        tiny_run, tmp_path, "unet", monkeypatch, lambda checkpoint: interrupted_state.update(
            load_file(checkpoint / TRAINABLE_FILE))
    )  # fmt: skip
    assert losses == {key: loss for key, loss in uninterrupted_losses.items() if key[0] == "unet"}
    assert_same_stage(out_dir, tiny_run, "unet")

    # The resume loaded the step-2 checkpoint once, the EMA's state included.
    [(step, shadows)] = restored
    assert step == 2 and int(interrupted_state[UnetStage.EMA_STEP]) == 2
    assert shadows.keys() == {name for name in interrupted_state if name.startswith(UnetStage.EMA_PREFIX)}
    for name, shadow in shadows.items():
        assert torch.equal(shadow, interrupted_state[name]), name
    # The EMA differs from the trained weights, so the equal EMA tensors at the last step say it carried over.
    last = load_file(tiny_run / "unet" / "checkpoints" / f"step-{TINY_STEPS:06d}" / TRAINABLE_FILE)
    assert int(last[UnetStage.EMA_STEP]) == TINY_STEPS
    trained = [name for name in last if name.startswith("unet.")]
    assert any(not torch.equal(last[UnetStage.EMA_PREFIX + name.removeprefix("unet.")], last[name]) for name in trained)


def test_unet_stage_weights_its_loss_by_min_snr(tiny_run, tmp_path):
    """The loop's snr_gamma (diffusers' compute_snr) gives the UNet stage Min-SNR-5 weights on epsilon."""
    calls = []

    class Recording(UnetStage):
        def forward(self, unet, conditioner, batch, noisy_latents, timesteps):
            prediction = super().forward(unet, conditioner, batch, noisy_latents, timesteps)
            calls.append((batch.noise, timesteps, prediction.detach().clone()))
            return prediction

    text_encoder = text_encoder_from_clip(CLIPModel.from_pretrained(tiny_run / "clip" / "final"))
    unet = UNet2DConditionModel.from_pretrained(tiny_run / "unet" / "final")
    vae = AutoencoderKL.from_pretrained(tiny_run / "vae" / "final")
    method = Recording(unet, load_tokenizer(tiny_run / "tokenizer"), text_encoder, ema_decay=0.9)
    pool = render_pool(SCALES["tiny"].pool_size, 0, tiny_run / "data")
    config = TrainingConfig(tmp_path, max_train_steps=1, train_batch_size=4, snr_gamma=MIN_SNR_GAMMA, show_progress=False)
    result = loop.train(method, unet, vae, training_scheduler(), pool, config)

    [(noise, timesteps, prediction)] = calls
    alphas_cumprod = training_scheduler().alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    per_sample = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
    assert result.losses[0] == pytest.approx((per_sample * snr.clamp(max=MIN_SNR_GAMMA) / snr).mean().item(), rel=1e-5)
    assert result.losses[0] != pytest.approx(per_sample.mean().item(), rel=1e-3)


def test_no_resume_starts_a_stage_over(tiny_run, tmp_path):
    out_dir = tmp_path / "run"
    shutil.copytree(tiny_run, out_dir, ignore=shutil.ignore_patterns("model", "report-*"))
    before = (out_dir / "decoder" / "done.json").stat().st_mtime_ns
    train_world(out_dir, scale="tiny", stages=("tokenizer", "decoder"), resume=False)
    assert (out_dir / "decoder" / "done.json").stat().st_mtime_ns != before
    assert [path.name for path in list_checkpoints(out_dir / "decoder" / "checkpoints")] == [f"step-{TINY_STEPS:06d}"]
    assert_same_stage(out_dir, tiny_run, "decoder")


def test_the_unet_denoises_as_many_latent_channels_as_the_vae_gives():
    scale = SCALES["tiny"]
    vae = build_vae(dataclasses.replace(scale.vae, latent_channels=8), resolution=32)
    latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    unet = build_unet(scale.unet, cross_attention_dim=32, latent_size=8, latent_channels=vae.config.latent_channels)
    prediction = unet(latents, 10, encoder_hidden_states=torch.zeros(1, 4, 32)).sample
    assert latents.shape == prediction.shape == (1, 8, 8, 8)


def test_unknown_scale_or_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'huge'"):
        train_world(tmp_path, scale="huge")
    with pytest.raises(ValueError, match="'upscaler'"):
        train_world(tmp_path, scale="tiny", stages=("tokenizer", "upscaler"))
