"""TrainingConfig.release_vae: every image is encoded before the first step, then the loop lets go of the VAE,
which is freed when the caller holds no other reference; the run learns exactly what it learns without it."""

import gc
import weakref

import pytest
import torch
from PIL import Image

from condkit.training.loop import TrainingConfig, train
from condkit.training.textual_inversion import TextualInversion
from training_helpers import clip
from tiny_models import tiny_sd_pipeline


def squares(n):  # more images than one VAE chunk (8), so the release encodes several chunks up front
    return [(Image.new("RGB", (32, 32), (20 * i, 200 - 10 * i, 40)), "unused") for i in range(n)]


def hand_over_vae(pipe):
    """The pipeline's VAE, which the pipeline no longer holds: the loop gets the only reference."""
    vae, pipe.vae = pipe.vae, None
    return vae


def learn(tmp_path, name, release_vae, **options):
    """The learned vectors, and whether the VAE was alive at each step (seen from the loop's validation callback)."""
    pipe = tiny_sd_pipeline()
    method = TextualInversion(clip(pipe), "<c>", "red")
    config = TrainingConfig(output_dir=tmp_path / name, max_train_steps=3, train_batch_size=4, learning_rate=1e-2,
                            show_progress=False, checkpointing_steps=10, validation_steps=1, release_vae=release_vae,
                            **options)
    vae_alive = weakref.ref(pipe.vae)
    alive_at_steps = []

    def look(step, method):
        gc.collect()
        alive_at_steps.append(vae_alive() is not None)

    train(method, pipe.unet, hand_over_vae(pipe), pipe.scheduler, squares(11), config, conditioner=clip(pipe), validate=look)
    return method.learned_vectors(), alive_at_steps


def test_released_vae_is_freed_and_learning_is_unchanged(tmp_path):
    kept_vectors, kept_alive = learn(tmp_path, "kept", release_vae=False)
    released_vectors, released_alive = learn(tmp_path, "released", release_vae=True)
    assert kept_alive == [True, True, True] and released_alive == [False, False, False]
    assert all(torch.equal(a, b) for a, b in zip(kept_vectors, released_vectors))


def test_release_needs_fixed_views(tmp_path):
    with pytest.raises(ValueError, match="release_vae needs fixed views"):
        learn(tmp_path, "flipped", release_vae=True, random_flip=True)
