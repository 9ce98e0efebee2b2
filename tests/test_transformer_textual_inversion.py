"""Textual inversion trained on SD3 (CLIP-L, CLIP-G, T5) and Flux (CLIP-L, T5) through the shared loop with the
flow-matching objective, written in their single-file layouts and loaded back."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from condkit import load_conditioner, load_embedding
from condkit.conditioning.embedding_formats import detect_format
from condkit.training.flow_matching import FlowMatching
from condkit.training.loop import TrainingConfig, train
from condkit.training.textual_inversion import TextualInversion
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline


def test_noisy_latents_are_the_schedulers_scale_noise_and_t_is_sigma_times_1000():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's
    process = FlowMatching(scheduler)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    indices = torch.tensor([0, 400, 999])
    noisy, timesteps = process.noisy(latents, noise, indices)
    for row, index in enumerate(indices.tolist()):
        expected = scheduler.scale_noise(latents[row : row + 1], scheduler.timesteps[index : index + 1], noise[row : row + 1])
        torch.testing.assert_close(noisy[row : row + 1], expected)
        assert float(timesteps[row]) == pytest.approx(float(scheduler.sigmas[index]) * 1000, rel=1e-6)
    assert torch.equal(process.target(latents, noise), noise - latents)


def red_squares(n: int = 4):
    return [(Image.new("RGB", (32, 32), (200, 20, 20)), "unused") for _ in range(n)]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_textual_inversion_trains_a_token_in_every_encoder_and_loads_back(family, tmp_path):
    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    t5 = pipe.text_encoder_3 if family == "sd3" else pipe.text_encoder_2
    t5.resize_token_embeddings(len(t5.get_input_embeddings().weight) + 4)  # as real T5: rows past its tokenizer
    conditioner = load_conditioner("clip", pipe, max_sequence_length=32)
    transformer_before = {name: value.clone() for name, value in pipe.transformer.named_parameters()}
    method = TextualInversion(conditioner, "<c>", "red", num_vectors=2)
    start = method.learned_vectors()
    assert [vectors.shape[1] for vectors in start] == ([32, 32, 96] if family == "sd3" else [32, 96])
    config = TrainingConfig(output_dir=tmp_path / "run", max_train_steps=3, train_batch_size=2, learning_rate=1e-2,
                            show_progress=False, checkpointing_steps=10)
    result = train(method, pipe.transformer, pipe.vae, pipe.scheduler, red_squares(), config, conditioner=conditioner)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    for learned, initial in zip(method.learned_vectors(), start, strict=True):
        assert not torch.equal(learned, initial)  # every encoder's rows moved
    assert all(torch.equal(value, transformer_before[name]) for name, value in pipe.transformer.named_parameters())

    (path,) = method.save_embedding(str(tmp_path / "c.safetensors"))
    assert detect_format(path) == f"{family}_single_file"
    with torch.no_grad():
        trained = conditioner.encode("a photo of <c>").tensors()
    fresh = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    load_embedding(fresh, path, token="<c>")  # the single-file layouts store no name (the stem would be "c")
    with torch.no_grad():
        loaded = load_conditioner("clip", fresh, max_sequence_length=32).encode("a photo of <c>").tensors()
    for name, tensor in trained.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=1e-6)


def test_min_snr_is_refused_for_flow_matching(tmp_path):
    pipe = tiny_sd3_pipeline()
    conditioner = load_conditioner("clip", pipe, max_sequence_length=32)
    method = TextualInversion(conditioner, "<c>", "red")
    config = TrainingConfig(output_dir=tmp_path / "run", max_train_steps=1, train_batch_size=2, snr_gamma=5.0, show_progress=False)
    with pytest.raises(ValueError, match="snr_gamma \\(Min-SNR\\) weights DDPM timesteps; this model's FlowMatchEulerDiscreteScheduler"):
        train(method, pipe.transformer, pipe.vae, pipe.scheduler, red_squares(), config, conditioner=conditioner)
