"""Watching and scaling a run: trackers, 8-bit Adam and gradient checkpointing on the shared loop."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tiny_models import tiny_sd_components
from train_loop_ddp_script import CaptionOffset, colour_dataset

from condkit.training.loop import TrainingConfig, enable_gradient_checkpointing, make_accelerator, train


@pytest.fixture(scope="module")
def parts():
    return tiny_sd_components(0)


def config(folder, **changes):
    settings = dict(output_dir=folder, max_train_steps=2, train_batch_size=2, learning_rate=1e-2, seed=3,
                    checkpointing_steps=100, show_progress=False)
    return TrainingConfig(**{**settings, **changes})


def test_a_missing_tracker_or_optimizer_package_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^report_to 'tensorboard' needs the tensorboard package, which is not installed"):
        config(tmp_path, report_to="tensorboard")
    with pytest.raises(ValueError, match=r"^use_8bit_adam needs the bitsandbytes package"):
        config(tmp_path, use_8bit_adam=True)
    with pytest.raises(ValueError, match=r"^unknown report_to 'tensorbored'; expected one of: none, "):
        make_accelerator("no", report_to="tensorbored")
    assert not any(tmp_path.iterdir())


def test_gradient_checkpointing_recomputes_the_unet_and_keeps_the_curve(parts, tmp_path):
    torch.manual_seed(0)
    plain = CaptionOffset(parts["tokenizer"], parts["text_encoder"])
    plain_result = train(plain, parts["unet"], parts["vae"], parts["scheduler"], colour_dataset(), config(tmp_path / "a"))

    unet = tiny_sd_components(0)["unet"]
    calls = []
    block = unet.up_blocks[-1].resnets[0]  # downstream of the cross-attention, so its input needs gradients
    block.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    torch.manual_seed(0)
    checkpointed = CaptionOffset(parts["tokenizer"], parts["text_encoder"])
    result = train(checkpointed, unet, parts["vae"], parts["scheduler"], colour_dataset(),
                   config(tmp_path / "b", gradient_checkpointing=True))
    assert unet.up_blocks[-1].gradient_checkpointing
    assert len(calls) == 2 * 2  # each of the 2 steps runs the block forward, then again in the backward pass
    assert result.losses == pytest.approx(plain_result.losses, rel=1e-6)
    assert torch.allclose(checkpointed.offset, plain.offset, atol=1e-6)


def test_gradient_checkpointing_switches_only_models_that_support_it(parts):
    assert enable_gradient_checkpointing(torch.nn.Linear(2, 2), None) == 0
    assert enable_gradient_checkpointing(tiny_sd_components(0)["text_encoder"]) == 1


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        super().__init__()
        self.config, self.logged, self.finished = None, [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_trackers_get_every_steps_loss_and_the_settings(parts, tmp_path):
    tracker = RecordingTracker()
    method = CaptionOffset(parts["tokenizer"], parts["text_encoder"])
    result = train(method, parts["unet"], parts["vae"], parts["scheduler"], colour_dataset(), config(tmp_path, max_train_steps=3),
                   accelerator=Accelerator(log_with=[tracker], cpu=True))
    assert [step for step, _ in tracker.logged] == [1, 2, 3]
    assert [values["loss"] for _, values in tracker.logged] == result.losses
    assert all(values["lr"] == 1e-2 for _, values in tracker.logged)
    assert tracker.config["learning_rate"] == 1e-2 and tracker.config["max_train_steps"] == 3 and tracker.finished
