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
`pooled_projections`). Plain prompt embeddings pass untouched, so a pipeline made with `from_pipe`,
which shares the modules, runs normally inside the block. A UNet and a ControlNet called with the
same features at the same timestep get one mapping, computed once.

Static conditioners need nothing: `attach` with one is a no-op.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator
from weakref import WeakSet

import torch
from torch import nn

from condkit.conditioning.base import Conditioner
from condkit.conditioning.features import PipelineFeatures, plain

DENOISER_ATTRIBUTES = ("unet", "controlnet", "transformer")
_attached: WeakSet[nn.Module] = WeakSet()


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

    def __init__(self, conditioner: Conditioner) -> None:
        self.conditioner = conditioner
        self._last: tuple[Any, ...] | None = None

    def __call__(self, features: PipelineFeatures, timestep: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        step = torch.as_tensor(timestep).detach().flatten().tolist()
        # Holding `features` keeps its memory from being reused by another tensor while it is remembered.
        key = (features, features._version, step)
        last = self._last
        if last is not None and last[0] is features and last[1:3] == key[1:]:
            return last[3]
        mapped = self.conditioner.at_timestep(plain(features), timestep)
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
        self.mapping = mapping

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
        hidden, pooled = self.mapping(features, self._get(args, kwargs, "timestep"))
        dtype = getattr(module, "dtype", features.dtype)
        kwargs = dict(kwargs)
        args = self._set(args, kwargs, "encoder_hidden_states", hidden.to(device=features.device, dtype=dtype).contiguous())
        if pooled is not None:
            pooled = pooled.to(device=features.device, dtype=dtype).contiguous()
            if self.takes_pooled_projections:
                args = self._set(args, kwargs, "pooled_projections", pooled)
            else:
                added = {**(self._get(args, kwargs, "added_cond_kwargs") or {}), "text_embeds": pooled}
                args = self._set(args, kwargs, "added_cond_kwargs", added)
        return args, kwargs


@contextmanager
def attach(pipe: Any, conditioner: Conditioner) -> Iterator[Any]:
    """Map `conditioner`'s features in every denoiser call of `pipe` while the block runs."""
    if not conditioner.timestep_aware:
        yield pipe
        return
    modules = denoisers(pipe)
    if not modules:
        raise ValueError(f"{type(pipe).__name__} has no unet, controlnet or transformer to attach a conditioner to")
    if any(module in _attached for module in modules):
        raise RuntimeError("a timestep-aware conditioner is already attached to this pipeline's denoiser")
    mapping = _Mapping(conditioner)
    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(_ConditioningHook(module, mapping), with_kwargs=True))
            _attached.add(module)
        yield pipe
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            _attached.discard(module)
