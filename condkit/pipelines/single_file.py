"""A single-file checkpoint (what most users download: one .safetensors in the original LDM layout) as a
diffusers pipeline, through diffusers' own `from_single_file`.

The pipeline class comes from the checkpoint's keys, as diffusers infers its model type: SDXL base,
SDXL refiner (img2img), inpainting (a 9-channel UNet), SD, SD3/SD3.5 (an MMDiT: "sd3", "sd35_medium",
"sd35_large") or Flux.1 ("flux-dev", "flux-schnell"). The component configs come from `config`, a
diffusers pipeline folder or hub id of the same family; without one, diffusers infers the family's hub
repository and fetches its configs (network or the Hugging Face cache), so offline give a local folder.
Only .safetensors is read: a .ckpt is a pickle.

SD3 and Flux files come in two kinds, both read: all-in-one (the transformer with its VAE and some or all
text encoders, e.g. sd3_medium_incl_clips.safetensors) and transformer-only (BFL's flux1-dev.safetensors,
most Flux fine-tunes). Whatever the file lacks (VAE, any text encoder) is loaded here from `config`, which
must then hold those weights, and handed to from_single_file: diffusers' own lookup in `config` knows only
diffusers' weight file names (not transformers' model.safetensors), and it would read a VAE out of any file.
So a transformer-only file needs `config`. Flux Fill and Depth, Chroma and Flux.2 files are other pipelines
and are refused. Every component ends in eval mode (see `in_eval_mode`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

SINGLE_FILE_SUFFIXES = (".safetensors",)
SD3_MODEL_TYPES = ("sd3", "sd35_medium", "sd35_large")
PIPELINE_CLASSES = {
    "xl_base": "StableDiffusionXLPipeline", "playground-v2-5": "StableDiffusionXLPipeline",
    "xl_refiner": "StableDiffusionXLImg2ImgPipeline", "xl_inpaint": "StableDiffusionXLInpaintPipeline",
    "inpainting": "StableDiffusionInpaintPipeline", "inpainting_v2": "StableDiffusionInpaintPipeline",
    "v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline",
    **dict.fromkeys(SD3_MODEL_TYPES, "StableDiffusion3Pipeline"),
    "flux-dev": "FluxPipeline", "flux-schnell": "FluxPipeline",
}
TRANSFORMER_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
COMPONENT_PREFIXES = {  # where SD3 and Flux (ComfyUI) all-in-one files keep each text encoder
    "StableDiffusion3Pipeline": {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
                                 "text_encoder_3": "text_encoders.t5xxl."},
    "FluxPipeline": {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.t5xxl."},
}


def model_type_of(checkpoint: dict[str, torch.Tensor]) -> str:
    """diffusers' name for the checkpoint's model type (`infer_diffusers_model_type`).

    diffusers tells SD3 from SD3.5 Medium by the released widths (to pick a hub repository for the configs);
    an MMDiT of another width (a pruned or test model) is "sd3" here, as its configs come from `config`.
    """
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    is_mmdit = any(key in checkpoint for key in CHECKPOINT_KEY_NAMES["sd3"] + CHECKPOINT_KEY_NAMES["sd35_large"])
    try:
        model_type = infer_diffusers_model_type(checkpoint)
    except UnboundLocalError:  # diffusers' SD3 branch for an MMDiT of the released width but another position table
        model_type = "sd3"
    return model_type if not is_mmdit or model_type in SD3_MODEL_TYPES else "sd3"


def pipeline_class_for(checkpoint: dict[str, torch.Tensor]) -> type:
    """The diffusers pipeline class for a single-file checkpoint, from diffusers' model-type inference."""
    import diffusers

    model_type = model_type_of(checkpoint)
    if model_type not in PIPELINE_CLASSES:
        raise ValueError(f"the checkpoint is a {model_type!r} model; condkit reads StableDiffusion 1.x/2.x, SDXL, "
                         "SD3/SD3.5 and Flux.1 dev/schnell single files")
    return getattr(diffusers, PIPELINE_CLASSES[model_type])


def components_in_file(checkpoint: dict[str, torch.Tensor], pipeline_class: type) -> set[str]:
    """Which of an SD3/Flux pipeline's VAE and text encoders the file holds, by the key prefixes of those files."""
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS

    prefixes = {"vae": tuple(LDM_VAE_KEYS), **COMPONENT_PREFIXES[pipeline_class.__name__]}
    return {name for name, prefix in prefixes.items() if any(key.startswith(prefix) for key in checkpoint)}


def components_from_config(checkpoint: dict[str, torch.Tensor], pipeline_class: type, config: str | None,
                           dtype: torch.dtype) -> dict[str, Any]:
    """The VAE and text encoders an SD3/Flux file lacks, loaded from `config` (see the module's docstring)."""
    if pipeline_class.__name__ not in TRANSFORMER_PIPELINES:
        return {}
    wanted = {"vae", *COMPONENT_PREFIXES[pipeline_class.__name__]}
    missing = wanted - components_in_file(checkpoint, pipeline_class)
    if missing and config is None:
        raise ValueError(f"the checkpoint is a {model_type_of(checkpoint)!r} file without {', '.join(sorted(missing))}; "
                         "give --model-config, a diffusers folder (or hub id) of the same model holding them")
    if not missing:
        return {}
    listed = pipeline_class.load_config(config)
    components = {}
    for name in sorted(missing):
        library, class_name = listed.get(name) or (None, None)
        if class_name is None:  # e.g. an SD3 folder saved without T5
            components[name] = None
            continue
        model_class = getattr(importlib.import_module(library), class_name)
        components[name] = model_class.from_pretrained(config, subfolder=name, torch_dtype=dtype)
    return components


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
        checkpoint = load_single_file_checkpoint(str(path))
        pipeline_class = pipeline_class_for(checkpoint)
        components = components_from_config(checkpoint, pipeline_class, config, dtype)
        del checkpoint  # from_single_file reads the file again (memory-mapped)
        pipe = pipeline_class.from_single_file(str(path), config=config, dtype=dtype, **components)
    except Exception as error:  # a file diffusers cannot convert, or configs it cannot fetch: one line either way
        first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        hint = "" if config is not None or "--model-config" in first_line else (
            " (offline? give --model-config, a diffusers folder of the same model family)")
        raise ValueError(f"could not load single-file checkpoint {str(path)!r}: {first_line}{hint}") from None
    in_eval_mode(pipe)
    return pipe


def in_eval_mode(pipe: Any) -> None:
    """diffusers builds a T5 read from a single file (SD3's text_encoders.t5xxl) in training mode, dropout on
    (create_diffusers_t5_model_from_checkpoint never calls eval()); every other loader leaves models in eval mode."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
