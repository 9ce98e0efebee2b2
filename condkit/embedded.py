"""The embedded default: what "no model named" means, for the public API and the CLI.

    pipe = condkit.load_pipeline()                      # the shapes world's shipped pipeline
    pipe = condkit.load_pipeline("owner/name")          # anything else, as pipelines.loading reads it

The generic layers (conditioning/, pipelines/, training/) take a model from their caller and know
nothing of the shapes world; this top-level module is the one place that turns None into
`condkit.shapes_world.MODEL_DIR`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from condkit.shapes_world import MODEL_DIR

NAME = "condkit:shapes-world"  # how run records name the embedded model


def default_model() -> Path:
    """The shipped pipeline folder; a one-line error when it is missing (e.g. deleted to retrain it)."""
    if not (MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing at {MODEL_DIR}; train it with `condkit world train`")
    return MODEL_DIR


def load_pipeline(
    model: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None, **options: Any
) -> Any:
    """A diffusers pipeline ready to run: `model` None means the embedded shapes-world pipeline,
    otherwise a pipeline folder or a hub id (see `condkit.pipelines.loading.load_pipeline`)."""
    from condkit.pipelines.loading import load_pipeline as load

    return load(default_model() if model is None else model, device, dtype, **options)
