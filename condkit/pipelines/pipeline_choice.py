"""Which diffusers pipeline a generation runs on, from the model and the image inputs it is given.

    inputs = ImageInputs(init_image=..., mask=..., control_images=[...], strength=0.6)
    pipe, call_kwargs = pipeline_for(pipe, inputs, controlnets)

The task follows the inputs — a mask means inpainting, an init image img2img, neither text-to-image —
and ControlNets (given, or the model folder's own) add control; diffusers' AutoPipelineFor{Text2Image,
Image2Image,Inpainting}.from_pipe picks the class (StableDiffusion(XL)[ControlNet][Img2Img|Inpaint]Pipeline)
and shares every component, so LoRAs, embeddings and offload hooks carry over.

A model that needs an input it was not given says which flag is missing: an inpainting model (its UNet
takes 9 input channels) needs --init-image and --mask, a ControlNet pipeline --control-image. A mask of
another size than the init image is resized to it, as diffusers' mask processor does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

INPAINT_UNET_CHANNELS = 9  # latents + masked-image latents + mask


@dataclass
class ImageInputs:
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    control_images: list[Image.Image] = field(default_factory=list)
    strength: float | None = None

    @property
    def task(self) -> str:
        return "inpaint" if self.mask is not None else "img2img" if self.init_image is not None else "text2img"


def check_image_flags(init_image: str | None, mask: str | None, strength: float | None, controlnets: list[str],
                      control_images: list[str]) -> None:
    """Flag combinations that cannot work, refused before anything loads (one line each)."""
    if mask is not None and init_image is None:
        raise ValueError("--mask needs --init-image (the image to inpaint)")
    if strength is not None and init_image is None:
        raise ValueError("--strength applies to img2img and inpainting: give --init-image")
    if controlnets and len(controlnets) != len(control_images):
        raise ValueError(f"got {len(controlnets)} --controlnet and {len(control_images)} --control-image values; "
                         "expected one --control-image per --controlnet")


def load_controlnets(names: list[str], dtype: Any) -> list[Any]:
    """ControlNetModel per folder or hub id (on the CPU; the pipeline moves them with itself)."""
    from diffusers import ControlNetModel

    from condkit.pipelines.loading import _looks_like_path

    nets = []
    for name in names:
        if _looks_like_path(name) and not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"--controlnet {name!r}: not a ControlNet folder (no config.json)")
        try:
            nets.append(ControlNetModel.from_pretrained(name, dtype=dtype))
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--controlnet {name!r} could not be loaded: {first_line}") from None
    return nets


def check_controlnet_fits(controlnet: Any, unet: Any, name: str) -> None:
    """A ControlNet made for another base model (SD1.x vs SD2.x vs SDXL) has another cross-attention width or
    added-conditioning kind than the UNet; refuse it in one line."""
    theirs, ours = controlnet.config.cross_attention_dim, unet.config.cross_attention_dim
    if theirs != ours:
        raise ValueError(f"--controlnet {name!r} has cross-attention width {theirs}, this model's UNet {ours} "
                         "(a ControlNet for another base model)")
    theirs, ours = controlnet.config.addition_embed_type, unet.config.addition_embed_type
    if theirs != ours:
        raise ValueError(f"--controlnet {name!r} takes added conditioning {theirs!r}, this model's UNet {ours!r} "
                         "(a ControlNet for another base model)")


def pipeline_for(pipe: Any, inputs: ImageInputs, controlnets: list[Any], model_name: str = "the model",
                 controlnet_names: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The pipeline to call for `inputs` (built from `pipe` with from_pipe) and the image arguments of its call."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    own_controlnet = getattr(pipe, "controlnet", None)
    unet = getattr(pipe, "unet", None)
    if unet is None and (controlnets or inputs.control_images):
        raise ValueError(f"--controlnet and --control-image support StableDiffusion(XL) models; {model_name} is a "
                         f"{type(pipe).__name__}")
    if unet is not None and getattr(unet.config, "in_channels", 4) == INPAINT_UNET_CHANNELS and inputs.task != "inpaint":
        raise ValueError(f"{model_name} is an inpainting model (its UNet takes {INPAINT_UNET_CHANNELS} input channels): "
                         "give --init-image IMG and --mask IMG")
    if own_controlnet is not None and not controlnets and not inputs.control_images:
        raise ValueError(f"{model_name} is a ControlNet pipeline: give --control-image IMG"
                         + (f" ({len(own_controlnet.nets)} of them, one per ControlNet)" if hasattr(own_controlnet, "nets") else ""))
    if inputs.control_images and not controlnets:
        if own_controlnet is None:
            raise ValueError("--control-image needs --controlnet MODEL (this model has no ControlNet)")
        controlnets = list(getattr(own_controlnet, "nets", [own_controlnet]))
        if len(controlnets) != len(inputs.control_images):
            raise ValueError(f"{model_name} has {len(controlnets)} ControlNets; got {len(inputs.control_images)} --control-image")
    for index, controlnet in enumerate(controlnets):
        name = controlnet_names[index] if controlnet_names and index < len(controlnet_names) else f"ControlNet {index + 1}"
        check_controlnet_fits(controlnet, pipe.unet, name)

    if inputs.task == "text2img" and not controlnets:
        if not _takes_init_image(pipe):
            return pipe, {}
        if pipe.config.get("requires_aesthetics_score", False):
            raise ValueError(f"{model_name} is an SDXL refiner, which only refines an image: give --init-image IMG")
    auto = {"text2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
            "inpaint": AutoPipelineForInpainting}[inputs.task]
    controlnet = None if not controlnets else controlnets[0] if len(controlnets) == 1 else controlnets
    chosen = auto.from_pipe(pipe, controlnet=controlnet)
    chosen.set_progress_bar_config(disable=True)
    return chosen, call_arguments(chosen, inputs)


def call_arguments(pipe: Any, inputs: ImageInputs) -> dict[str, Any]:
    """The image arguments of `pipe`'s call: a ControlNet text-to-image pipeline takes its control image as
    `image`, the img2img/inpaint ControlNet pipelines as `control_image`."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    arguments: dict[str, Any] = {}
    control = None
    if inputs.control_images:
        control = inputs.control_images[0] if len(inputs.control_images) == 1 else list(inputs.control_images)
    if inputs.init_image is not None:
        arguments["image"] = inputs.init_image
        if control is not None:
            arguments["control_image"] = control
    elif control is not None:
        arguments["image"] = control
    if inputs.mask is not None:
        arguments["mask_image"] = inputs.mask
    if inputs.strength is not None:
        arguments["strength"] = inputs.strength
    unknown = [name for name in arguments if name not in parameters]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} does not take {', '.join(unknown)}")
    return arguments


def fit_to_init_image(pipe: Any, arguments: dict[str, Any], height: int | None, width: int | None
                      ) -> tuple[dict[str, Any], int | None, int | None]:
    """The output size with an init image: --height/--width when given, else the image's own size rounded down to a
    multiple of 8 (the VAE's scale factor, by which diffusers' image processor rounds). The init image is resized to it with
    that processor (img2img pipelines take no height/width); the mask follows inside the pipeline."""
    if "image" not in arguments or not _takes_init_image(pipe):  # a ControlNet text-to-image pipeline's "image" is its control
        return arguments, height, width
    image = arguments["image"]
    multiple = max(pipe.vae_scale_factor, 8)  # condkit's sizes are multiples of 8, as real VAEs' factor is
    height = height or image.height - image.height % multiple
    width = width or image.width - image.width % multiple
    if height < multiple or width < multiple:
        raise ValueError(f"--init-image is {image.width}x{image.height} px; expected at least {multiple} px on each side")
    if (image.height, image.width) != (height, width):
        arguments = {**arguments, "image": pipe.image_processor.resize(image, height, width)}
    return arguments, height, width


def _takes_init_image(pipe: Any) -> bool:
    import inspect

    return "strength" in inspect.signature(pipe.__call__).parameters
