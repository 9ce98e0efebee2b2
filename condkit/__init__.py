"""condkit: swappable text-conditioning modules for Hugging Face diffusers.

    import condkit

    pipe = condkit.load_pipeline()                                  # the embedded shapes world, or a hub id / folder
    conditioner = condkit.load_conditioner("clip", pipe)            # a name, or a folder from save_pretrained
    with condkit.attach(pipe, conditioner):
        image = pipe(**conditioner.encode("a red (cube:1.3)").kwargs()).images[0]

Names are imported on first use, so `import condkit` is cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("condkit")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Conditioning": "condkit.conditioning.base",
    "Conditioner": "condkit.conditioning.base",
    "CLIPConditioner": "condkit.conditioning.clip",
    "LongCLIPConditioner": "condkit.conditioning.long_clip",
    "LLMAdapterConditioner": "condkit.conditioning.llm_adapter",
    "ProjectedConditioner": "condkit.conditioning.projection",
    "ConcatConditioner": "condkit.conditioning.concat",
    "register_conditioner": "condkit.conditioning.registry",
    "available_conditioners": "condkit.conditioning.registry",
    "load_conditioner": "condkit.conditioning.registry",
    "load_embedding": "condkit.conditioning.embeddings",
    "attach": "condkit.pipelines.attach",
    "load_pipeline": "condkit.embedded",
    "generate": "condkit.pipelines.generate",
    "GenerationSettings": "condkit.pipelines.generate",
    "PromptRequest": "condkit.pipelines.generate",
    "train": "condkit.training.loop",
    "TrainingConfig": "condkit.training.loop",
    "TextualInversion": "condkit.training.textual_inversion",
    "CoRe": "condkit.training.core",
    "train_adapter": "condkit.training.adapter_runs",
    "train_long_clip": "condkit.training.long_clip",
}
_RENAMED = {"train_adapter": "run_adapter_training"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'condkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
