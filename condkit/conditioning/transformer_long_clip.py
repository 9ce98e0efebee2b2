"""Long-CLIP on SD3 (CLIP-L and CLIP-G) and Flux (CLIP-L): the 248-token CLIP window in transformer pipelines.

`load_conditioner("long-clip", pipe)` gives one of these for an SD3 or Flux pipeline
(LongCLIPConditioner.from_pipeline hands over); both save and load back as "long-clip".

- SD3: the CLIP part is a LongCLIPConditioner on stretched copies of CLIP-L and CLIP-G (a converted
  Long-CLIP checkpoint, `text_encoder_path`, replaces CLIP-L, as in the Long-CLIP SDXL demo), followed
  by T5 as in SD3CLIPConditioner. By default (`pad_to_multiple_of=77`) a short prompt gives 77 CLIP
  tokens, as the transformer was trained with, a longer one 154, 231 or 248; the pooled vector
  (CLIP-L ⊕ CLIP-G text_embeds) is read at the end-of-text token of the 248-token window.
- Flux: CLIP-L gives only the pooled vector, now read at the end-of-text token of a 248-token window,
  so it sees up to 246 prompt tokens instead of 75; T5 is unchanged.
Stretching and checkpoint loading are long_clip's: knowledge-preserved stretching (keep 20, ratio 4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from condkit.conditioning import CLIP_POSITIONS
from condkit.conditioning.base import Conditioner
from condkit.conditioning.flux_clip import FluxCLIPConditioner
from condkit.conditioning.long_clip import (
    LONG_CLIP_KEEP, LONG_CLIP_RATIO, LongCLIPConditioner, PadToken, _load_long_text_encoder, position_count, stretch_text_model,
    stretch_tokenizer,
)
from condkit.conditioning.sd3_clip import SD3CLIPConditioner
from condkit.conditioning.transformer_pipelines import transformer_family


class _LongCLIPPart(LongCLIPConditioner):
    """LongCLIPConditioner.from_pipeline without the hand-over to transformer pipelines: SD3's CLIP-L and CLIP-G."""


class SD3LongCLIPConditioner(SD3CLIPConditioner):
    """SD3 conditioning whose CLIP-L and CLIP-G read a 248-token Long-CLIP window (see the module docstring)."""

    registered_name: ClassVar[str | None] = "long-clip"
    config_names = ("clip_skip", "max_chunks", "pad_to_multiple_of", "emphasis", "keep", "ratio", "pad_token",
                    "max_sequence_length", "t5_weighting")  # fmt: skip
    reproduces_pipeline_prompts = False

    pad_to_multiple_of = property(lambda self: self.clip.pad_to_multiple_of)
    keep = property(lambda self: self.clip.keep)
    ratio = property(lambda self: self.clip.ratio)
    pad_token = property(lambda self: self.clip.pad_token)

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        text_encoder_path: str | Path | None = None,
        *,
        keep: int = LONG_CLIP_KEEP,
        ratio: int = LONG_CLIP_RATIO,
        pad_token: PadToken | None = None,
        max_sequence_length: int = 256,
        t5_weighting: str = "interpolate",
        **clip_options: Any,
    ) -> SD3LongCLIPConditioner:
        if text_encoder_path is not None and not checkpoint_has_projection(Path(text_encoder_path)):
            raise ValueError(
                f"Long-CLIP checkpoint {str(text_encoder_path)!r} has no text_projection; SD3's CLIP-L needs it for the pooled "
                "vector (convert the original checkpoint with `condkit convert longclip`, which keeps it)"
            )
        clip = _LongCLIPPart.from_pipeline(pipe, text_encoder_path, keep=keep, ratio=ratio, pad_token=pad_token, **clip_options)
        return cls(
            clip, pipe.tokenizer_3, pipe.text_encoder_3, int(pipe.transformer.config.joint_attention_dim),
            max_sequence_length=max_sequence_length, t5_weighting=t5_weighting,
        )

    def save_parts(self, folder: Path) -> None:
        self.clip.save_parts(folder)

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        return LongCLIPConditioner.load_parts(folder, pipe)


