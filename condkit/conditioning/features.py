"""PipelineFeatures: prompt_embeds that are not embeddings yet.

A timestep-aware conditioner's `encode()` returns *features* (language-model states, marked CLIP
embeddings, packed parts) that only its `at_timestep(features, t)` turns into what a denoiser may
see. They travel through a diffusers pipeline like prompt embeddings — moved, cast, repeated per
image, concatenated for CFG — and `attach`'s hooks map them at every denoiser call.

Without `attach` nothing would map them and the denoiser would draw from the raw features: wrong
images, no error. So features are a tensor subclass that lets the pipeline move them about but
refuses to be *computed with*: the first linear, attention or normalisation layer that reads them
raises `FeaturesNotAttachedError`. The hooks hand `at_timestep` a plain tensor.
"""

from __future__ import annotations

import torch
from torch.nn import functional

_COMPUTING_OPERATIONS = frozenset(
    {
        functional.linear,
        functional.bilinear,
        functional.conv1d,
        functional.conv2d,
        functional.layer_norm,
        functional.group_norm,
        functional.rms_norm,
        functional.scaled_dot_product_attention,
        functional.multi_head_attention_forward,
        torch.matmul,
        torch.bmm,
        torch.baddbmm,
        torch.einsum,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.bmm,
        torch.Tensor.baddbmm,
    }
)


class FeaturesNotAttachedError(RuntimeError):
    pass


class PipelineFeatures(torch.Tensor):
    """A tensor of conditioner features: movable and reshapeable, never an input to a layer."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _COMPUTING_OPERATIONS:
            raise FeaturesNotAttachedError(
                "prompt_embeds hold features of a timestep-aware conditioner, which only its at_timestep() turns into "
                "conditioning; run the pipeline inside `with condkit.attach(pipe, conditioner):`"
            )
        return super().__torch_function__(func, types, args, kwargs or {})


def as_features(tensor: torch.Tensor) -> PipelineFeatures:
    return tensor if isinstance(tensor, PipelineFeatures) else tensor.as_subclass(PipelineFeatures)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The same data as an ordinary tensor (what at_timestep receives)."""
    return tensor.as_subclass(torch.Tensor) if isinstance(tensor, PipelineFeatures) else tensor
