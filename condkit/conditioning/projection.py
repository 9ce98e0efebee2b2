"""Learned projections of CLIP embeddings (Zarei et al. 2024) and ProjectedConditioner.

CLP is a Linear(d, d) on every token, initialised to the identity; WiCLP adds a Conv1d over a
window of 5 neighbouring tokens, zero-initialised, to the embeddings. Both start as the identity,
are trained with the plain denoising loss while everything else stays frozen, and are used only in
the early, noisy steps (t > τ, the switch-off timestep), never for the unconditional half of CFG.

ProjectedConditioner wraps any CLIP-family conditioner. The projection depends on t, so it is
timestep-aware and runs inside the hooks `attach` puts on the denoisers:

    conditioner = ProjectedConditioner.from_pipeline(pipe, "runs/wiclp/projection", switch_off_timestep=800)
    with attach(pipe, conditioner):
        image = pipe(**conditioner.encode("a red cube and a blue ball").kwargs()).images[0]

Which rows are negative: the pipeline may drop the negative half (no CFG), repeat rows per image
and order them [negative, positive]; counting rows cannot tell these apart. So `encode()` appends
one marker token to every row of the wrapped conditioner's embeddings: zeros except channel 0,
+1 on positive rows and -1 on negative rows. `at_timestep` reads the marker, strips it, and
projects the positive rows while t > τ; the UNet never sees the marker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from condkit.conditioning.base import Conditioner, Conditioning, Prompt
from condkit.conditioning.features import plain
from condkit.conditioning.pipeline_fit import conditioner_output
from condkit.conditioning.registry import register_conditioner
from condkit.conditioning.scheduled_prompts import ComposedRows, is_scheduled

POSITIVE_MARK = 1.0
NEGATIVE_MARK = -1.0


class CLP(ModelMixin, ConfigMixin):
    """Token-wise Linear(dim, dim), initialised to the identity."""

    @register_to_config
    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            self.linear.bias.zero_()

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.linear(embeds)


class WiCLP(ModelMixin, ConfigMixin):
    """embeds + Conv1d(dim, dim, window) along the token axis ("same" padding), zero-initialised."""

    @register_to_config
    def __init__(self, dim: int = 768, window: int = 5) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be an odd number >= 1, got {window}")
        self.conv = nn.Conv1d(dim, dim, window, padding=window // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds + self.conv(embeds.transpose(1, 2)).transpose(1, 2)


PROJECTIONS: dict[str, type[ModelMixin]] = {"CLP": CLP, "WiCLP": WiCLP}
FRESH_PROJECTIONS = {"clp": CLP, "wiclp": WiCLP}


def load_projection(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> CLP | WiCLP:
    """A CLP or WiCLP saved with save_pretrained; the class is read from its config.json."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"projection folder {os.fspath(folder)!r} does not exist")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {os.fspath(folder)}; expected a folder written by save_pretrained")
    with open(config_path) as file:
        class_name = json.load(file).get("_class_name")
    if class_name not in PROJECTIONS:
        raise ValueError(f"{config_path} describes a {class_name!r}; expected one of {sorted(PROJECTIONS)}")
    return PROJECTIONS[class_name].from_pretrained(folder, dtype=dtype).eval()


def embedding_width(conditioner: Conditioner) -> int | None:
    """Width of a CLIP-family conditioner's embeddings (SDXL: both encoders), if it can be read off its encoders."""
    encoders = getattr(conditioner, "text_encoders", None)
    if not encoders:
        return None
    return sum(encoder.config.hidden_size for encoder in encoders)


