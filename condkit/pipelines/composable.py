"""What attach's hooks need for prompts that change during sampling: the step, and composable AND.

`denoising_step(pipe, timestep)` says which step of the run a denoiser call belongs to, counted as
A1111 counts it: from 1 at the first step the run executes, out of the `num_inference_steps` the
schedule is written for. In txt2img that is the timestep's position in the scheduler's timesteps.
img2img and inpainting with strength < 1 skip the early timesteps; A1111 then still counts from 1 at
the first executed step, over the full step count, so "[a:b:0.5]" at strength 0.5 shows "a" at every
executed step. (A second-order scheduler's repeated timestep is one step.)

`expand_rows` and `fold_rows` implement composable diffusion (A1111's AND) around one denoiser
call: the inputs get one row per sub-prompt, and each image's output becomes
ε_uncond + Σ wᵢ (εᵢ − ε_uncond), which the pipeline's guidance then scales by g.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condkit.conditioning.prompt_schedule import check_schedule, is_composable, split_subprompts
from condkit.conditioning.scheduled_prompts import ComposedRows

_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


def _unique_in_order(values: list[float]) -> list[float]:
    unique: list[float] = []
    for value in values:
        if not unique or unique[-1] != value:
            unique.append(value)
    return unique


def denoising_step(pipe: Any, timestep: Any) -> tuple[int, int] | None:
    """(k, N): the call is at the k-th executed step (1-based) of a schedule of N steps; None when `timestep` is
    not one of the scheduler's timesteps (a denoiser called outside a pipeline run, or in other units)."""
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if timesteps is None:
        return None
    values = torch.as_tensor(timesteps).detach().flatten().float().cpu().tolist()
    steps = _unique_in_order(values)
    current = float(torch.as_tensor(timestep).detach().flatten()[0].float())
    if current not in steps:
        return None
    begin = getattr(pipe.scheduler, "begin_index", None)
    if begin is None:
        executed = getattr(pipe, "_num_timesteps", None)
        begin = max(len(values) - executed, 0) if isinstance(executed, int) else 0
    first = len(_unique_in_order(values[:begin]))
    return steps.index(current) - first + 1, len(steps)


def check_prompts_for_run(pipe: Any, conditioner: Any, prompts: list[tuple[str | None, ...]], steps: int) -> None:
    """Before a run of `steps` steps starts: refuse (ValueError, one line) an edit step beyond the run, and AND
    with a ControlNet, for a conditioner that schedules prompts. `prompts`: per request, the prompt, then its
    negative and per-encoder prompts (None when unset)."""
    if not getattr(conditioner, "schedules_prompts", False):
        return
    for prompt, *others in prompts:
        texts = [part.text for part in split_subprompts(prompt)] if is_composable(prompt) else [prompt]
        for text in [*texts, *(other for other in others if other is not None)]:
            check_schedule(text, steps)
        if is_composable(prompt) and getattr(pipe, "controlnet", None) is not None:
            raise ValueError(
                f"AND (composable diffusion) in {prompt[:60]!r} cannot run with a ControlNet: its residuals are per image, "
                "not per sub-prompt; drop AND from the prompt or the ControlNet from the pipeline"
            )


def expand_rows(hook: Any, module: nn.Module, args: tuple, kwargs: dict, composed: ComposedRows) -> tuple[tuple, dict]:
    """The call's per-image inputs (latents, timesteps, SDXL time ids, ...) with one row per denoiser row."""
    if "controlnet_cond" in hook.positions or any(hook._get(args, kwargs, name) is not None for name in _RESIDUALS):
        raise ValueError(
            "AND (composable diffusion) cannot run with a ControlNet: its residuals are per image, not per sub-prompt; "
            "drop AND from the prompt or the ControlNet from the pipeline"
        )
    images = len(composed.combination)
    rows = torch.tensor(composed.source_rows)

    def expand(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == images:
            return value.index_select(0, rows.to(value.device))
        if isinstance(value, dict):
            return {key: expand(item) for key, item in value.items()}
        return value

    args = tuple(expand(value) for value in args)
    kwargs = {key: expand(value) for key, value in kwargs.items()}
    return args, kwargs


def fold_rows(output: Any, combination: list[tuple[int, tuple[tuple[int, float], ...]]]) -> Any:
    """The denoiser's output with one row per image again: out[base] + Σ w·(out[row] − out[base])."""
    if isinstance(output, torch.Tensor):
        return _fold(output, combination)
    if isinstance(output, tuple):
        return (_fold(output[0], combination), *output[1:])
    output.sample = _fold(output.sample, combination)  # a diffusers BaseOutput
    return output


def _fold(sample: torch.Tensor, combination: list[tuple[int, tuple[tuple[int, float], ...]]]) -> torch.Tensor:
    rows = []
    for base, terms in combination:
        combined = sample[base]
        for row, weight in terms:
            combined = combined + (sample[row] - sample[base]) * weight
        rows.append(combined)
    return torch.stack(rows)
