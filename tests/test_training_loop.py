"""The shared denoising loop on the tiny offline SD components and solid-colour images."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image
from safetensors.torch import load_file
from tiny_models import tiny_sd_components, tiny_sdxl_pipeline
from torch import nn
from train_loop_ddp_script import CaptionOffset, colour_dataset, ddp_config

from condkit.files import load_pickle_safely
from condkit.training.checkpoint import TRAINABLE_FILE, list_checkpoints
from condkit.training.loop import MethodOutput, NonFiniteLossError, TrainingConfig, TrainingMethod, train

STEPS = 6
CHECKPOINT_EVERY = 3


@pytest.fixture(scope="module")
def parts() -> dict:
    return tiny_sd_components(0)


def offset_method(parts: dict, caption_dropout: float = 0.5, tokens: int = 77) -> CaptionOffset:
    torch.manual_seed(0)
    return CaptionOffset(parts["tokenizer"], parts["text_encoder"], caption_dropout=caption_dropout, tokens=tokens)


def reference_config(output_dir: Path, **changes) -> TrainingConfig:
    """8 images, 2 per step: 4 steps an epoch, so the checkpoint at step 3 falls mid-epoch."""
    settings = dict(
        output_dir=output_dir,
        max_train_steps=STEPS,
        train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        checkpointing_steps=CHECKPOINT_EVERY,
        seed=3,
        show_progress=False,
    )
    return TrainingConfig(**{**settings, **changes})


def run(parts: dict, method: TrainingMethod, config: TrainingConfig, scheduler=None, **options):
    scheduler = scheduler or parts["scheduler"]
    return train(method, parts["unet"], parts["vae"], scheduler, colour_dataset(), config, **options)


@pytest.fixture(scope="module")
def reference(parts: dict, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted run with caption dropout (global RNG), a cosine schedule and two checkpoints."""
    output_dir = tmp_path_factory.mktemp("reference")
    method = offset_method(parts)
    result = run(parts, method, reference_config(output_dir))
    return result, method.offset.detach().clone()


def folder_snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_reference_run_trains_and_checkpoints(reference) -> None:
    result, offset = reference
    assert result.first_step == 0 and result.last_step == STEPS and len(result.losses) == STEPS
    assert all(math.isfinite(loss) and loss > 0 for loss in result.losses)
    assert offset.abs().max() > 1e-3
    names = [path.name for path in list_checkpoints(result.output_dir / "checkpoints")]
    assert names == ["step-000003", "step-000006"]
    final = load_file(result.last_checkpoint / TRAINABLE_FILE)
    assert torch.equal(final["offset"], offset)
    state = json.loads((result.last_checkpoint / "state.json").read_text())
    assert sorted(state) == ["fingerprint", "step"] and state["step"] == STEPS
    assert state["fingerprint"]["method"] == "CaptionOffset"
    assert state["fingerprint"]["trainable"] == {"offset": [77, 32]}


def test_a_checkpoint_is_what_accelerate_saves_plus_the_trainable_weights_and_state_json(reference) -> None:
    checkpoint = reference[0].last_checkpoint
    assert sorted(path.name for path in checkpoint.iterdir()) == [
        "custom_checkpoint_0.pkl",  # learning-rate schedule
        "custom_checkpoint_1.pkl",  # data order
        "optimizer.bin",
        "random_states_0.pkl",
        "state.json",
        "trainable.safetensors",  # instead of accelerate's model.safetensors: no frozen text encoder
    ]
    assert list(load_file(checkpoint / TRAINABLE_FILE)) == ["offset"]
    schedule = load_pickle_safely(checkpoint / "custom_checkpoint_0.pkl")
    assert schedule["last_epoch"] == STEPS
    assert load_pickle_safely(checkpoint / "custom_checkpoint_1.pkl") == {"epoch": 1, "step_in_epoch": 2}
    assert not any(path.name.startswith(".") for path in checkpoint.parent.iterdir())  # no staging folder left


