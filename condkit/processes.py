"""Which process this is when a run is launched on several (accelerate launch, torchrun)."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def launched_on_cpu_processes() -> bool:
    """Launched on several processes on a machine without GPUs: accelerate joins such a launch only
    when asked for the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    """accelerate's state of this process: one process and no communication unless launched on several."""
    return PartialState(cpu=launched_on_cpu_processes())
