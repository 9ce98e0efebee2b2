"""ConcatConditioner: two conditioners side by side along the token axis, as eDiff-I mixes encoders.

The use it was made for: ELLA's connector replaces CLIP entirely, so trigger words and
textual-inversion tokens that only CLIP knows stop working (ELLA issue #41). Concatenating CLIP's
embeddings after the connector's latents keeps them: the UNet cross-attends to 64 + 77 tokens.

    conditioner = ConcatConditioner(llm_adapter, CLIPConditioner.from_pipeline(pipe))
    with attach(pipe, conditioner):
        image = pipe(**conditioner.encode("<my-token> on a beach").kwargs()).images[0]

Two static conditioners simply concatenate their embeddings. When either part is timestep-aware,
both parts must travel through the pipeline as one prompt_embeds tensor, and `at_timestep` must be
able to split them again with nothing but that tensor (the pipeline repeats and reorders rows, and
several encodings may be alive at once). So `encode()` packs them, per row:

    token 0             header: channels 0..7 hold (first length, first width, second length,
                        second width), each as two base-256 digits (high, low). Digits below 256
                        are exact in fp16 and bf16, so the header survives the pipeline's dtype cast.
    tokens 1 .. L1      the first part, zero-padded along channels to the packed width
    tokens L1+1 ..      the second part, likewise

The packed width is the larger part width (at least 8). `at_timestep` unpacks, gives each
timestep-aware part its own slice (zero-padded rows stay zero, so flexible-length masks still
work), leaves a static part as it is, and joins the results. Both results must have the UNet's
cross-attention width.

Pooled vectors (SDXL): `encode()` passes on the first part's pooled vectors, else the second's; if
a part's `at_timestep` returns a pooled vector, the first such one replaces them at every step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from condkit.conditioning.base import Conditioner, Conditioning, Prompt
from condkit.conditioning.features import plain
from condkit.conditioning.registry import load_conditioner, register_conditioner

HEADER_CHANNELS = 8
DIGIT_BASE = 256


def pack(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, L1, D1) and (B, L2, D2) -> (B, 1 + L1 + L2, max(D1, D2, 8)) with the header described above."""
    sizes = [first.shape[1], first.shape[2], second.shape[1], second.shape[2]]
    if max(sizes) >= DIGIT_BASE**2:
        raise ValueError(f"cannot pack parts of shapes {tuple(first.shape)} and {tuple(second.shape)}: sizes must be < 65536")
    width = max(first.shape[2], second.shape[2], HEADER_CHANNELS)
    dtype = torch.promote_types(first.dtype, second.dtype)
    header = first.new_zeros(first.shape[0], 1, width, dtype=dtype)
    digits = [digit for size in sizes for digit in divmod(size, DIGIT_BASE)]
    header[:, 0, :HEADER_CHANNELS] = torch.tensor(digits, dtype=dtype)

    def widen(part: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(part.to(dtype), (0, width - part.shape[2]))

    return torch.cat([header, widen(first), widen(second.to(first.device))], dim=1)


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack`."""
    if packed.ndim != 3 or packed.shape[1] < 1 or packed.shape[2] < HEADER_CHANNELS:
        raise ValueError(f"features of shape {tuple(packed.shape)} were not packed by ConcatConditioner.encode()")
    digits = packed[0, 0, :HEADER_CHANNELS].float().round().long().tolist()
    first_length, first_width, second_length, second_width = (
        high * DIGIT_BASE + low for high, low in zip(digits[0::2], digits[1::2])
    )
    if 1 + first_length + second_length != packed.shape[1] or max(first_width, second_width) > packed.shape[2]:
        raise ValueError(
            f"features of shape {tuple(packed.shape)} do not match their header (lengths {first_length}+"
            f"{second_length}, widths {first_width}, {second_width}); pass the prompt_embeds from ConcatConditioner.encode()"
        )
    first = packed[:, 1 : 1 + first_length, :first_width]
    second = packed[:, 1 + first_length :, :second_width]
    return first, second


@register_conditioner("concat")
class ConcatConditioner(Conditioner):
    """Both conditioners' outputs, first then second, joined along the token axis.

    Saved as two units, first/ and second/, each rebuilt on the pipeline by its own class.
    """

    required_options = {
        "first": (
            "conditioner 'concat' needs its first part: --opt first=NAME_OR_DIR (e.g. a trained llm-adapter folder), "
            "and optionally --opt second=NAME_OR_DIR (default clip) and --opt first_options='{...}'"
        ),
    }

    def __init__(self, first: Conditioner, second: Conditioner) -> None:
        super().__init__()
        self.first = first
        self.second = second

    @property
    def timestep_aware(self) -> bool:  # type: ignore[override]
        return self.first.timestep_aware or self.second.timestep_aware

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        first: Conditioner | str | os.PathLike | None = None,
        second: Conditioner | str | os.PathLike = "clip",
        first_options: dict[str, Any] | None = None,
        second_options: dict[str, Any] | None = None,
    ) -> ConcatConditioner:
        """Each part a conditioner, a registered name (built with its `*_options`) or a saved folder."""
        cls.check_options({"first": first})
        return cls(load_conditioner(first, pipe, **(first_options or {})), load_conditioner(second, pipe, **(second_options or {})))

    @classmethod
    def example_options(cls, pipe: Any) -> dict[str, Any]:
        return {"first": "projected", "first_options": {"projection": "wiclp"}, "second": "clip"}

    def save_parts(self, folder: Path) -> None:
        self.first.save_pretrained(folder / "first")
        self.second.save_pretrained(folder / "second")

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        return {"first": Conditioner.from_pretrained(folder / "first", pipe), "second": Conditioner.from_pretrained(folder / "second", pipe)}

    def embed(self, prompt: Prompt, negative_prompt: Prompt | None = None, num_images_per_prompt: int = 1) -> Conditioning:
        a = self.first.embed(prompt, negative_prompt, num_images_per_prompt)
        b = self.second.embed(prompt, negative_prompt, num_images_per_prompt)
        join = pack if self.timestep_aware else self._concatenate
        negative_a = a.negative_prompt_embeds if a.negative_prompt_embeds is not None else torch.zeros_like(a.prompt_embeds)
        negative_b = b.negative_prompt_embeds if b.negative_prompt_embeds is not None else torch.zeros_like(b.prompt_embeds)
        first_with_pooled = a if a.pooled_prompt_embeds is not None else b
        return Conditioning(
            prompt_embeds=join(plain(a.prompt_embeds), plain(b.prompt_embeds)),
            negative_prompt_embeds=join(plain(negative_a), plain(negative_b)),
            pooled_prompt_embeds=first_with_pooled.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=first_with_pooled.negative_pooled_prompt_embeds,
            needs_attach=self.timestep_aware,
        )

    @staticmethod
    def _concatenate(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if first.shape[2] != second.shape[2]:
            raise ValueError(f"cannot concatenate embeddings of width {first.shape[2]} and {second.shape[2]}; expected one width")
        return torch.cat([first, second.to(first.dtype)], dim=1)

    def at_timestep(
        self, features: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        outputs, pooled = [], None
        for part, part_features in zip((self.first, self.second), unpack(plain(features))):
            output = part.at_timestep(part_features, timestep) if part.timestep_aware else part_features
            if isinstance(output, tuple):
                output, part_pooled = output
                pooled = part_pooled if pooled is None else pooled
            outputs.append(output)
        hidden = self._concatenate(*outputs)
        return hidden if pooled is None else (hidden, pooled)
