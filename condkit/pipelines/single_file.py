"""A single-file checkpoint (what most users download: one .safetensors in the original LDM layout) as a
diffusers pipeline, through diffusers' own `from_single_file`.

The pipeline class comes from the checkpoint's keys, as diffusers infers its model type: SDXL base,
SDXL refiner (img2img), inpainting (a 9-channel UNet) or SD. The component configs come from `config`,
a diffusers pipeline folder or hub id of the same family; without one, diffusers infers the family's hub
repository and fetches its configs (network or the Hugging Face cache), so offline give a local folder.
Only .safetensors is read: a .ckpt is a pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SINGLE_FILE_SUFFIXES = (".safetensors",)


def pipeline_class_for(checkpoint: dict[str, torch.Tensor]) -> type:
    """The diffusers pipeline class for a checkpoint in the LDM layout, from diffusers' model-type inference."""
    import diffusers
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    model_type = infer_diffusers_model_type(checkpoint)
    classes = {
        "xl_base": "StableDiffusionXLPipeline", "playground-v2-5": "StableDiffusionXLPipeline",
        "xl_refiner": "StableDiffusionXLImg2ImgPipeline", "xl_inpaint": "StableDiffusionXLInpaintPipeline",
        "inpainting": "StableDiffusionInpaintPipeline", "inpainting_v2": "StableDiffusionInpaintPipeline",
        "v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline",
    }
    if model_type not in classes:
        raise ValueError(f"the checkpoint is a {model_type!r} model; condkit reads StableDiffusion 1.x/2.x and SDXL single files")
    return getattr(diffusers, classes[model_type])


def load_single_file(path: str | Path, dtype: torch.dtype, config: str | None = None) -> Any:
    """diffusers' `from_single_file` for the class the checkpoint needs; one-line ValueError on any failure."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    path = Path(path)
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"--model {str(path)!r}: a single-file checkpoint must be .safetensors (a .ckpt is a pickle); "
                         "a pipeline is a folder with model_index.json")
    if config is not None and not Path(config).exists() and str(config).count("/") != 1:
        raise FileNotFoundError(f"--model-config {config!r}: no such folder (expected a diffusers pipeline folder or hub id)")
    try:
        pipeline_class = pipeline_class_for(load_single_file_checkpoint(str(path)))
        return pipeline_class.from_single_file(str(path), config=config, dtype=dtype)
    except Exception as error:  # a file diffusers cannot convert, or configs it cannot fetch: one line either way
        first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        hint = "" if config is not None else " (offline? give --model-config, a diffusers folder of the same model family)"
        raise ValueError(f"could not load single-file checkpoint {str(path)!r}: {first_line}{hint}") from None
