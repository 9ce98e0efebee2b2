"""Adapter training on the shared loop: an ELLA connector or a CLP/WiCLP projection, all else frozen.

    method = ConnectorTraining.from_pipeline(pipe, tokenizer, language_model, connector, concat_clip=True)
    train(method, pipe.unet, pipe.vae, pipe.scheduler, dataset, config)
    method.save_pretrained("runs/llm/connector")        # TimestepAwareConnector.from_pretrained reads it

    method = ProjectionTraining.from_pipeline(pipe, WiCLP(dim), switch_off_timestep=800)
    train(method, ..., TrainingConfig(..., learning_rate=1e-5, adam_weight_decay=0.0, max_grad_norm=1.0))
    method.save_pretrained("runs/wiclp/projection")     # load_projection reads it

Both methods condition the UNet through the very conditioner they train for
(LLMAdapterConditioner, ConcatConditioner, ProjectedConditioner), so a saved module plugged into
that conditioner gives the UNet exactly what it saw in training. Only the connector or the
projection is a parameter of the method; the language model and the CLIP encoders are frozen and
held outside the module tree, so checkpoints hold the trainable part alone. Frozen encoders run
with autocast off, in their own dtype, as they do at inference.

Language-model features are computed once per distinct caption, the first time a caption is drawn,
and kept (on the CPU) for the rest of the run; a step only runs the connector and the UNet.

Where the projection applies: at inference ProjectedConditioner projects the positive prompt only
while t > τ (the switch-off timestep). Training does the same by default: rows drawn with t > τ are
projected, rows with t ≤ τ condition the UNet on plain CLIP embeddings and give the projection no
gradient. The projection thus learns only the job it has at inference, at the price of fewer
useful rows per step (with τ = 800 about a fifth). `project_all_timesteps=True` projects every row,
as Zarei et al. train.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.concat import ConcatConditioner
from condkit.conditioning.ella_connector import TimestepAwareConnector
from condkit.conditioning.llm_adapter import LLMAdapterConditioner
from condkit.conditioning.projection import CLP, ProjectedConditioner, WiCLP
from condkit.training.method import TrainingBatch, TrainingMethod
from condkit.training.textual_inversion import sdxl_added_conditions


def frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


def public_config(module: Any) -> dict[str, Any]:
    """A diffusers module's constructor arguments, without bookkeeping entries such as _use_default_values."""
    return {key: value for key, value in module.config.items() if not key.startswith("_")}


def is_sdxl_unet(unet: nn.Module) -> bool:
    return unet.config.get("addition_embed_type") == "text_time"


