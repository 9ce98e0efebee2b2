"""img2img, inpainting and ControlNet from `condkit generate`: each image equals diffusers' own pipeline called
with the same inputs, and every bad input is one line, exit 2, nothing written.

The model folders are written here with save_pretrained from tiny random components (tests/tiny_models.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from condkit.cli import main
from tiny_models import tiny_controlnet, tiny_sd2_components, tiny_sd_components, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPT = "a red circle"
STEPS = 2


def noise_image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask(size: int) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask, mode="L")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    paths = {name: root / name for name in ("sd", "sd-inpaint", "sd-controlnet", "sdxl", "cn1", "cn2", "cn-sd2", "cn-sdxl")}
    tiny_sd_pipeline().save_pretrained(paths["sd"])
    components = tiny_sd_components()
    unet = components["unet"]
    inpaint_unet = UNet2DConditionModel.from_config({**unet.config, "in_channels": 9})
    StableDiffusionInpaintPipeline(**{**tiny_sd_components(), "unet": inpaint_unet}).save_pretrained(paths["sd-inpaint"])
    StableDiffusionControlNetPipeline(**components, controlnet=tiny_controlnet(unet, seed=10)).save_pretrained(paths["sd-controlnet"])
    tiny_controlnet(unet, seed=10).save_pretrained(paths["cn1"])
    tiny_controlnet(unet, seed=11).save_pretrained(paths["cn2"])
    tiny_controlnet(tiny_sd2_components()["unet"], seed=12).save_pretrained(paths["cn-sd2"])
    sdxl = tiny_sdxl_pipeline()
    sdxl.save_pretrained(paths["sdxl"])
    tiny_controlnet(sdxl.unet, seed=13).save_pretrained(paths["cn-sdxl"])
    for name, image in (("init.png", noise_image(1)), ("control.png", noise_image(3)), ("control2.png", noise_image(4)),
                        ("mask16.png", square_mask(16)), ("mask32.png", square_mask(32)), ("tiny.png", noise_image(5, size=4))):
        image.save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths["root"] = root
    return paths


def cli(capsys, folders, out, model: str, *argv) -> tuple[int, str]:
    code = main(["generate", "--model", str(folders[model]), "--prompt", PROMPT, "--steps", str(STEPS), "--seed", "7",
                 "--quiet", "--no-grid", "--out", str(out), *[str(a) for a in argv]])
    return code, capsys.readouterr().err


def cli_image(capsys, folders, out, model: str, *argv) -> np.ndarray:
    code, err = cli(capsys, folders, out, model, *argv)
    assert code == 0, err
    return np.asarray(Image.open(out / "00000_7.png"))


def reference(pipe, **call) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    output = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=[torch.Generator().manual_seed(7)], **call)
    return np.asarray(output.images[0])


def root_file(folders, name: str) -> str:
    return str(folders["root"] / name)


def open_image(folders, name: str, mode: str = "RGB") -> Image.Image:
    return Image.open(folders["root"] / name).convert(mode)


def test_img2img_equals_diffusers(folders, tmp_path, capsys):
    ours = cli_image(capsys, folders, tmp_path / "a", "sd", "--init-image", root_file(folders, "init.png"), "--strength", "0.6")
    theirs = reference(AutoPipelineForImage2Image.from_pretrained(folders["sd"]), image=open_image(folders, "init.png"), strength=0.6)
    assert ours.shape == (32, 32, 3) and np.array_equal(ours, theirs)
    metadata = json.loads((tmp_path / "a" / "00000_7.json").read_text())
    assert metadata["strength"] == 0.6 and metadata["init_image"].endswith("init.png") and metadata["height"] == 32


def test_img2img_batch_gets_one_init_image_per_prompt(folders, tmp_path, capsys):
    code, err = cli(capsys, folders, tmp_path / "b", "sd", "--prompt", "a blue square", "--init-image",
                    root_file(folders, "init.png"), "--batch-size", "2")
    assert code == 0 and err == "", err  # no diffusers warning about fewer images than prompts
    assert len(list((tmp_path / "b").glob("*.png"))) == 2


def test_inpaint_resizes_a_mask_of_another_size_as_diffusers_does(folders, tmp_path, capsys):
    ours = cli_image(capsys, folders, tmp_path / "i", "sd", "--init-image", root_file(folders, "init.png"),
                     "--mask", root_file(folders, "mask16.png"))
    pipe = AutoPipelineForInpainting.from_pretrained(folders["sd"])
    theirs = reference(pipe, image=open_image(folders, "init.png"), mask_image=open_image(folders, "mask16.png", "L"))
    assert ours.shape == (32, 32, 3) and np.array_equal(ours, theirs)
    full_size_mask = cli_image(capsys, folders, tmp_path / "i32", "sd", "--init-image", root_file(folders, "init.png"),
                               "--mask", root_file(folders, "mask32.png"))
    assert np.array_equal(ours, full_size_mask)  # the 16 px square, scaled up, is the 32 px one


def test_an_inpainting_model_folder_works_with_its_flags_and_names_them_without(folders, tmp_path, capsys):
    code, err = cli(capsys, folders, tmp_path / "never", "sd-inpaint")
    assert code == 2 and err.count("\n") == 1
    assert "is an inpainting model (its UNet takes 9 input channels): give --init-image IMG and --mask IMG" in err
    assert not (tmp_path / "never").exists()
    ours = cli_image(capsys, folders, tmp_path / "ok", "sd-inpaint", "--init-image", root_file(folders, "init.png"),
                     "--mask", root_file(folders, "mask32.png"), "--strength", "1")
    pipe = AutoPipelineForInpainting.from_pretrained(folders["sd-inpaint"])
    theirs = reference(pipe, image=open_image(folders, "init.png"), mask_image=open_image(folders, "mask32.png", "L"), strength=1.0)
    assert np.array_equal(ours, theirs)


def _controlnet_pipeline(folders, cls, model: str, nets: list[str]):
    from diffusers import ControlNetModel, DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(folders[model])
    controlnets = [ControlNetModel.from_pretrained(folders[name]) for name in nets]
    return cls(**base.components, controlnet=controlnets[0] if len(controlnets) == 1 else controlnets)


def test_controlnet_and_multicontrolnet_equal_diffusers(folders, tmp_path, capsys):
    size = ["--height", "32", "--width", "32"]
    one = cli_image(capsys, folders, tmp_path / "c1", "sd", "--controlnet", folders["cn1"], "--control-image",
                    root_file(folders, "control.png"), *size)
    pipe = _controlnet_pipeline(folders, StableDiffusionControlNetPipeline, "sd", ["cn1"])
    assert np.array_equal(one, reference(pipe, image=open_image(folders, "control.png"), height=32, width=32))
    two = cli_image(capsys, folders, tmp_path / "c2", "sd", "--controlnet", folders["cn1"], "--control-image",
                    root_file(folders, "control.png"), "--controlnet", folders["cn2"], "--control-image",
                    root_file(folders, "control2.png"), *size)
    pipe = _controlnet_pipeline(folders, StableDiffusionControlNetPipeline, "sd", ["cn1", "cn2"])
    controls = [open_image(folders, "control.png"), open_image(folders, "control2.png")]
    assert np.array_equal(two, reference(pipe, image=controls, height=32, width=32))
    assert not np.array_equal(one, two)
    metadata = json.loads((tmp_path / "c2" / "00000_7.json").read_text())
    assert metadata["controlnet"] == [str(folders["cn1"]), str(folders["cn2"])] and len(metadata["control_image"]) == 2


def test_controlnet_with_img2img_equals_diffusers(folders, tmp_path, capsys):
    ours = cli_image(capsys, folders, tmp_path / "ci", "sd", "--init-image", root_file(folders, "init.png"), "--strength", "0.7",
                     "--controlnet", folders["cn1"], "--control-image", root_file(folders, "control.png"))
    pipe = _controlnet_pipeline(folders, StableDiffusionControlNetImg2ImgPipeline, "sd", ["cn1"])
    theirs = reference(pipe, image=open_image(folders, "init.png"), control_image=open_image(folders, "control.png"), strength=0.7)
    assert np.array_equal(ours, theirs)


def test_sdxl_controlnet_equals_diffusers(folders, tmp_path, capsys):
    ours = cli_image(capsys, folders, tmp_path / "x", "sdxl", "--controlnet", folders["cn-sdxl"], "--control-image",
                     root_file(folders, "control.png"), "--height", "32", "--width", "32")
    pipe = _controlnet_pipeline(folders, StableDiffusionXLControlNetPipeline, "sdxl", ["cn-sdxl"])
    assert np.array_equal(ours, reference(pipe, image=open_image(folders, "control.png"), height=32, width=32))


def test_a_controlnet_model_folder_uses_its_own_controlnet_and_names_the_missing_flag(folders, tmp_path, capsys):
    code, err = cli(capsys, folders, tmp_path / "never", "sd-controlnet")
    assert code == 2 and err.count("\n") == 1 and "is a ControlNet pipeline: give --control-image IMG" in err, err
    ours = cli_image(capsys, folders, tmp_path / "own", "sd-controlnet", "--control-image", root_file(folders, "control.png"),
                     "--height", "32", "--width", "32")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folders["sd-controlnet"])
    assert np.array_equal(ours, reference(pipe, image=open_image(folders, "control.png"), height=32, width=32))


def bad_cases(folders) -> list[tuple[str, list, str]]:
    init = ["--init-image", root_file(folders, "init.png")]
    control = ["--control-image", root_file(folders, "control.png")]
    return [
        ("sd", ["--init-image", root_file(folders, "missing.png")], "--init-image '" + root_file(folders, "missing.png") + "': no such file"),
        ("sd", ["--init-image", root_file(folders, "broken.png")], "broken.png' is not a readable image"),
        ("sd", [*init, "--mask", root_file(folders, "missing.png")], "--mask '" + root_file(folders, "missing.png") + "': no such file"),
        ("sd", [*init, "--mask", root_file(folders, "broken.png")], "--mask '" + root_file(folders, "broken.png") + "' is not a readable image"),
        ("sd", ["--controlnet", folders["cn1"], "--control-image", root_file(folders, "broken.png")], "--control-image"),
        ("sd", ["--controlnet", folders["cn1"], "--control-image", root_file(folders, "missing.png")], "missing.png': no such file"),
        ("sd", ["--controlnet", folders["cn-sd2"], *control], "has cross-attention width 1024, this model's UNet 32"),
        ("sd", ["--controlnet", folders["cn-sdxl"], *control], "a ControlNet for another base model"),
        ("sd", ["--controlnet", folders["root"] / "nowhere", *control], "not a ControlNet folder"),
        ("sd", ["--mask", root_file(folders, "mask32.png")], "--mask needs --init-image"),
        ("sd", ["--strength", "0.5"], "--strength applies to img2img and inpainting"),
        ("sd", ["--controlnet", folders["cn1"]], "expected one --control-image per --controlnet"),
        ("sd", control, "--control-image needs --controlnet MODEL"),
        ("sd", ["--init-image", root_file(folders, "tiny.png")], "--init-image is 4x4 px; expected at least 8 px"),
        ("sd-controlnet", [*control, *control], "has 1 ControlNets; got 2 --control-image"),
    ]


def test_bad_image_inputs_are_one_line_exit_2_nothing_written(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    failures = []
    for model, argv, message in bad_cases(folders):
        before = sorted(folders["root"].rglob("*")) + sorted(tmp_path.rglob("*"))
        code, err = cli(capsys, folders, tmp_path / "never", model, *argv)
        after = sorted(folders["root"].rglob("*")) + sorted(tmp_path.rglob("*"))
        if not (code == 2 and err.startswith("condkit: error: ") and err.count("\n") == 1 and message in err and after == before):
            failures.append(f"{argv}: code {code}: {err.strip()}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("value", ["0", "-0.5", "1.01", "nan", "inf", "abc"])
def test_strength_outside_zero_one_is_refused_before_loading(value, tmp_path, capsys):
    code = main(["generate", "--prompt", "x", "--init-image", "x.png", f"--strength={value}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"argument --strength: invalid value {value!r}: expected a number in (0, 1]" in err


def _refiner():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    parts = tiny_sdxl_pipeline().components
    unet_config = {**parts["unet"].config, "projection_class_embeddings_input_dim": 5 * 8 + 32, "cross_attention_dim": 32}
    torch.manual_seed(0)
    return StableDiffusionXLImg2ImgPipeline(
        vae=parts["vae"], text_encoder=None, text_encoder_2=parts["text_encoder_2"], tokenizer=None,
        tokenizer_2=parts["tokenizer_2"], unet=UNet2DConditionModel.from_config(unet_config), scheduler=parts["scheduler"],
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )  # fmt: skip


def test_an_sdxl_refiner_folder_refines_an_init_image_and_says_so_without_one(folders, tmp_path, capsys):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folders["refiner"] = tmp_path / "refiner"
    _refiner().save_pretrained(folders["refiner"])
    capsys.readouterr()
    code, err = cli(capsys, folders, tmp_path / "never", "refiner")
    assert code == 2 and err.count("\n") == 1 and "is an SDXL refiner, which only refines an image: give --init-image IMG" in err
    ours = cli_image(capsys, folders, tmp_path / "r", "refiner", "--init-image", root_file(folders, "init.png"), "--strength", "0.5")
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"])
    assert np.array_equal(ours, reference(pipe, image=open_image(folders, "init.png"), strength=0.5))
