"""diffusers' CPU offloading for the CLI's --offload: weights wait on the CPU and accelerate's hooks move
each model (`model`: enable_model_cpu_offload) or each layer (`sequential`: enable_sequential_cpu_offload)
to the execution device when it runs.

Conditioners read where a text encoder runs with diffusers' `get_module_execution_device` (the hooks'
device), not where its weights wait, so encoding under offload puts the token ids where the encoder runs.
Enable offload on the pipeline that is called (after `from_pipe`, which does not carry hooks over) and
after building the conditioner (Long-CLIP copies the encoders it stretches: a copy of a sequentially
offloaded encoder would hold no weights).
"""

from __future__ import annotations

from typing import Any

import torch

OFFLOAD_MODES = ("model", "sequential")


def enable_offload(pipe: Any, mode: str, device: torch.device) -> Any:
    """Offload `pipe` onto `device` (the execution device) with diffusers; returns `pipe`."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; expected one of {', '.join(OFFLOAD_MODES)}")
    if mode == "sequential" and device.type == "cpu":
        # accelerate then moves each weight to "meta" and back on the same device, which fails on the CPU.
        raise ValueError("--offload sequential needs an accelerator (cuda, mps, xpu); on the CPU there is nothing to offload to")
    getattr(pipe, f"enable_{mode}_cpu_offload")(device=device)
    return pipe