@contextmanager
def frozen_encoding(device: torch.device) -> Iterator[None]:
    """Run a frozen encoder as inference does: no gradients, and none of the training step's autocast."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


def run_unet(
    unet: nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor | None,
    vae_scale_factor: int,
) -> torch.Tensor:
    """The UNet's prediction; an SDXL UNet also gets the pooled vector and centre-crop time ids."""
    hidden = hidden.to(unet.dtype)
    if not is_sdxl_unet(unet):
        return unet(noisy_latents, timesteps, encoder_hidden_states=hidden).sample
    if pooled is None:
        raise ValueError("this UNet (SDXL) needs a pooled text vector, but the conditioning has none")
    added = sdxl_added_conditions(pooled.to(unet.dtype), noisy_latents, vae_scale_factor)
    return unet(noisy_latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


class _AdapterTraining(TrainingMethod):
    """What both adapter methods share: `conditioning(captions, timesteps)` feeds the UNet (SDXL included)."""

    vae_scale_factor: int

    def conditioning(self, captions: list[str], timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def trained_module(self) -> nn.Module:
        raise NotImplementedError

    def encoder_hidden_states(self, batch: TrainingBatch, timesteps: torch.Tensor) -> torch.Tensor:
        return self.conditioning(batch.captions, timesteps)[0]

    def forward(self, unet: nn.Module, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor):
        hidden, pooled = self.conditioning(batch.captions, timesteps)
        return run_unet(unet, noisy_latents, timesteps, hidden, pooled, self.vae_scale_factor)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """The trained module in diffusers' layout (config.json + safetensors), for its from_pretrained."""
        self.trained_module().save_pretrained(folder)


class ConnectorTraining(_AdapterTraining):
    """Train a TimestepAwareConnector on a frozen language model's features (optionally joined with CLIP).

    Args:
        adapter: the LLMAdapterConditioner to train; its connector is the only trainable part.
        clip: with a CLIPConditioner, the UNet is conditioned on [connector latents, CLIP embeddings]
            as ConcatConditioner(adapter, clip) gives at inference.
        vae_scale_factor: the pipeline's (SDXL time ids only).
    """

    def __init__(self, adapter: LLMAdapterConditioner, clip: CLIPConditioner | None = None, vae_scale_factor: int = 8) -> None:
        super().__init__()
        self.connector = adapter.connector.requires_grad_(True)
        frozen(adapter.language_model)
        if clip is not None:
            for encoder in clip.text_encoders:
                frozen(encoder)
        # Lists keep the frozen models out of this module's parameters, checkpoints and device moves.
        self._adapter = [adapter]
        self._clip = [clip] if clip is not None else []
        self.vae_scale_factor = vae_scale_factor
        self.feature_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        tokenizer: Any,
        language_model: nn.Module,
        connector: TimestepAwareConnector,
        *,
        concat_clip: bool = False,
        **adapter_options: Any,
    ) -> ConnectorTraining:
        """Check the connector against `pipe.unet`; `adapter_options` (flexible_length, max_length) go to
        LLMAdapterConditioner."""
        adapter = LLMAdapterConditioner.from_pipeline(pipe, tokenizer, language_model, connector, **adapter_options)
        clip = CLIPConditioner.from_pipeline(pipe) if concat_clip else None
        return cls(adapter, clip, pipe.vae_scale_factor)

    @property
    def adapter(self) -> LLMAdapterConditioner:
        return self._adapter[0]

    @property
    def clip(self) -> CLIPConditioner | None:
        return self._clip[0] if self._clip else None

    def conditioner(self) -> LLMAdapterConditioner | ConcatConditioner:
        """The inference conditioner this method trains (sharing its modules)."""
        return self.adapter if self.clip is None else ConcatConditioner(self.adapter, self.clip)

    def settings(self) -> dict[str, Any]:
        adapter = self.adapter
        return {
            "connector": public_config(self.connector),
            "language_model": adapter.language_model.config._name_or_path,
            "language_model_width": self.connector.config.text_dim,
            "flexible_length": adapter.flexible_length,
            "max_length": adapter.max_length,
            "concat_clip": self.clip is not None,
        }

    def language_features(self, captions: list[str]) -> torch.Tensor:
        """(B, L, text_dim) features of `captions`, zero-padded to the longest, from the cache.

        Captions not seen before are encoded now, in one call, and kept.
        """
        new = [caption for caption in dict.fromkeys(captions) if caption not in self.feature_cache]
        if new:
            with frozen_encoding(self.adapter.language_model.device):
                encoded = self.adapter._encode_texts(new)
            self.feature_cache.update({caption: states.cpu() for caption, states in zip(new, encoded)})
        rows = [self.feature_cache[caption] for caption in captions]
        length = max(row.shape[0] for row in rows)
        padded = torch.stack([nn.functional.pad(row, (0, 0, 0, length - row.shape[0])) for row in rows])
        return padded.to(self.connector.device)

    def clip_embeddings(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with frozen_encoding(self.clip.text_encoders[0].device):
            conditioning = self.clip.embed(captions)
        return conditioning.prompt_embeds, conditioning.pooled_prompt_embeds

    def conditioning(self, captions: list[str], timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder_hidden_states, pooled or None) for `captions` at per-row `timesteps`."""
        mapped = self.adapter.at_timestep(self.language_features(captions), timesteps)
        hidden, pooled = mapped if isinstance(mapped, tuple) else (mapped, None)
        if self.clip is not None:
            clip_hidden, clip_pooled = self.clip_embeddings(captions)
            hidden = torch.cat([hidden, clip_hidden.to(device=hidden.device, dtype=hidden.dtype)], dim=1)
            pooled = pooled if pooled is not None else clip_pooled
        return hidden, pooled

    def trained_module(self) -> TimestepAwareConnector:
        """Saved by save_pretrained; TimestepAwareConnector.from_pretrained reads it back."""
        return self.connector


class ProjectionTraining(_AdapterTraining):
    """Train a CLP or WiCLP on the output of frozen CLIP encoders with the plain denoising loss.

    Args:
        clip: the frozen CLIPConditioner whose embeddings are projected.
        projection: the CLP or WiCLP to train.
        switch_off_timestep: τ; rows with t > τ are projected (see the module docstring).
        project_all_timesteps: project every row whatever its timestep (the paper's training).
        num_train_timesteps: the scheduler's range; τ must lie in it.
        vae_scale_factor: the pipeline's (SDXL time ids only).
    """

    def __init__(
        self,
        clip: CLIPConditioner,
        projection: CLP | WiCLP,
        switch_off_timestep: float = 800,
        *,
        project_all_timesteps: bool = False,
        num_train_timesteps: int = 1000,
        vae_scale_factor: int = 8,
    ) -> None:
        super().__init__()
        for encoder in clip.text_encoders:
            frozen(encoder)
        # ProjectedConditioner checks the widths and τ; it is also what the trained projection plugs into.
        self._projected = [ProjectedConditioner(clip, projection, switch_off_timestep, num_train_timesteps)]
        self.projection = projection.requires_grad_(True)
        self.project_all_timesteps = project_all_timesteps
        self.vae_scale_factor = vae_scale_factor

    @classmethod
    def from_pipeline(
        cls, pipe: Any, projection: CLP | WiCLP, switch_off_timestep: float = 800, *, project_all_timesteps: bool = False
    ) -> ProjectionTraining:
        return cls(
            CLIPConditioner.from_pipeline(pipe),
            projection,
            switch_off_timestep,
            project_all_timesteps=project_all_timesteps,
            num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
            vae_scale_factor=pipe.vae_scale_factor,
        )

    @property
    def clip(self) -> CLIPConditioner:
        return self._projected[0].conditioner

    @property
    def switch_off_timestep(self) -> float:
        return self._projected[0].switch_off_timestep

    def conditioner(self) -> ProjectedConditioner:
        """The inference conditioner this method trains (sharing its modules)."""
        return self._projected[0]

    def settings(self) -> dict[str, Any]:
        return {
            "projection": type(self.projection).__name__,
            "config": public_config(self.projection),
            "switch_off_timestep": self.switch_off_timestep,
            "project_all_timesteps": self.project_all_timesteps,
            "text_encoders": [encoder.config._name_or_path for encoder in self.clip.text_encoders],
        }

    def projected_rows(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows whose embeddings go through the projection."""
        if self.project_all_timesteps:
            return torch.ones(timesteps.shape[0], dtype=torch.bool, device=timesteps.device)
        return self._projected[0].projects_at(timesteps, timesteps.shape[0])

    def conditioning(self, captions: list[str], timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder_hidden_states, pooled or None): CLIP embeddings, projected on the selected rows."""
        with frozen_encoding(self.clip.text_encoders[0].device):
            conditioning = self.clip.embed(captions)
        embeds, pooled = conditioning.prompt_embeds, conditioning.pooled_prompt_embeds
        selected = self.projected_rows(timesteps).to(embeds.device)
        # Project exactly the selected rows, as ProjectedConditioner does; an empty selection still
        # runs the projection (on no rows) so that every process's graph holds its parameters.
        projected = self.projection(embeds[selected].to(device=self.projection.device, dtype=self.projection.dtype))
        hidden = embeds.clone()
        hidden[selected] = projected.to(hidden.dtype)
        return hidden, pooled

    def trained_module(self) -> CLP | WiCLP:
        """Saved by save_pretrained; load_projection reads it back."""
        return self.projection
