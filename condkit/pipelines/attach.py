"""Plug a timestep-aware conditioner into a diffusers pipeline with forward-pre-hooks.

    with attach(pipe, conditioner):
        images = pipe(**conditioner.encode(prompt).kwargs(), num_inference_steps=25).images

`attach` registers a pre-forward hook on every module the pipeline feeds prompt embeddings to —
`unet`, `controlnet` (each net of a MultiControlNet), `transformer` — and removes them when the
block ends, also on error. Nothing is swapped: `pipe.unet` stays the UNet, so LoRA management,
`save_pretrained`, `from_pipe`, offloading and `torch.compile` see the pipeline they expect.

A hook acts only on `PipelineFeatures` (what a timestep-aware conditioner's `encode()` returns):
it replaces them with `at_timestep(features, t)` and, when that returns a pooled vector too,
replaces the pooled input (SDXL's `added_cond_kwargs["text_embeds"]`, a transformer's
`pooled_projections`; an SD3 ControlNet made for zero pooled projections keeps its zeros). Plain
prompt embeddings pass untouched, so a pipeline made with `from_pipe`, which shares the modules,
runs normally inside the block. A UNet and a ControlNet called with the
same features at the same timestep get one mapping, computed once.

Timesteps reach `at_timestep` in one unit on every pipeline, the scheduler's (σ·1000 for flow matching):
Flux's pipeline passes σ to its transformer, so its hook multiplies by 1000 (TIMESTEP_IN_THOUSANDS); and
when `at_timestep` changes the token count, Flux's `txt_ids` (one all-zero row per text token) follow it.

Static conditioners need nothing: `attach` with one is a no-op. CLIP-family conditioners
(`schedules_prompts`) get the hooks too, for prompts with A1111 prompt editing, alternation or AND:
the hook tells them the denoising step (`composable.denoising_step`), and for AND it expands the
call to one row per sub-prompt and, in a forward hook, folds the outputs back (composable diffusion).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator
from weakref import WeakKeyDictionary

import torch
from torch import nn

from condkit.conditioning.base import Conditioner
from condkit.conditioning.features import PipelineFeatures, plain
from condkit.conditioning.scheduled_prompts import ComposedRows, denoising_step_context
from condkit.pipelines.composable import denoising_step, expand_rows, fold_rows

DENOISER_ATTRIBUTES = ("unet", "controlnet", "transformer")
# Denoisers whose pipeline passes the timestep divided by 1000 (σ for flow matching) and that multiply it back
# inside: their hooks hand conditioners timestep * 1000, so τ and time embeddings use one unit (σ·1000) everywhere.
TIMESTEP_IN_THOUSANDS = frozenset({"FluxTransformer2DModel", "FluxControlNetModel"})
_attached: WeakKeyDictionary[nn.Module, Conditioner] = WeakKeyDictionary()  # module → the conditioner attached to it


def denoisers(pipe: Any) -> list[nn.Module]:
    """The modules of `pipe` that take encoder_hidden_states; a MultiControlNet counts as its nets."""
    found = []
    for attribute in DENOISER_ATTRIBUTES:
        module = getattr(pipe, attribute, None)
        if not isinstance(module, nn.Module):
            continue
        nets = getattr(module, "nets", None)
        found.extend(nets if isinstance(nets, nn.ModuleList) else [module])
    return found


class _Mapping:
    """at_timestep for one attach block, remembering the last result for the next denoiser of the same step."""

    def __init__(self, conditioner: Conditioner, pipe: Any = None) -> None:
        self.conditioner = conditioner
        self.pipe = pipe
        self._last: tuple[Any, ...] | None = None

    def __call__(self, features: PipelineFeatures, timestep: Any) -> tuple[torch.Tensor, torch.Tensor | None] | ComposedRows:
        step = torch.as_tensor(timestep).detach().flatten().tolist()
        # Holding `features` keeps its memory from being reused by another tensor while it is remembered.
        key = (features, features._version, step)
        last = self._last
        if last is not None and last[0] is features and last[1:3] == key[1:]:
            return last[3]
        step = denoising_step(self.pipe, timestep) if getattr(self.conditioner, "schedules_prompts", False) else None
        with denoising_step_context(step):  # which step of the run this is, for prompt editing
            mapped = self.conditioner.at_timestep(plain(features), timestep)
        if isinstance(mapped, ComposedRows):
            result = mapped
        else:
            hidden, pooled = mapped if isinstance(mapped, tuple) else (mapped, None)
            result = (hidden, pooled)
        self._last = (*key, result)
        return result


class _ConditioningHook:
    """A forward-pre-hook that maps PipelineFeatures in encoder_hidden_states for one denoiser.

    Arguments keep the form they came in (positional or keyword), so hooks that run later see the call
    the pipeline made, with the mapped values.
    """

    def __init__(self, module: nn.Module, mapping: _Mapping) -> None:
        parameters = inspect.signature(getattr(module, "_orig_mod", module).forward).parameters
        self.positions = {name: index for index, name in enumerate(parameters)}
        self.takes_pooled_projections = "pooled_projections" in parameters
        # An SD3 ControlNet trained with zero pooled projections gets zeros from its pipeline whatever the prompt: keep them.
        config = getattr(getattr(module, "_orig_mod", module), "config", None)
        self.keeps_zero_pooled = bool(getattr(config, "force_zeros_for_pooled_projection", False))
        self.takes_txt_ids = "txt_ids" in parameters  # Flux: one RoPE position row per text token
        self.timestep_scale = 1000 if type(getattr(module, "_orig_mod", module)).__name__ in TIMESTEP_IN_THOUSANDS else 1
        self.mapping = mapping
        self.pending_fold: list | None = None  # how to fold this call's AND rows back, for the forward hook

    def _get(self, args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self.positions.get(name, len(args))
        return args[position] if position < len(args) else None

    def _set(self, args: tuple, kwargs: dict, name: str, value: Any) -> tuple:
        position = self.positions.get(name, len(args))
        if name not in kwargs and position < len(args):
            return args[:position] + (value,) + args[position + 1 :]
        kwargs[name] = value
        return args

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        features = self._get(args, kwargs, "encoder_hidden_states")
        if not isinstance(features, PipelineFeatures):
            return None
        timestep = self._get(args, kwargs, "timestep")
        if timestep is not None and self.timestep_scale != 1:
            timestep = timestep * self.timestep_scale
        mapped = self.mapping(features, timestep)
        kwargs = dict(kwargs)
        if isinstance(mapped, ComposedRows):  # AND: one row per sub-prompt, folded back by `fold`
            args, kwargs = expand_rows(self, module, args, kwargs, mapped)
            hidden, pooled, self.pending_fold = mapped.hidden, mapped.pooled, mapped.combination
        else:
            hidden, pooled = mapped
        dtype = getattr(module, "dtype", features.dtype)
        args = self._set(args, kwargs, "encoder_hidden_states", hidden.to(device=features.device, dtype=dtype).contiguous())
        text_ids = self._get(args, kwargs, "txt_ids") if self.takes_txt_ids else None
        if text_ids is not None and text_ids.shape[-2] != hidden.shape[1]:
            args = self._set(args, kwargs, "txt_ids", resized_text_ids(text_ids, hidden.shape[1]))
        if pooled is not None and not self.keeps_zero_pooled:
            pooled = pooled.to(device=features.device, dtype=dtype).contiguous()
            if self.takes_pooled_projections:
                args = self._set(args, kwargs, "pooled_projections", pooled)
            else:
                added = {**(self._get(args, kwargs, "added_cond_kwargs") or {}), "text_embeds": pooled}
                args = self._set(args, kwargs, "added_cond_kwargs", added)
        return args, kwargs

    def fold(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook: an AND call's output back to one row per image (composable diffusion)."""
        if self.pending_fold is None:
            return None
        combination, self.pending_fold = self.pending_fold, None
        return fold_rows(output, combination)


