"""Load a StableDiffusion(XL), SD3 (SD3.5) or Flux pipeline from a local folder or a hub id.

`condkit.load_pipeline()` with no model (the embedded shapes world) is resolved in condkit/embedded.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from condkit.pipelines.library_noise import drop_irrelevant_library_messages

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    """'auto'/None picks cuda (this process's GPU when launched on several), then mps, then cpu; an
    explicit device must exist."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            launched_on_several = int(os.environ.get("WORLD_SIZE", "1")) > 1
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if launched_on_several else torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available on this machine (no CUDA); use --device cpu")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available on this machine; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 everywhere; float16 only on accelerators (CPU kernels for it are missing or slow)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("dtype float16 cannot run on device cpu; use float32 or bfloat16 there")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16")
    return dtype


def load_pipeline(
    model: str | os.PathLike, device: str | None = None, dtype: str | None = None, *, keep_on_cpu: bool = False,
    model_config: str | None = None,
) -> Any:
    """A diffusers pipeline ready to run, from a pipeline folder, a hub id or a single-file .safetensors checkpoint
    (`model_config`: the diffusers folder or hub id describing it, see `single_file`). Its loading bars are
    diffusers' and transformers' own (`condkit.verbosity.quiet()` turns them off with every other bar).
    `keep_on_cpu`: in the dtype for `device`, but left on the CPU, for diffusers' CPU offloading to place."""
    if model is None:
        raise ValueError("no model given; expected a pipeline folder or hub id (condkit.load_pipeline() loads the embedded one)")
    drop_irrelevant_library_messages()
    from diffusers import DiffusionPipeline

    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    source = Path(model)
    if source.is_file():
        from condkit.pipelines.single_file import load_single_file

        pipe = load_single_file(source, resolved_dtype, model_config)
    elif _looks_like_path(str(source)):
        if not source.is_dir():
            raise FileNotFoundError(f"model folder {str(source)!r} does not exist")
        if not (source / "model_index.json").is_file():
            raise ValueError(f"{str(source)!r} is not a diffusers pipeline folder (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(source, dtype=resolved_dtype)
    else:
        pipe = _from_hub(str(source), resolved_dtype)
    has_text_encoder = getattr(pipe, "text_encoder", None) is not None or getattr(pipe, "text_encoder_2", None) is not None
    if not has_text_encoder or not (getattr(pipe, "unet", None) is not None or _is_sd3_or_flux(pipe)):
        raise ValueError(f"{model!r} is a {type(pipe).__name__}, not a StableDiffusion, StableDiffusionXL, SD3 or Flux pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe if keep_on_cpu else pipe.to(resolved_device)


def _is_sd3_or_flux(pipe: Any) -> bool:
    from condkit.conditioning.transformer_pipelines import transformer_family

    return transformer_family(pipe) is not None


def _looks_like_path(text: str) -> bool:
    """Hub ids look like "owner/name"; anything else, or anything on disk, is a local path."""
    return os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") != 1


def _from_hub(repo_id: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, dtype=dtype)
    except Exception as error:  # offline, gated, missing: every cause gets the same one-line report
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"could not load hub model {repo_id!r} (no network or not in the local cache?): {first_line}"
        ) from None
