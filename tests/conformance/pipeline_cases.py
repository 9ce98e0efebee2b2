"""Tiny offline diffusers pipelines of every supported kind, as named cases for conformance tests.

Each case builds a fresh, deterministic pipeline (random weights from fixed seeds) and gives the extra
`pipe(...)` kwargs it needs besides the prompt or its embeddings. All images are 32x32 px.

Families: "sd" and "sdxl" denoise with a UNet; "sd3" and "flux" with a transformer (tests/tiny_transformer_models.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
from diffusers import (
    AutoPipelineForText2Image,
    FluxImg2ImgPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)

from tiny_models import tiny_controlnet, tiny_sd2_components, tiny_sd_components, tiny_sd_pipeline, tiny_sdxl_pipeline
from tiny_transformer_models import (
    tiny_flux_components,
    tiny_flux_pipeline,
    tiny_sd3_components,
    tiny_sd3_controlnet,
    tiny_sd3_pipeline,
)

SIZE = 32
TRANSFORMER_FAMILIES = ("sd3", "flux")


@dataclass
class PipelineCase:
    name: str
    family: str
    build: Callable[[], Any]
    call_kwargs: Callable[[], dict]
    denoisers: tuple[str, ...]
    calls_per_step: int = 1  # denoiser calls per step: 2 for Flux's true CFG (the positive rows, then the negative)

    @property
    def has_transformer(self) -> bool:
        return self.family in TRANSFORMER_FAMILIES


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed: int) -> PIL.Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _mask() -> PIL.Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 255
    return PIL.Image.fromarray(mask, mode="L")


def _size() -> dict:
    return {"height": SIZE, "width": SIZE}


def _img2img() -> dict:
    return {"image": [_image(1), _image(2)], "strength": 1.0}


def _inpaint() -> dict:
    return {"image": [_image(1), _image(2)], "mask_image": [_mask(), _mask()], "strength": 1.0, **_size()}


def _control() -> dict:
    return {"image": _image(3), **_size()}


def _multicontrol() -> dict:
    return {"image": [_image(3), _image(4)], **_size()}


def _sd(cls, **extra):
    def build():
        return _quiet(cls(**tiny_sd_components(), **extra))

    return build


def _sd_controlnet(count: int):
    def build():
        components = tiny_sd_components()
        nets = [tiny_controlnet(components["unet"], seed=10 + i) for i in range(count)]
        controlnet = nets[0] if count == 1 else nets
        return _quiet(StableDiffusionControlNetPipeline(**components, controlnet=controlnet))

    return build


def _sdxl(cls, with_controlnet: bool = False):
    def build():
        components = dict(tiny_sdxl_pipeline().components)
        if with_controlnet:
            components["controlnet"] = tiny_controlnet(components["unet"], seed=10)
        return _quiet(cls(**components, add_watermarker=False))

    return build


def _sd_autopipeline_from_pipe():
    return _quiet(AutoPipelineForText2Image.from_pipe(_sd(StableDiffusionImg2ImgPipeline)()))


def _sd2():
    return _quiet(StableDiffusionPipeline(**tiny_sd2_components()))


def _sd3_controlnet():
    return _quiet(StableDiffusion3ControlNetPipeline(**tiny_sd3_components(), controlnet=tiny_sd3_controlnet(seed=10)))


def _sd3_control() -> dict:
    return {"control_image": _image(3), **_size()}


def _flux_img2img():
    return _quiet(FluxImg2ImgPipeline(**tiny_flux_components()))


def _true_cfg() -> dict:
    return {"true_cfg_scale": 2.0, **_size()}


CASES: list[PipelineCase] = [
    PipelineCase("sd-txt2img", "sd", tiny_sd_pipeline, _size, ("unet",)),
    PipelineCase("sd-img2img", "sd", _sd(StableDiffusionImg2ImgPipeline), _img2img, ("unet",)),
    PipelineCase("sd-inpaint", "sd", _sd(StableDiffusionInpaintPipeline), _inpaint, ("unet",)),
    PipelineCase("sd-controlnet", "sd", _sd_controlnet(1), _control, ("unet", "controlnet")),
    PipelineCase("sd-multicontrolnet", "sd", _sd_controlnet(2), _multicontrol, ("unet", "controlnet")),
    PipelineCase("sdxl-txt2img", "sdxl", tiny_sdxl_pipeline, _size, ("unet",)),
    PipelineCase("sdxl-img2img", "sdxl", _sdxl(StableDiffusionXLImg2ImgPipeline), _img2img, ("unet",)),
    PipelineCase("sdxl-inpaint", "sdxl", _sdxl(StableDiffusionXLInpaintPipeline), _inpaint, ("unet",)),
    PipelineCase(
        "sdxl-controlnet", "sdxl", _sdxl(StableDiffusionXLControlNetPipeline, with_controlnet=True), _control, ("unet", "controlnet")
    ),
    PipelineCase(
        "sd-pag",
        "sd",
        _sd(StableDiffusionPAGPipeline, pag_applied_layers=["mid"]),
        lambda: {"pag_scale": 3.0, **_size()},
        ("unet",),
    ),
    PipelineCase("sd-autopipeline-from-pipe", "sd", _sd_autopipeline_from_pipe, _size, ("unet",)),
    PipelineCase("sd2-v-prediction-1024", "sd", _sd2, _size, ("unet",)),
    PipelineCase("sd3-txt2img", "sd3", tiny_sd3_pipeline, _size, ("transformer",)),
    PipelineCase("sd3-controlnet", "sd3", _sd3_controlnet, _sd3_control, ("transformer", "controlnet")),
    PipelineCase("flux-txt2img", "flux", tiny_flux_pipeline, _size, ("transformer",)),
    PipelineCase("flux-true-cfg", "flux", tiny_flux_pipeline, _true_cfg, ("transformer",), calls_per_step=2),
    PipelineCase("flux-img2img", "flux", _flux_img2img, lambda: {**_img2img(), **_size()}, ("transformer",)),
]

_BY_NAME = {c.name: c for c in CASES}


def case(name: str) -> PipelineCase:
    return _BY_NAME[name]
