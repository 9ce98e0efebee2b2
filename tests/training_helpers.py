"""Shared by the training tests: train a method whose conditioner is the pipeline's own CLIP."""

from condkit.conditioning.clip import CLIPConditioner
from condkit.training.loop import train


def clip(pipe) -> CLIPConditioner:
    """The pipeline's CLIP encoders as a conditioner (shared, so rows a method installs are seen by every such wrapper)."""
    return CLIPConditioner.from_pipeline(pipe)


def train_with_clip(pipe, method, dataset, config, **options):
    return train(method, pipe.unet, pipe.vae, pipe.scheduler, dataset, config, conditioner=clip(pipe), **options)