class FluxLongCLIPConditioner(FluxCLIPConditioner):
    """Flux conditioning whose CLIP-L pooled vector is read from a 248-token Long-CLIP window."""

    registered_name: ClassVar[str | None] = "long-clip"
    config_names = ("emphasis", "max_sequence_length", "t5_weighting", "keep", "ratio", "pad_token")
    reproduces_pipeline_prompts = False
    keep: int = LONG_CLIP_KEEP
    ratio: int = LONG_CLIP_RATIO
    pad_token: PadToken | None = None
    has_own_text_encoder: bool = False

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        text_encoder_path: str | Path | None = None,
        *,
        keep: int = LONG_CLIP_KEEP,
        ratio: int = LONG_CLIP_RATIO,
        pad_token: PadToken | None = None,
        clip_skip: int | None = None,
        **options: Any,
    ) -> FluxLongCLIPConditioner:
        if clip_skip is not None:
            FluxCLIPConditioner.from_pipeline(pipe, clip_skip=clip_skip)  # refuses it, in its words
        if text_encoder_path is not None:
            path = Path(text_encoder_path)
            tokenizer, encoder = _load_long_text_encoder(path, like=pipe.text_encoder, tokenizer=pipe.tokenizer)
        else:
            tokenizer, encoder = pipe.tokenizer, stretch_text_model(pipe.text_encoder, keep, ratio)
        tokenizer = stretch_tokenizer(tokenizer, position_count(encoder), pad_token)
        conditioner = cls(tokenizer, encoder, pipe.tokenizer_2, pipe.text_encoder_2, **options)
        conditioner.keep, conditioner.ratio, conditioner.pad_token = keep, ratio, pad_token
        conditioner.has_own_text_encoder = text_encoder_path is not None
        return conditioner

    def save_parts(self, folder: Path) -> None:
        if self.has_own_text_encoder:
            self.clip_encoder.save_pretrained(folder / "text_encoder")
            self.clip_tokenizer.save_pretrained(folder / "tokenizer")

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        return LongCLIPConditioner.load_parts(folder, pipe)


def checkpoint_has_projection(path: Path) -> bool:
    """Whether a Long-CLIP text-model folder (or a saved conditioner holding one in text_encoder/) has text_projection weights."""
    from safetensors import safe_open

    model_dir = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
    weight_files = sorted(model_dir.glob("*.safetensors"))
    if not weight_files:  # .bin weights: trust the class the config names
        config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
        return any("WithProjection" in name for name in config.get("architectures") or [])
    for weight_file in weight_files:
        with safe_open(weight_file, "pt") as weights:
            if any(key.endswith("text_projection.weight") for key in weights.keys()):
                return True
    return False


def transformer_long_clip_conditioner(pipe: Any, text_encoder_path: str | Path | None = None, **options: Any) -> Conditioner:
    """The Long-CLIP conditioner for `pipe`'s transformer layout (SD3 or Flux)."""
    family = transformer_family(pipe)
    if family == "sd3":
        options.setdefault("pad_to_multiple_of", CLIP_POSITIONS)
        return SD3LongCLIPConditioner.from_pipeline(pipe, text_encoder_path, **options)
    if family == "flux":
        if options.pop("pad_to_multiple_of", None) is not None:
            raise ValueError("pad_to_multiple_of does not apply to Flux: its CLIP-L gives only a pooled vector, no states to cut")
        return FluxLongCLIPConditioner.from_pipeline(pipe, text_encoder_path, **options)
    raise ValueError(
        f"{type(pipe).__name__} has a transformer but neither SD3's nor Flux's text encoders; Long-CLIP supports SD, SDXL, "
        "SD3 and Flux pipelines"
    )
