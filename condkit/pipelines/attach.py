"""Plug a conditioner into a diffusers pipeline.

Static conditioners need nothing installed: their Conditioning goes in as keyword arguments.
Timestep-aware ones need to see every UNet call, so `attach` swaps `pipe.unet` for a
`TimestepAwareUNet` proxy for the duration of a `with` block and puts the original back on exit,
also when an exception escapes the block.

    with attach(pipe, conditioner):
        images = pipe(**conditioner.encode(prompt).kwargs(), num_inference_steps=25).images
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from condkit.conditioning.base import Conditioner


class TimestepAwareUNet(nn.Module):
    """Stands in for a UNet: maps the conditioner's features at each timestep, then runs the UNet.

    Everything else (config, dtype, device, add_embedding, ...) is read from the wrapped UNet, so
    pipelines cannot tell the difference. `at_timestep` may return a tensor (encoder_hidden_states)
    or a pair (encoder_hidden_states, pooled) whose pooled part replaces SDXL's text_embeds.
    """

    def __init__(self, unet: nn.Module, conditioner: Conditioner) -> None:
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        mapped = self.conditioner.at_timestep(encoder_hidden_states, timestep)
        if isinstance(mapped, tuple):
            mapped, pooled = mapped
            added = dict(kwargs.get("added_cond_kwargs") or {})
            added["text_embeds"] = pooled
            kwargs["added_cond_kwargs"] = added
        return self.unet(sample, timestep, mapped.to(self.unet.dtype), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)


@contextmanager
def attach(pipe: Any, conditioner: Conditioner) -> Iterator[Any]:
    """Make `pipe` ready for `conditioner`'s Conditioning; restore the pipeline on exit."""
    if not conditioner.timestep_aware:
        yield pipe
        return
    original = pipe.unet
    if isinstance(original, TimestepAwareUNet):
        raise RuntimeError("a timestep-aware conditioner is already attached to this pipeline")
    # object.__setattr__ bypasses DiffusionPipeline.__setattr__, which would rewrite the
    # pipeline's config (model_index) to name the proxy class.
    object.__setattr__(pipe, "unet", TimestepAwareUNet(original, conditioner))
    try:
        yield pipe
    finally:
        object.__setattr__(pipe, "unet", original)
