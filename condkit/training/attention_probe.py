"""Record how much attention every text token receives in a UNet's cross-attention layers.

    with probe_cross_attention(unet) as probe:
        unet(latents, timesteps, encoder_hidden_states=context)
    per_token = probe.take()        # (layers, batch, tokens)

Inside the `with` block every cross-attention layer (diffusers names them "…attn2") runs a
processor that computes the softmax attention probabilities explicitly, keeps their mean over
heads and image positions for each text token, and returns the same output as the stock
processor. Self-attention layers keep their processors. The original processors are put back
when the block ends, also when an exception escapes it. The recorded values keep their autograd
graph, so a loss on them trains whatever produced the text tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

CROSS_ATTENTION_SUFFIX = "attn2.processor"


class CrossAttentionProbe:
    """Collects per-token attention, one (batch, tokens) tensor per cross-attention call, in call order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, torch.Tensor]] = []

    def record(self, layer_name: str, per_token: torch.Tensor) -> None:
        self.records.append((layer_name, per_token))

    def take(self) -> torch.Tensor:
        """Everything recorded since the last take, as (calls, batch, tokens); the probe is emptied."""
        if not self.records:
            raise RuntimeError("no cross-attention was recorded; run the UNet inside probe_cross_attention first")
        stacked = torch.stack([per_token for _, per_token in self.records])
        self.records = []
        return stacked


class RecordingCrossAttentionProcessor:
    """A diffusers attention processor that reports the mean attention each key token receives."""

    def __init__(self, probe: CrossAttentionProbe, layer_name: str) -> None:
        self.probe = probe
        self.layer_name = layer_name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch, keys = encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(query, key, attention_mask)  # (batch·heads, pixels, keys)
        per_token = probabilities.float().view(batch, attn.heads, -1, keys).mean(dim=(1, 2))
        self.probe.record(self.layer_name, per_token)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Processor names of the UNet's cross-attention layers (those diffusers calls attn2)."""
    return [name for name in unet.attn_processors if name.endswith(CROSS_ATTENTION_SUFFIX)]


@contextmanager
def probe_cross_attention(unet: nn.Module) -> Iterator[CrossAttentionProbe]:
    """Install recording processors on every cross-attention layer of `unet` for the duration of the block."""
    originals = dict(unet.attn_processors)
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers ({CROSS_ATTENTION_SUFFIX}) to probe")
    probe = CrossAttentionProbe()
    recording = {name: RecordingCrossAttentionProcessor(probe, name) if name in layers else processor
                 for name, processor in originals.items()}
    unet.set_attn_processor(recording)
    try:
        yield probe
    finally:
        unet.set_attn_processor(dict(originals))