def test_each_image_is_encoded_once_and_reused_every_epoch(parts, tmp_path, monkeypatch) -> None:
    vae = parts["vae"]
    encoded: list[int] = []
    original_encode = vae.encode

    def counting_encode(pixels, *args, **kwargs):
        encoded.append(pixels.shape[0])
        return original_encode(pixels, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting_encode)
    method = offset_method(parts, caption_dropout=0.0)
    # 6 steps of 4 images = 3 epochs of 8 images, encoded in chunks of 4.
    config = reference_config(tmp_path, max_train_steps=6, train_batch_size=4, checkpointing_steps=6, vae_batch_size=4)
    result = run(parts, method, config)
    assert result.last_step == 6
    assert sorted(method.seen_indices) == sorted(list(range(8)) * 3)
    assert encoded == [4, 4]


class Recorder(TrainingMethod):
    """Predicts a learned multiple of the noisy latents and keeps what the loop passed it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls: list[dict] = []

    def forward(self, unet, conditioner, batch, noisy_latents, timesteps):
        prediction = self.scale * noisy_latents
        recorded = dict(noisy=noisy_latents, timesteps=timesteps, prediction=prediction)
        self.calls.append({"batch": batch, **{name: value.detach().clone() for name, value in recorded.items()}})
        return prediction


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_regresses_the_target_the_scheduler_names(parts, tmp_path, prediction_type) -> None:
    scheduler = DDIMScheduler.from_config(parts["scheduler"].config, prediction_type=prediction_type)
    method = Recorder()
    result = run(parts, method, reference_config(tmp_path, max_train_steps=1), scheduler=scheduler)
    call = method.calls[0]
    clean, noise, t = call["batch"].latents, call["batch"].noise, call["timesteps"]
    alphas_cumprod = torch.cumprod(1 - DDPMScheduler.from_config(scheduler.config).betas, dim=0)[t].view(-1, 1, 1, 1)
    assert torch.allclose(call["noisy"], alphas_cumprod.sqrt() * clean + (1 - alphas_cumprod).sqrt() * noise, atol=1e-6)
    target = {
        "epsilon": noise,
        "v_prediction": alphas_cumprod.sqrt() * noise - (1 - alphas_cumprod).sqrt() * clean,
        "sample": clean,
    }[prediction_type]
    assert result.losses[0] == pytest.approx(((call["prediction"] - target) ** 2).mean().item(), rel=1e-5)
    assert t.shape == (2,) and t.dtype == torch.int64 and 0 <= t.min() and t.max() < 1000


def test_noise_offset_adds_one_value_per_sample_and_channel(parts, tmp_path) -> None:
    noises = []
    for offset in (0.0, 0.3):
        method = Recorder()
        run(parts, method, reference_config(tmp_path / str(offset), max_train_steps=1, noise_offset=offset))
        noises.append(method.calls[0]["batch"].noise)
    shift = noises[1] - noises[0]
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-6)
    assert 0.01 < per_channel.abs().mean() < 1.0


def test_gradient_accumulation_equals_the_larger_batch(parts, tmp_path) -> None:
    whole = offset_method(parts, caption_dropout=0.0)
    accumulated = offset_method(parts, caption_dropout=0.0)
    big = run(parts, whole, reference_config(tmp_path / "big", max_train_steps=2, train_batch_size=2))
    small = run(
        parts,
        accumulated,
        reference_config(tmp_path / "small", max_train_steps=2, train_batch_size=1, gradient_accumulation_steps=2),
    )
    assert accumulated.seen_indices == whole.seen_indices
    assert small.losses == pytest.approx(big.losses, rel=1e-5)
    assert torch.allclose(accumulated.offset, whole.offset, atol=1e-5)


class SDXLContext(TrainingMethod):
    """Learned context and pooled embedding for an SDXL UNet, which also needs added_cond_kwargs."""

    def __init__(self, context_width: int, pooled_width: int) -> None:
        super().__init__()
        self.context = nn.Parameter(torch.zeros(77, context_width))
        self.pooled = nn.Parameter(torch.zeros(pooled_width))

    def forward(self, unet, conditioner, batch, noisy_latents, timesteps):
        count = noisy_latents.shape[0]
        size = 8 * noisy_latents.shape[-1]
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=noisy_latents.dtype).repeat(count, 1)
        added = {"text_embeds": self.pooled.expand(count, -1), "time_ids": time_ids.to(noisy_latents.device)}
        context = self.context.expand(count, -1, -1)
        return unet(noisy_latents, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample


def test_a_method_drives_an_sdxl_unet_by_overriding_forward(tmp_path) -> None:
    pipe = tiny_sdxl_pipeline(0)
    method = SDXLContext(pipe.unet.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim)
    config = reference_config(tmp_path, max_train_steps=2)
    result = train(method, pipe.unet, pipe.vae, pipe.scheduler, colour_dataset(), config)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert method.context.abs().max() > 0 and method.pooled.abs().max() > 0
    assert not any(parameter.requires_grad for parameter in pipe.unet.parameters())


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    def validate(at: int, method: TrainingMethod):
        if at == step:
            raise Interrupt
        return None

    return validate


def test_resume_continues_the_uninterrupted_curve_exactly(parts, tmp_path, reference) -> None:
    full, full_offset = reference
    config = reference_config(tmp_path, validation_steps=CHECKPOINT_EVERY)
    with pytest.raises(Interrupt):
        run(parts, offset_method(parts), config, validate=interrupt_at(CHECKPOINT_EVERY))
    assert [path.name for path in list_checkpoints(tmp_path / "checkpoints")] == ["step-000003"]

    method = offset_method(parts)
    resumed = run(parts, method, reference_config(tmp_path, resume_from_checkpoint="latest"))
    assert resumed.first_step == CHECKPOINT_EVERY
    assert resumed.losses == full.losses[CHECKPOINT_EVERY:]
    assert torch.equal(method.offset.detach(), full_offset)


class ExplodesAtCall(CaptionOffset):
    def __init__(self, *args, explode_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.explode_at = explode_at
        self.call_count = 0

    def forward(self, unet, conditioner, batch, noisy_latents, timesteps):
        self.call_count += 1
        prediction = super().forward(unet, conditioner, batch, noisy_latents, timesteps)
        return prediction * float("nan") if self.call_count == self.explode_at else prediction

    @property
    def method_name(self) -> str:
        return "CaptionOffset"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(parts, tmp_path, reference) -> None:
    full, _ = reference
    torch.manual_seed(0)
    method = ExplodesAtCall(parts["tokenizer"], parts["text_encoder"], caption_dropout=0.5, explode_at=5)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 .*the last good checkpoint is .*step-000003"):
        run(parts, method, reference_config(tmp_path))
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [path.name for path in kept] == ["step-000003"]
    reference_kept = full.output_dir / "checkpoints" / "step-000003"
    assert folder_snapshot(kept[0]) == folder_snapshot(reference_kept)


class NanGradient(CaptionOffset):
    """A finite loss whose gradient is NaN: sqrt'(0) * abs'(0) = inf * 0."""

    def forward(self, unet, conditioner, batch, noisy_latents, timesteps):
        prediction = super().forward(unet, conditioner, batch, noisy_latents, timesteps)
        return MethodOutput(prediction, extra_loss=torch.sqrt((self.offset - self.offset.detach()).abs().sum()))


def test_nan_gradient_stops_the_run(parts, tmp_path) -> None:
    method = NanGradient(parts["tokenizer"], parts["text_encoder"])
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is nan at step 1; .*none"):
        run(parts, method, reference_config(tmp_path))
    assert torch.equal(method.offset.detach(), torch.zeros(77, 32))
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_validation_images_are_saved_and_do_not_change_the_curve(parts, tmp_path, reference) -> None:
    full, _ = reference
    seen: list[tuple[int, bool, bool]] = []

    def validate(step: int, method: TrainingMethod) -> list[Image.Image]:
        seen.append((step, method.training, torch.is_grad_enabled()))
        noise = torch.rand(2) + random.random() + np.random.rand()  # consumes every global generator
        value = int(noise.sum().item() * 40) % 256
        return [Image.new("RGB", (8, 8), (value, step, 0)), Image.new("RGB", (8, 8), (0, step, value))]

    result = run(parts, offset_method(parts), reference_config(tmp_path, validation_steps=2), validate=validate)
    assert result.losses == full.losses
    assert seen == [(2, False, False), (4, False, False), (6, False, False)]
    assert [folder.name for folder in result.validation_dirs] == ["step-000002", "step-000004", "step-000006"]
    for folder in result.validation_dirs:
        assert sorted(path.name for path in folder.iterdir()) == ["00.png", "01.png", "grid.png"]
        assert Image.open(folder / "00.png").getpixel((0, 0))[1] == int(folder.name[-1])


class OtherMethod(CaptionOffset):
    pass


MISMATCHES = {
    "shape": (
        lambda parts: offset_method(parts, tokens=10),
        {},
        r"trainable tensor 'offset' has shape \[77, 32\] there but \[10, 32\] in this run",
    ),
    "method": (
        lambda parts: OtherMethod(parts["tokenizer"], parts["text_encoder"], caption_dropout=0.5),
        {},
        r"method is 'CaptionOffset' there but 'OtherMethod' in this run",
    ),
    "settings": (
        lambda parts: offset_method(parts, caption_dropout=0.25),
        {},
        r"settings is \{'caption_dropout': 0.5\} there but \{'caption_dropout': 0.25\} in this run",
    ),
    "config": (offset_method, {"learning_rate": 2e-2}, r"learning_rate is 0.01 there but 0.02 in this run"),
    "schedule length": (offset_method, {"max_train_steps": 9}, r"max_train_steps is 6 there but 9 in this run"),
    "fresh start": (
        offset_method,
        {"resume_from_checkpoint": None},
        r"already holds checkpoints \(latest step-000006\)",
    ),
}


@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_resuming_another_runs_checkpoint_is_refused_and_changes_nothing(parts, tmp_path, reference, mismatch) -> None:
    make_method, changes, message = MISMATCHES[mismatch]
    folder = tmp_path / "run"
    shutil.copytree(reference[0].output_dir, folder)
    before = folder_snapshot(folder)
    config = reference_config(folder, **{"resume_from_checkpoint": "latest", **changes})
    with pytest.raises(ValueError, match=message) as error:
        run(parts, make_method(parts), config)
    assert "\n" not in str(error.value)
    assert folder_snapshot(folder) == before


def test_incomplete_checkpoint_folders_are_ignored(parts, tmp_path, reference) -> None:
    folder = tmp_path / "run"
    shutil.copytree(reference[0].output_dir, folder)
    shutil.rmtree(folder / "checkpoints" / "step-000006")
    (folder / "checkpoints" / ".step-000006.tmp").mkdir()  # a run killed while writing
    (folder / "checkpoints" / "step-000009").mkdir()  # no state.json
    method = offset_method(parts)
    resumed = run(parts, method, reference_config(folder, resume_from_checkpoint="latest"))
    assert resumed.first_step == CHECKPOINT_EVERY
    assert resumed.losses == reference[0].losses[CHECKPOINT_EVERY:]
    assert torch.equal(method.offset.detach(), reference[1])


def test_old_checkpoints_are_pruned_to_the_limit(parts, tmp_path) -> None:
    config = reference_config(tmp_path, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2)
    run(parts, offset_method(parts), config)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


class PoisonsWeightAt(CaptionOffset):
    """Writes a NaN into its trained offset after optimizer step `poison_at` (loss and gradients stay finite)."""

    def __init__(self, *args, poison_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poison_at = poison_at

    def after_optimizer_step(self, step: int) -> None:
        if step == self.poison_at:
            with torch.no_grad():
                self.offset[0, 0] = float("nan")

    @property
    def method_name(self) -> str:
        return "CaptionOffset"


def poisoned_method(parts: dict, poison_at: int) -> PoisonsWeightAt:
    torch.manual_seed(0)
    return PoisonsWeightAt(parts["tokenizer"], parts["text_encoder"], caption_dropout=0.5, poison_at=poison_at)


def test_a_non_finite_weight_stops_the_run_and_resume_continues_from_the_last_finite_checkpoint(
    parts, tmp_path, reference
) -> None:
    full, full_offset = reference
    message = r"tensor 'offset' is not finite after step 5; training stopped, the last good checkpoint is .*step-000003$"
    with pytest.raises(NonFiniteLossError, match=message):
        run(parts, poisoned_method(parts, poison_at=5), reference_config(tmp_path))
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["step-000003"]
    assert torch.isfinite(load_file(tmp_path / "checkpoints" / "step-000003" / TRAINABLE_FILE)["offset"]).all()

    method = offset_method(parts)
    resumed = run(parts, method, reference_config(tmp_path, resume_from_checkpoint="latest"))
    assert resumed.first_step == CHECKPOINT_EVERY
    assert resumed.losses == full.losses[CHECKPOINT_EVERY:]
    assert torch.equal(method.offset.detach(), full_offset)


def test_a_weight_that_turns_non_finite_on_a_checkpoint_step_is_never_written(parts, tmp_path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"not finite after step 3; .*none \(no checkpoint was written yet\)$"):
        run(parts, poisoned_method(parts, poison_at=3), reference_config(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoints_refuse_non_finite_weights_even_unchecked_by_the_step(parts, tmp_path, monkeypatch) -> None:
    from condkit.training import loop

    monkeypatch.setattr(loop._TrainingRun, "_check_weights_finite", lambda self, done: None)
    message = r"'offset' is not finite at step 3; no checkpoint was written, the last good checkpoint is none \(no"
    with pytest.raises(NonFiniteLossError, match=message):
        run(parts, poisoned_method(parts, poison_at=3), reference_config(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # no checkpoint, no staging folder


def test_an_infinite_learning_rate_stops_at_the_first_step(parts, tmp_path) -> None:
    config = reference_config(tmp_path, learning_rate=math.inf, lr_warmup_steps=0, lr_scheduler="constant")
    with pytest.raises(NonFiniteLossError, match=r"'offset' is not finite after step 1; .*none"):
        run(parts, offset_method(parts), config)
    assert not (tmp_path / "checkpoints").exists()


def copy_of_reference(reference, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "run"
    shutil.copytree(reference[0].output_dir, folder)
    return folder, folder / "checkpoints" / "step-000006"


class NotPlainData:
    pass


@pytest.mark.parametrize(
    "damage, error, message",
    [
        ("rng", ValueError, r"step-000006 is damaged \(random_states_0.pkl: missing\); refusing to resume from it$"),
        ("code", ValueError, r"refusing to load .*custom_checkpoint_1.pkl: it needs arbitrary unpickling"),
        ("old format", ValueError, r"step-000006: it was written by a condkit older than its accelerate save_state"),
    ],
)
def test_damaged_or_unsafe_checkpoints_are_refused_before_anything_loads(
    parts, tmp_path, reference, damage, error, message
) -> None:
    folder, checkpoint = copy_of_reference(reference, tmp_path)
    if damage == "rng":
        (checkpoint / "random_states_0.pkl").unlink()  # accelerate's load_state would carry on without it
    elif damage == "code":
        # accelerate itself would unpickle it with weights_only=False, running whatever it names
        torch.save({"epoch": NotPlainData()}, checkpoint / "custom_checkpoint_1.pkl")
    else:
        os.replace(checkpoint / "optimizer.bin", checkpoint / "optimizer.pt")
    before = folder_snapshot(folder)
    resume = checkpoint if damage == "rng" else "latest"  # "latest" would skip the damaged one (test_checkpoint_recovery)
    with pytest.raises(error, match=message):
        run(parts, offset_method(parts), reference_config(folder, resume_from_checkpoint=resume))
    assert folder_snapshot(folder) == before


def test_one_accelerator_serves_consecutive_runs(parts, tmp_path) -> None:
    from condkit.training.loop import make_accelerator

    accelerator = make_accelerator("no")
    for name in ("first", "second"):
        config = reference_config(tmp_path / name, max_train_steps=1, checkpointing_steps=1)
        run(parts, offset_method(parts), config, accelerator=accelerator)
    second = tmp_path / "second" / "checkpoints" / "step-000001"
    assert sorted(path.name for path in second.iterdir() if path.suffix in (".bin", ".pkl")) == [
        "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "optimizer.bin", "random_states_0.pkl",
    ]  # fmt: skip
    accelerator.prepare(nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"already holds prepared or registered objects"):
        run(parts, offset_method(parts), reference_config(tmp_path / "third"), accelerator=accelerator)


def test_textual_inversion_checkpoints_hold_the_new_rows_not_the_token_table(tmp_path) -> None:
    from tiny_models import tiny_sd_pipeline
    from training_helpers import clip, train_with_clip

    from condkit.training.textual_inversion import TextualInversion

    def textual_inversion_run(output_dir: Path, validate=None, **changes):
        pipe = tiny_sd_pipeline()  # a fresh one: the method adds its token to the pipeline's tokenizer
        method = TextualInversion(clip(pipe), "<c>", "red", num_vectors=2)
        config = reference_config(output_dir, max_train_steps=4, checkpointing_steps=2, learning_rate=5e-2, **changes)
        return train_with_clip(pipe, method, colour_dataset(), config, validate=validate), method

    full, full_method = textual_inversion_run(tmp_path / "full")
    checkpoint = full.last_checkpoint
    assert "model.safetensors" not in {path.name for path in checkpoint.iterdir()}
    trainable = load_file(checkpoint / TRAINABLE_FILE)
    assert {name: list(tensor.shape) for name, tensor in trainable.items()} == {"embeddings.0.new_rows": [2, 32]}
    assert (checkpoint / TRAINABLE_FILE).stat().st_size < 4096  # the base table alone is 514 x 32 floats (64 KiB)

    with pytest.raises(Interrupt):
        textual_inversion_run(tmp_path / "cut", validate=interrupt_at(2), validation_steps=2)
    resumed, method = textual_inversion_run(tmp_path / "cut", resume_from_checkpoint="latest")
    assert resumed.losses == full.losses[2:]
    assert torch.equal(method.learned_vectors()[0], full_method.learned_vectors()[0])


def test_progress_bar_shows_the_loss_unless_silenced(parts, tmp_path, capsys) -> None:
    run(parts, offset_method(parts), reference_config(tmp_path / "loud", max_train_steps=1, show_progress=True))
    assert "loss=" in capsys.readouterr().err
    run(parts, offset_method(parts), reference_config(tmp_path / "quiet", max_train_steps=1))
    captured = capsys.readouterr()
    assert "training" not in captured.err and "loss=" not in captured.out


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train_batch_size": 0}, r"train_batch_size must be a positive integer, got 0"),
        ({"lr_scheduler": "warp"}, r"unknown lr_scheduler 'warp'; expected one of .*cosine"),
        ({"mixed_precision": "fp8"}, r"unknown mixed_precision 'fp8'"),
        ({"noise_offset": -0.1}, r"noise_offset must be non-negative, got -0.1"),
    ],
)
def test_bad_settings_are_named(tmp_path, changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        reference_config(tmp_path, **changes)


def test_bad_inputs_are_named(parts, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"dataset has 8 images but one optimizer step needs 16"):
        run(parts, offset_method(parts), reference_config(tmp_path, train_batch_size=16))
    frozen = offset_method(parts).requires_grad_(False)
    with pytest.raises(ValueError, match=r"CaptionOffset has no trainable parameters"):
        run(parts, frozen, reference_config(tmp_path))
    with pytest.raises(ValueError, match=r"unsupported prediction_type 'flow'"):
        scheduler = DDIMScheduler.from_config(parts["scheduler"].config, prediction_type="flow")
        run(parts, offset_method(parts), reference_config(tmp_path), scheduler=scheduler)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        run(parts, offset_method(parts), reference_config(tmp_path, resume_from_checkpoint=tmp_path / "missing"))
    with pytest.raises(TypeError, match=r"dataset item 0 is a str; expected an \(image, caption\) pair"):
        not_pairs = ["x"] * 8
        method, config = offset_method(parts), reference_config(tmp_path)
        train(method, parts["unet"], parts["vae"], parts["scheduler"], not_pairs, config)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"'fp16' needs a CUDA GPU"):
            run(parts, offset_method(parts), reference_config(tmp_path, mixed_precision="fp16"))


SCRIPT = Path(__file__).with_name("train_loop_ddp_script.py")


def run_script(command: list[str]) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]


def test_bf16_mixed_precision_autocasts_and_keeps_trainable_weights_in_fp32(tmp_path) -> None:
    run_script([sys.executable, str(SCRIPT), str(tmp_path), "--mixed-precision", "bf16"])
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["prediction_dtypes"] == ["torch.bfloat16"]
    assert report["trainable_dtype"] == "torch.float32"
    assert report["last_step"] == 2 and all(math.isfinite(loss) for loss in report["losses"])
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["fingerprint"]["mixed_precision"] == "bf16"


def test_two_processes_average_gradients_like_one_process_with_the_whole_batch(parts, tmp_path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_script([*torchrun, str(SCRIPT), str(tmp_path)])

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    weights = [load_file(tmp_path / f"rank{rank}.safetensors")["offset"] for rank in (0, 1)]
    assert [report["last_step"] for report in reports] == [2, 2]
    assert reports[0]["indices"] != reports[1]["indices"]  # different data shards ...
    assert torch.equal(weights[0], weights[1])  # ... yet identical weights: gradients were averaged
    assert weights[0].abs().max() > 1e-3
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    single = offset_method(parts, caption_dropout=0.0)
    result = run(parts, single, ddp_config(tmp_path / "single", train_batch_size=2))
    assert sorted(single.seen_indices) == sorted(reports[0]["indices"] + reports[1]["indices"])
    assert reports[0]["losses"] == pytest.approx(result.losses, rel=1e-5)
    # Adam divides by the gradient's own scale, so float reduction order shows up at ~1e-5 of the weights.
    assert torch.allclose(weights[0], single.offset.detach(), atol=1e-4)


def test_the_same_command_under_two_processes_gives_the_one_process_result(tmp_path) -> None:
    """`condkit train adapter` with random crops and flips: 2 processes x 1 image x 2 micro-batches = 1 x 2 x 2."""
    from condkit.cli import main
    from tiny_models import tiny_sd_pipeline

    model, data = tmp_path / "model", tmp_path / "data"
    tiny_sd_pipeline().save_pretrained(model)
    data.mkdir()
    for index, (image, caption) in enumerate(colour_dataset(8, size=24)):
        image.save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(caption)
    command = ["train", "adapter", "--kind", "projection", "--project-all-timesteps", "--model", str(model), "--data", str(data),
               "--steps", "2", "--learning-rate", "0.01", "--resolution", "16", "--random-crop", "--flip",
               "--gradient-accumulation-steps", "2", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_script([*torchrun, str(SCRIPT), "--condkit", *command, "--batch-size", "1", "--out", str(tmp_path / "two")])
    assert main([*command, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0

    weights = "conditioner/projection/diffusion_pytorch_model.safetensors"
    two, one = load_file(tmp_path / "two" / weights), load_file(tmp_path / "one" / weights)
    assert any(tensor.abs().max() > 0 for tensor in one.values())
    for name in one:  # Adam's first steps are ~lr·sign(gradient): reduction order shows at ~3e-5 of 0.02 weights
        assert torch.allclose(two[name], one[name], atol=1e-4), name
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "loss_log.jsonl").read_text().splitlines()]
              for run in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
