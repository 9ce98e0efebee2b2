"""--model FILE.safetensors: a single-file checkpoint in the original LDM layout, loaded offline with diffusers'
from_single_file and a local config folder, draws what the diffusers folder it was written from draws.

The file is written here from the tiny SD components: `ldm_checkpoint` renames diffusers' keys to the LDM
layout (the inverse of diffusers' convert_ldm_* functions), and the test first proves diffusers converts it
back to exactly the components' state dicts.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from PIL import Image
from safetensors.torch import save_file

from condkit.cli import main
from condkit.pipelines.single_file import load_single_file
from tiny_models import tiny_sd_pipeline

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    layer, _, parameter = rest.partition(".")
    return f"{RESNET_TO_LDM[layer]}.{parameter}"


def unet_key_to_ldm(key: str, unet) -> str:
    per_block = unet.config.layers_per_block + 1
    fixed = {diffusers: ldm for diffusers, ldm in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    if key in fixed:
        return fixed[key]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        layer = 1 + block * per_block + index
        return f"input_blocks.{layer}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{layer}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per_block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, index, rest = match[1], int(match[2]), match[3]
        return f"middle_block.{2 * index}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        layer = block * per_block + index
        return f"output_blocks.{layer}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{layer}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        has_attention = hasattr(unet.up_blocks[block], "attentions")
        return f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.conv.{match[2]}"
    raise KeyError(key)


def vae_key_to_ldm(key: str, vae) -> str:
    fixed = {diffusers: ldm for diffusers, ldm in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    if key in fixed:
        return fixed[key]
    conv_shortcut = lambda rest: rest.replace("conv_shortcut", "nin_shortcut")  # noqa: E731
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{conv_shortcut(match[3])}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{len(vae.decoder.up_blocks) - 1 - int(match[1])}.block.{match[2]}.{conv_shortcut(match[3])}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{len(vae.decoder.up_blocks) - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{conv_shortcut(match[3])}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{match[1]}.mid.attn_1.{VAE_ATTENTION_TO_LDM[match[2]]}.{match[3]}"
    raise KeyError(key)


def ldm_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights as an original-layout SD single file (UNet, VAE, CLIP text encoder)."""
    checkpoint = {}
    for key, value in pipe.unet.state_dict().items():
        checkpoint["model.diffusion_model." + unet_key_to_ldm(key, pipe.unet)] = value
    for key, value in pipe.vae.state_dict().items():
        ldm = vae_key_to_ldm(key, pipe.vae)
        is_attention_matrix = ".mid.attn_1." in ldm and ldm.endswith("weight") and ".norm." not in ldm
        checkpoint["first_stage_model." + ldm] = value[:, :, None, None] if is_attention_matrix else value  # 1x1 convs
    for key, value in pipe.text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"  # transformers 4.x layout, as files have it
        checkpoint["cond_stage_model.transformer." + name] = value
    return {key: value.contiguous() for key, value in checkpoint.items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "folder")
    checkpoint = ldm_checkpoint(pipe)
    save_file(checkpoint, root / "tiny-sd.safetensors")
    return {"root": root, "pipe": pipe, "checkpoint": checkpoint}


def test_the_written_file_converts_back_to_the_components(written):
    pipe, checkpoint = written["pipe"], written["checkpoint"]
    for converted, module in ((convert_ldm_unet_checkpoint(checkpoint, pipe.unet.config), pipe.unet),
                              (convert_ldm_vae_checkpoint(checkpoint, pipe.vae.config), pipe.vae)):
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[key], expected[key]) for key in expected)
    text = convert_ldm_clip_checkpoint(checkpoint)
    assert all(torch.equal(text[f"text_model.{key}"], value) for key, value in pipe.text_encoder.state_dict().items())


def images(capsys, model: str, out, *extra) -> np.ndarray:
    code = main(["generate", "--model", model, "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32",
                 "--quiet", "--no-grid", "--out", str(out), *extra])
    assert code == 0, capsys.readouterr().err
    return np.asarray(Image.open(out / "00000_0.png"))


def test_single_file_with_a_local_config_draws_what_the_folder_draws(written, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = written["root"]
    pipe = load_single_file(root / "tiny-sd.safetensors", torch.float32, str(root / "folder"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(written["pipe"], name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name
    from_file = images(capsys, str(root / "tiny-sd.safetensors"), tmp_path / "file", "--model-config", str(root / "folder"))
    from_folder = images(capsys, str(root / "folder"), tmp_path / "folder")
    assert np.array_equal(from_file, from_folder)


def test_bad_single_files_are_one_line(written, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = written["root"]
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"never unpickled")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    cases = [
        ([str(pickle)], "must be .safetensors (a .ckpt is a pickle)"),
        ([str(garbage)], "could not load single-file checkpoint"),
        ([str(root / "tiny-sd.safetensors")], "(offline? give --model-config"),
        ([str(root / "tiny-sd.safetensors"), "--model-config", str(tmp_path / "nowhere")], "--model-config"),
    ]
    for (model, *extra), message in cases:
        code = main(["generate", "--model", model, *extra, "--prompt", "x", "--quiet", "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("condkit: error: ") and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "never").exists()
