"""Resuming past a damaged checkpoint: "latest" falls back to the newest intact one, saying so in one line.

A tiny run checkpoints at steps 2 and 4; each test damages a copy of it. Resuming the "latest"
must skip the damaged step 4 with one warning line naming the file, and continue from step 2
exactly as the uninterrupted run did; naming the damaged checkpoint explicitly is refused in one
line; with every checkpoint damaged the resume is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_sd_components
from train_loop_ddp_script import CaptionOffset, colour_dataset

from condkit.training.checkpoint import TRAINABLE_FILE, DamagedCheckpointError, list_checkpoints
from condkit.training.loop import TrainingConfig, train

STEPS = 4
EVERY = 2



@pytest.fixture(scope="module")
def parts() -> dict:
    return tiny_sd_components(0)


def method(parts: dict) -> CaptionOffset:
    torch.manual_seed(0)  # caption dropout draws from the global generator: the resume must restore it
    return CaptionOffset(parts["tokenizer"], parts["text_encoder"], caption_dropout=0.5)


def config(output_dir: Path, **changes) -> TrainingConfig:
    settings = dict(
        output_dir=output_dir, max_train_steps=STEPS, train_batch_size=2, learning_rate=1e-2, lr_scheduler="cosine",
        lr_warmup_steps=1, checkpointing_steps=EVERY, seed=5, show_progress=False,
    )  # fmt: skip
    return TrainingConfig(**{**settings, **changes})


def run(parts: dict, trained: CaptionOffset, settings: TrainingConfig):
    return train(trained, parts["unet"], parts["vae"], parts["scheduler"], colour_dataset(), settings)


@pytest.fixture(scope="module")
def reference(parts: dict, tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run: its result, final weights, and checkpoints at steps 2 and 4."""
    trained = method(parts)
    result = run(parts, trained, config(tmp_path_factory.mktemp("reference")))
    assert [path.name for path in list_checkpoints(result.output_dir / "checkpoints")] == ["step-000002", "step-000004"]
    return result, trained.offset.detach().clone()


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def copy_run(reference, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(reference[0].output_dir, folder)
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_nan(path: Path) -> None:
    tensors = load_file(path)
    tensors["offset"][3, 7] = math.nan
    save_file(tensors, path)


# damage: (what it does to a checkpoint folder, the file it leaves bad, words of the reason)
DAMAGES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "empty state.json": (lambda folder: (folder / "state.json").write_text(""), "state.json", "empty"),
    "state.json not JSON": (
        lambda folder: (folder / "state.json").write_text('{"step": 4, "fingerp'), "state.json", "not valid JSON"
    ),
    "truncated weights": (lambda folder: truncate(folder / TRAINABLE_FILE), TRAINABLE_FILE, "truncated or corrupted"),
    "NaN in weights": (
        lambda folder: write_nan(folder / TRAINABLE_FILE), TRAINABLE_FILE, "tensor 'offset' holds NaN or infinite"
    ),
    "empty scheduler file": (
        lambda folder: (folder / "custom_checkpoint_0.pkl").write_bytes(b""), "custom_checkpoint_0.pkl", "empty"
    ),
    "truncated data order": (
        lambda folder: truncate(folder / "custom_checkpoint_1.pkl"), "custom_checkpoint_1.pkl", "truncated"
    ),
    "truncated optimizer": (lambda folder: truncate(folder / "optimizer.bin"), "optimizer.bin", "truncated"),
    "missing generator states": (
        lambda folder: (folder / "random_states_0.pkl").unlink(), "random_states_0.pkl", "missing"
    ),
}