def resized_text_ids(text_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Flux's txt_ids for `length` text tokens: the rows kept, new rows zero (a Flux pipeline's text ids are all zero)."""
    resized = text_ids.new_zeros(*text_ids.shape[:-2], length, text_ids.shape[-1])
    kept = min(length, text_ids.shape[-2])
    resized[..., :kept, :] = text_ids[..., :kept, :]
    return resized


@contextmanager
def attach(pipe: Any, conditioner: Conditioner) -> Iterator[Any]:
    """Map `conditioner`'s features in every denoiser call of `pipe` while the block runs."""
    if not (conditioner.timestep_aware or getattr(conditioner, "schedules_prompts", False)):
        yield pipe
        return
    modules = denoisers(pipe)
    if not modules:
        raise ValueError(f"{type(pipe).__name__} has no unet, controlnet or transformer to attach a conditioner to")
    if modules and all(_attached.get(module) is conditioner for module in modules):
        yield pipe  # already attached with this conditioner (generate() inside a user's attach block)
        return
    if any(module in _attached for module in modules):
        raise RuntimeError("another conditioner is already attached to this pipeline's denoiser")
    mapping = _Mapping(conditioner, pipe)
    handles = []
    try:
        for module in modules:
            hook = _ConditioningHook(module, mapping)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            handles.append(module.register_forward_hook(hook.fold))
            _attached[module] = conditioner
        yield pipe
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            _attached.pop(module, None)