@register_conditioner("projected")
class ProjectedConditioner(Conditioner):
    """A CLIP-family conditioner whose positive embeddings are projected while t > switch_off_timestep.

    Args:
        conditioner: the wrapped, static conditioner (CLIPConditioner, LongCLIPConditioner, ...).
        projection: a CLP or WiCLP whose dim is the wrapped embeddings' width.
        switch_off_timestep: τ; the projection applies while t > τ (default 800).
        num_train_timesteps: the scheduler's range; τ must lie in [0, num_train_timesteps).
    """

    timestep_aware = True
    required_options = {
        "projection": (
            "conditioner 'projected' needs a projection: --opt projection=DIR (a trained CLP/WiCLP folder) or "
            "--opt projection=wiclp|clp (a fresh, identity one)"
        ),
    }
    config_names = ("switch_off_timestep",)

    def __init__(
        self,
        conditioner: Conditioner,
        projection: CLP | WiCLP,
        switch_off_timestep: float = 800,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if conditioner.timestep_aware:
            raise ValueError(f"ProjectedConditioner wraps a static conditioner; {type(conditioner).__name__} is timestep-aware")
        if not 0 <= switch_off_timestep < num_train_timesteps:
            raise ValueError(
                f"switch_off_timestep {switch_off_timestep} is outside the scheduler's range [0, {num_train_timesteps})"
            )
        width = embedding_width(conditioner)
        if width is not None and width != projection.config.dim:
            raise ValueError(
                f"projection width {projection.config.dim} differs from the conditioner's embedding width {width}; "
                "the projection was trained for another text encoder"
            )
        self.conditioner = conditioner
        self.projection = projection
        self.switch_off_timestep = switch_off_timestep

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        projection: CLP | WiCLP | str | os.PathLike | None = None,
        switch_off_timestep: float = 800,
        conditioner: Conditioner | str | os.PathLike = "clip",
        **conditioner_options: Any,
    ) -> ProjectedConditioner:
        """Project `conditioner` (a name, a saved folder or an instance; default the pipeline's own CLIP).

        projection: a CLP/WiCLP, a folder saved by one, or "wiclp"/"clp" for a fresh (identity) one to train.
        τ is checked against the pipeline scheduler's num_train_timesteps.
        """
        from condkit.conditioning.registry import load_conditioner

        cls.check_options({"projection": projection})
        inner = load_conditioner(conditioner, pipe, **conditioner_options)
        if isinstance(projection, str) and projection.lower() in FRESH_PROJECTIONS:
            projection = FRESH_PROJECTIONS[projection.lower()](conditioner_output(inner)["width"])
        elif not isinstance(projection, nn.Module):
            projection = load_projection(projection)
        projection = projection.to(pipe._execution_device)  # where the denoiser's inputs are, offload or not
        return cls(inner, projection, switch_off_timestep, pipe.scheduler.config.num_train_timesteps)

    @classmethod
    def example_options(cls, pipe: Any) -> dict[str, Any]:
        return {"projection": "wiclp"}

    def save_parts(self, folder: Path) -> None:
        self.conditioner.save_pretrained(folder / "conditioner")
        self.projection.save_pretrained(folder / "projection")

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        return {
            "conditioner": Conditioner.from_pretrained(folder / "conditioner", pipe),
            "projection": load_projection(folder / "projection"),
        }

    def embed(
        self, prompt: Prompt, negative_prompt: Prompt | None = None, num_images_per_prompt: int = 1, **per_encoder_prompts: Prompt
    ) -> Conditioning:
        """The wrapped conditioner's Conditioning, each embeddings row followed by one marker token."""
        return self._marked(self.conditioner.embed(prompt, negative_prompt, num_images_per_prompt, **per_encoder_prompts))

    def encode(
        self, prompt: Prompt, negative_prompt: Prompt | None = None, num_images_per_prompt: int = 1, **per_encoder_prompts: Prompt
    ) -> Conditioning:
        """As `embed`, from the wrapped conditioner's `encode()`: its prompt editing, alternation and AND included."""
        with torch.no_grad():
            return self._marked(self.conditioner.encode(prompt, negative_prompt, num_images_per_prompt, **per_encoder_prompts))

    @property
    def schedules_prompts(self) -> bool:
        return getattr(self.conditioner, "schedules_prompts", False)

    @property
    def per_encoder_prompt_names(self) -> tuple[str, ...]:
        return self.conditioner.per_encoder_prompt_names

    def _marked(self, plain: Conditioning) -> Conditioning:
        if plain.prompt_embeds.shape[-1] != self.projection.config.dim:
            raise ValueError(
                f"projection width {self.projection.config.dim} differs from the conditioner's embedding width "
                f"{plain.prompt_embeds.shape[-1]}; the projection was trained for another text encoder"
            )
        negative = plain.negative_prompt_embeds
        return Conditioning(
            prompt_embeds=self.mark(plain.prompt_embeds, POSITIVE_MARK),
            negative_prompt_embeds=None if negative is None else self.mark(negative, NEGATIVE_MARK),
            pooled_prompt_embeds=plain.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=plain.negative_pooled_prompt_embeds,
            needs_attach=True,
        )

    @staticmethod
    def mark(embeds: torch.Tensor, value: float) -> torch.Tensor:
        marker = embeds.new_zeros(embeds.shape[0], 1, embeds.shape[2])
        marker[:, 0, 0] = value
        return torch.cat([embeds, marker], dim=1)

    @staticmethod
    def unmark(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Marked features -> (embeddings, (B,) bool: row is positive)."""
        features = plain(features)
        marks = features[:, -1, 0]
        if not ((marks == POSITIVE_MARK) | (marks == NEGATIVE_MARK)).all():
            raise ValueError(
                f"features of shape {tuple(features.shape)} carry no positive/negative row marker; pass the "
                "prompt_embeds from ProjectedConditioner.encode()"
            )
        return features[:, :-1], marks == POSITIVE_MARK

    def projects_at(self, timestep: torch.Tensor | float | int, batch_size: int) -> torch.Tensor:
        """(B,) bool: whether the projection is on at each row's timestep (t > τ)."""
        timestep = torch.as_tensor(timestep).flatten()
        if timestep.numel() not in (1, batch_size):
            raise ValueError(f"got {timestep.numel()} timesteps for a batch of {batch_size}; expected 1 or {batch_size}")
        return (timestep > self.switch_off_timestep).expand(batch_size)

    def at_timestep(
        self, features: torch.Tensor, timestep: torch.Tensor, step: tuple[int, int] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | ComposedRows:
        embeds, positive = self.unmark(plain(features))
        if is_scheduled(embeds):  # prompt editing or AND in the wrapped conditioner: its rows at this step, projected
            on = positive & self.projects_at(timestep, embeds.shape[0]).to(positive.device)
            mapped = self.conditioner.at_timestep(embeds, timestep, step=step)
            if isinstance(mapped, ComposedRows):
                rows = on[torch.tensor(mapped.source_rows, device=on.device)]
                mapped.hidden = self.project_rows(mapped.hidden, rows.to(mapped.hidden.device))
                return mapped
            hidden, pooled = mapped
            return self.project_rows(hidden, on.to(hidden.device)), pooled
        return self.project_rows(embeds, positive & self.projects_at(timestep, embeds.shape[0]).to(positive.device))

    def project_rows(self, embeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`embeds` with the (B,) bool `rows` projected. The projection runs even on no rows, so that a
        training step's graph always holds its parameters (several processes need that)."""
        projection_input = embeds[rows].to(device=self.projection.device, dtype=self.projection.dtype)
        output = embeds.clone()
        output[rows] = self.projection(projection_input).to(device=embeds.device, dtype=embeds.dtype)
        return output