def condkit_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("condkit") and record.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_latest_skips_a_damaged_newest_checkpoint_and_continues_the_curve_exactly(
    parts, tmp_path, reference, damage, caplog
) -> None:
    full, full_offset = reference
    damage_folder, bad_file, reason = DAMAGES[damage]
    folder = copy_run(reference, tmp_path)
    newest = folder / "checkpoints" / "step-000004"
    damage_folder(newest)

    trained = method(parts)
    with caplog.at_level(logging.WARNING, logger="condkit"):
        resumed = run(parts, trained, config(folder, resume_from_checkpoint="latest"))

    [warning] = condkit_warnings(caplog)
    assert warning.startswith(f"checkpoint {newest} is damaged ({bad_file}: ")
    assert reason in warning and warning.endswith("; resuming from step-000002 instead")
    assert "\n" not in warning
    assert resumed.first_step == EVERY
    assert resumed.losses == full.losses[EVERY:]  # bit for bit
    assert torch.equal(trained.offset.detach(), full_offset)
    # The damaged checkpoint has been replaced by an intact one, equal to the uninterrupted run's.
    reference_newest = full.output_dir / "checkpoints" / "step-000004"
    assert (newest / TRAINABLE_FILE).read_bytes() == (reference_newest / TRAINABLE_FILE).read_bytes()


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_named_explicitly_is_refused_naming_the_file(parts, tmp_path, reference, damage) -> None:
    damage_folder, bad_file, reason = DAMAGES[damage]
    folder = copy_run(reference, tmp_path)
    newest = folder / "checkpoints" / "step-000004"
    damage_folder(newest)
    before = snapshot(folder)
    with pytest.raises(DamagedCheckpointError) as error:
        run(parts, method(parts), config(folder, resume_from_checkpoint=newest))
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert message.startswith(f"checkpoint {newest} is damaged ({bad_file}: ")
    assert reason in message and message.endswith("; refusing to resume from it")
    assert snapshot(folder) == before


def test_with_every_checkpoint_damaged_the_resume_is_refused_in_one_line(parts, tmp_path, reference, caplog) -> None:
    folder = copy_run(reference, tmp_path)
    checkpoints = folder / "checkpoints"
    (checkpoints / "step-000004" / "state.json").write_text("")
    truncate(checkpoints / "step-000002" / TRAINABLE_FILE)
    before = snapshot(folder)
    with caplog.at_level(logging.WARNING, logger="condkit"), pytest.raises(ValueError) as error:
        run(parts, method(parts), config(folder, resume_from_checkpoint="latest"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {checkpoints / 'step-000004'} is damaged (state.json: empty) and so is")
    assert "cannot resume" in message
    assert condkit_warnings(caplog) == []  # nothing was resumed, so no "resuming from" line
    assert snapshot(folder) == before


def test_a_fingerprint_mismatch_is_refused_not_skipped(parts, tmp_path, reference, caplog) -> None:
    """Another run's checkpoint is not damage: skipping it silently would hide the mix-up."""
    folder = copy_run(reference, tmp_path)
    state_file = folder / "checkpoints" / "step-000004" / "state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"]["learning_rate"] = 0.5
    state_file.write_text(json.dumps(state))
    before = snapshot(folder)
    with caplog.at_level(logging.WARNING, logger="condkit"), pytest.raises(ValueError) as error:
        run(parts, method(parts), config(folder, resume_from_checkpoint="latest"))
    assert not isinstance(error.value, DamagedCheckpointError)
    assert str(error.value).endswith("step-000004: learning_rate is 0.5 there but 0.01 in this run")
    assert condkit_warnings(caplog) == []
    assert snapshot(folder) == before


def test_an_older_checkpoint_of_another_run_is_refused_not_resumed_after_the_fallback(parts, tmp_path, reference) -> None:
    folder = copy_run(reference, tmp_path)
    checkpoints = folder / "checkpoints"
    (checkpoints / "step-000004" / "state.json").write_text("")
    state_file = checkpoints / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"]["learning_rate"] = 0.5
    state_file.write_text(json.dumps(state))
    before = snapshot(folder)
    with pytest.raises(ValueError) as error:
        run(parts, method(parts), config(folder, resume_from_checkpoint="latest"))
    message = str(error.value)
    assert not isinstance(error.value, DamagedCheckpointError) and "\n" not in message
    assert message.startswith(f"checkpoint {checkpoints / 'step-000004'} is damaged (state.json: empty); ")
    assert message.endswith("step-000002: learning_rate is 0.5 there but 0.01 in this run")
    assert snapshot(folder) == before
