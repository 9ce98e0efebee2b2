"""LoRA files on a pipeline, the diffusers way: `load_lora_weights` per file, then `set_adapters` with the scales.

    loras = [read_lora_argument("style.safetensors:0.7"), read_lora_argument("detail.safetensors")]
    load_loras(pipe, loras)   # = pipe.load_lora_weights(file, adapter_name=...) each, pipe.set_adapters(names, scales)

diffusers reads diffusers/peft and kohya key layouts, UNet and text-encoder weights. `set_adapters` puts
each file's scale into its peft layers, in the UNet and in the text encoders alike, so a conditioner
that encodes with the pipeline's own text encoders (CLIP, projected over CLIP) sees exactly the LoRA the
pipeline's `encode_prompt` would. Long-CLIP encodes with a stretched copy made when it is built: load
LoRAs before building it (the CLI does).

A file that does not fit the model (another base: different layer widths) or holds no weights for it
is refused in one line naming the file; nothing else is done to the pipeline after that, as the caller
stops.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

LORA_KEY_MARKS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_magnitude_vector")
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+?): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


@dataclass(frozen=True)
class LoraFile:
    path: Path
    scale: float = 1.0

    @property
    def adapter_name(self) -> str:
        """The file's stem as a peft adapter name (no dots, which peft's module dicts refuse)."""
        return re.sub(r"\W", "_", self.path.stem) or "lora"


def parse_lora_argument(value: str) -> LoraFile:
    """"FILE" or "FILE:SCALE" (SCALE a finite number); a path that itself ends in ":<number>" needs an explicit scale."""
    path, separator, scale_text = value.rpartition(":")
    if separator and path:
        try:
            scale = float(scale_text)
        except ValueError:
            return LoraFile(Path(value))
        if not math.isfinite(scale):
            raise ValueError(f"--lora {value!r}: the scale must be a finite number, got {scale_text!r}")
        return LoraFile(Path(path), scale)
    return LoraFile(Path(value))


def read_lora_argument(value: str) -> LoraFile:
    """Parse one --lora value and check, before any model loads, that its file is a readable LoRA safetensors."""
    from safetensors import SafetensorError, safe_open

    lora = parse_lora_argument(value)
    if not lora.path.is_file():
        raise FileNotFoundError(f"--lora {value!r}: no such file (expected FILE or FILE:SCALE)")
    if lora.path.suffix != ".safetensors":
        raise ValueError(f"--lora {value!r}: expected a .safetensors LoRA file")
    try:
        with safe_open(str(lora.path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--lora {value!r}: not a readable safetensors file ({first_line})") from None
    if not any(mark in key for key in keys for mark in LORA_KEY_MARKS):
        raise ValueError(f"--lora {value!r}: the file holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys)")
    return lora


def read_lora_arguments(values: list[str]) -> list[LoraFile]:
    return [read_lora_argument(value) for value in values]


def load_loras(pipe: Any, loras: list[LoraFile]) -> list[str]:
    """Load every file with diffusers' `load_lora_weights` and activate them all with `set_adapters` at their
    scales; returns the adapter names. Raises ValueError (one line naming the file) when a file does not fit."""
    if not loras:
        return []
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{type(pipe).__name__} cannot load LoRA weights")
    names: list[str] = []
    for index, lora in enumerate(loras):
        name = lora.adapter_name if lora.adapter_name not in names else f"{lora.adapter_name}_{index}"
        try:
            with _benign_loading_reports_dropped():
                pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--lora {str(lora.path)!r} does not fit this model: {_reason(error)}") from None
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise ValueError(f"--lora {str(lora.path)!r} holds no weights for this model's UNet or text encoders "
                             f"(a LoRA for another kind of model?)")
        names.append(name)
    pipe.set_adapters(names, [lora.scale for lora in loras])
    return names


def _reason(error: BaseException) -> str:
    text = str(error)
    mismatch = _SIZE_MISMATCH.search(text)
    if mismatch:
        key, theirs, ours = mismatch.groups()
        return f"{key} has shape {theirs} in the file but {ours} in the model (a LoRA for another base model?)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(error).__name__


class _DropBenignReports(logging.Filter):
    """Drops two messages load_lora_weights logs that tell a CLI user nothing: diffusers' "No LoRA keys
    associated to CLIPTextModel" (a UNet-only file), and transformers' load report for a text-encoder adapter,
    which lists every base weight as MISSING because only the adapter's weights are loaded."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "No LoRA keys associated to" in message:
            return False
        if "LOAD REPORT" in message and "MISSING" in message:
            return any(status in message for status in ("UNEXPECTED", "MISMATCH", "CONVERSION"))
        return True


@contextmanager
def _benign_loading_reports_dropped() -> Iterator[None]:
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    handlers = [handler for library in (diffusers_logging, transformers_logging)
                for handler in library._get_library_root_logger().handlers]
    drop = _DropBenignReports()
    for handler in handlers:
        handler.addFilter(drop)
    try:
        with warnings.catch_warnings():  # peft's note that a second adapter joins the first: here that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)
