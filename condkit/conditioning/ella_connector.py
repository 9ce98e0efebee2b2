"""The timestep-aware semantic connector (TSC) of ELLA, with the released checkpoint's layout.

A perceiver resampler turns a language model's hidden states (B, L, text_dim) into a fixed number
of latents (B, num_latents, width) that replace CLIP's encoder_hidden_states; every layer norm is
modulated by the diffusion timestep, so the UNet receives different conditioning at each step.

Module names and shapes follow ella-sd1.5-tsc-t5xl.safetensors, so `load_ella_checkpoint` reads
the released file unchanged; with the default config the state_dict has its 93 keys and
66,820,608 parameters:

    time_embedding.linear_{1,2}            Timesteps(time_channels) -> TimestepEmbedding
    connector.latents                      (num_latents, width)
    connector.time_aware_linear            time_embed_dim -> width, added to the latents
    connector.proj_in                      text_dim -> width
    connector.perceiver_blocks.N.attn      torch MultiheadAttention(width, num_heads, batch_first)
    connector.perceiver_blocks.N.mlp       c_fc width -> 4·width, squared ReLU, c_proj back
    connector.perceiver_blocks.N.ln_{1,2,ff}.linear   time-modulated layer norms

Choose `width` = the UNet's cross_attention_dim (768 SD1.5, 1024 SD2, 2048 SDXL) and `text_dim` =
the language model's hidden size (2048 for flan-t5-xl).

Flexible length: rows of the text features that are exactly zero are padding. Pass
`key_padding_mask=padding_mask(features)` and each prompt's latents are what they would be for the
unpadded prompt (ELLA slices each row to its true length instead; the result is the same).

SDXL also needs a pooled text vector. ELLA never released an SDXL connector; `pooled_dim` adds an
optional head (keys `pooled_head.*`, absent by default) mapping the mean of the output latents
through a LayerNorm and a Linear to the pooled width the SDXL UNet's add_embedding expects.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from condkit.files import read_state_dict


def padding_mask(features: torch.Tensor) -> torch.Tensor:
    """(B, L, D) features -> (B, L) bool, True where a row is exactly zero (padding)."""
    return ~(features != 0).any(dim=-1)


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine parameters, shifted and scaled by a linear map of silu(t_emb).

    The map is zero-initialised, so a fresh layer is a plain LayerNorm at every timestep.
    """

    def __init__(self, width: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(nn.functional.silu(time_embedding)).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


class PerceiverBlock(nn.Module):
    """Latents attend to [latents, text]; then an MLP; both residual, both after time-modulated norms."""

    def __init__(self, width: int, num_heads: int, time_embed_dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.ln_1 = AdaLayerNorm(width, time_embed_dim)
        self.ln_2 = AdaLayerNorm(width, time_embed_dim)
        self.ln_ff = AdaLayerNorm(width, time_embed_dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, 4 * width)), ("sq_relu", SquaredReLU()), ("c_proj", nn.Linear(4 * width, width))]
            )
        )

    def forward(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        time_embedding: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = self.ln_1(latents, time_embedding)
        keys = torch.cat([query, self.ln_2(text, time_embedding)], dim=1)
        if key_padding_mask is not None:
            latent_mask = key_padding_mask.new_zeros(latents.shape[:2])
            key_padding_mask = torch.cat([latent_mask, key_padding_mask], dim=1)
        attended, _ = self.attn(query, keys, keys, key_padding_mask=key_padding_mask, need_weights=False)
        latents = latents + attended
        return latents + self.mlp(self.ln_ff(latents, time_embedding))


class PerceiverResampler(nn.Module):
    def __init__(
        self, text_dim: int, width: int, num_latents: int, num_heads: int, num_blocks: int, time_embed_dim: int
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(width**-0.5 * torch.randn(num_latents, width))
        self.time_aware_linear = nn.Linear(time_embed_dim, width)
        self.proj_in = nn.Linear(text_dim, width)
        self.perceiver_blocks = nn.ModuleList(PerceiverBlock(width, num_heads, time_embed_dim) for _ in range(num_blocks))

    def forward(
        self, text: torch.Tensor, time_embedding: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        time_bias = self.time_aware_linear(nn.functional.silu(time_embedding)).unsqueeze(1)
        latents = self.latents.unsqueeze(0) + time_bias
        text = self.proj_in(text)
        for block in self.perceiver_blocks:
            latents = block(latents, text, time_embedding, key_padding_mask)
        return latents


class PooledHead(nn.Module):
    """Mean of the output latents -> LayerNorm -> Linear: the pooled vector SDXL's add_embedding reads."""

    def __init__(self, width: int, pooled_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, pooled_dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(latents.mean(dim=1)))


class TimestepAwareConnector(ModelMixin, ConfigMixin):
    """ELLA's timestep-aware semantic connector: (text features, timestep) -> UNet encoder_hidden_states.

    Args:
        text_dim: hidden size of the language model (2048 for flan-t5-xl).
        width: output width = the UNet's cross_attention_dim.
        num_latents: output tokens.
        num_heads, num_blocks: attention heads and perceiver blocks.
        time_channels: sinusoidal timestep channels (diffusers Timesteps).
        time_embed_dim: width of the timestep embedding that modulates every norm.
        pooled_dim: if set, a pooled-output head for SDXL (not part of any released ELLA checkpoint).
    """

    @register_to_config
    def __init__(
        self,
        text_dim: int = 2048,
        width: int = 768,
        num_latents: int = 64,
        num_heads: int = 8,
        num_blocks: int = 6,
        time_channels: int = 320,
        time_embed_dim: int = 768,
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.position = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, time_embed_dim, act_fn="silu")
        self.connector = PerceiverResampler(text_dim, width, num_latents, num_heads, num_blocks, time_embed_dim)
        self.pooled_head = PooledHead(width, pooled_dim) if pooled_dim else None

    def embed_timestep(self, timestep: torch.Tensor | float | int, batch_size: int) -> torch.Tensor:
        """A scalar, 0-d or (B,) timestep -> (B, time_embed_dim) embedding."""
        timestep = torch.as_tensor(timestep, device=self.device).flatten()
        if timestep.numel() not in (1, batch_size):
            raise ValueError(f"got {timestep.numel()} timesteps for a batch of {batch_size}; expected 1 or {batch_size}")
        sinusoids = self.position(timestep.expand(batch_size)).to(self.dtype)
        return self.time_embedding(sinusoids)

    def forward(
        self,
        text_features: torch.Tensor,
        timestep: torch.Tensor | float | int,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, text_dim) features at `timestep` -> (B, num_latents, width).

        key_padding_mask: (B, L) bool, True for text tokens to ignore (see `padding_mask`).
        """
        if text_features.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text features have width {text_features.shape[-1]}, but the connector expects text_dim "
                f"{self.config.text_dim}"
            )
        text_features = text_features.to(device=self.device, dtype=self.dtype)
        time_embedding = self.embed_timestep(timestep, text_features.shape[0])
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(self.device)
        return self.connector(text_features, time_embedding, key_padding_mask)

    def pooled_output(self, latents: torch.Tensor) -> torch.Tensor:
        """The SDXL pooled vector of `forward`'s output; needs `pooled_dim`."""
        if self.pooled_head is None:
            raise ValueError("this connector has no pooled head; build it with pooled_dim set (e.g. 1280 for SDXL)")
        return self.pooled_head(latents)


def _widths_from_shapes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Config values that the tensor shapes determine; keys that are absent are left to the defaults."""
    inferred = {}
    if "connector.latents" in state:
        inferred["num_latents"], inferred["width"] = state["connector.latents"].shape
    if "connector.proj_in.weight" in state:
        inferred["text_dim"] = state["connector.proj_in.weight"].shape[1]
    if "time_embedding.linear_1.weight" in state:
        inferred["time_embed_dim"], inferred["time_channels"] = state["time_embedding.linear_1.weight"].shape
    if "pooled_head.proj.weight" in state:
        inferred["pooled_dim"] = state["pooled_head.proj.weight"].shape[0]
    return inferred


def load_ella_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None, **config: int
) -> TimestepAwareConnector:
    """Build a connector from a single-file checkpoint in ELLA's layout (e.g. ella-sd1.5-tsc-t5xl.safetensors).

    Widths come from the tensor shapes; num_heads and num_blocks from `config` (defaults: the
    released SD1.5 checkpoint's 8 and 6). Loading is strict: missing or unexpected keys, or a shape
    that disagrees with the config, raise a ValueError listing them. Weights are cast to
    `dtype` (default float32; the released file is fp16).
    """
    state = read_state_dict(path)
    connector = TimestepAwareConnector(**{**_widths_from_shapes(state), **config})
    expected = connector.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{os.fspath(path)} is not an ELLA connector checkpoint: missing keys {missing}, unexpected keys {unexpected}")
    wrong_shapes = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(tensor.shape)})"
        for key, tensor in expected.items()
        if state[key].shape != tensor.shape
    ]
    if wrong_shapes:
        raise ValueError(f"{os.fspath(path)}: shapes disagree with the connector config: {', '.join(wrong_shapes)}")
    connector.load_state_dict(state, strict=True)
    return connector.to(dtype or torch.float32).eval()
