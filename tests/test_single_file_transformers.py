"""--model FILE.safetensors for SD3 and Flux: an original-layout (Stability / BFL / ComfyUI) single file, loaded
offline with diffusers' from_single_file and --model-config, draws what the diffusers folder it was written from draws.

SD3: the tiny MMDiT is written in the original layout by `mmdit_to_original` (the inverse of diffusers'
convert_sd3_transformer_checkpoint_to_diffusers, checked first by converting back bit-identically), once
all-in-one (MMDiT, VAE, CLIP-L, CLIP-G, T5 under the keys SD3 files use) and once transformer-only (the rest
from --model-config). Flux: diffusers' conversion of the original Flux layout assumes the released width
(3072 features, `inner_dim` in convert_flux_transformer_checkpoint_to_diffusers), so a tiny Flux file cannot
be converted. The fast tests cover Flux files by their model type, class and refusals; the end-to-end Flux test
builds a one-block Flux of the released width (530M parameters, about a minute and 8 GB on a CPU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from condkit.cli import main
from condkit.pipelines.single_file import load_single_file, model_type_of, pipeline_class_for
from test_single_file import vae_key_to_ldm
from tiny_transformer_models import CLIP_WIDTH, T5_WIDTH, tiny_flux_components, tiny_sd3_components, tiny_sd3_pipeline

SD3_RENAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SD3_BLOCK_RENAMES = {
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
}
QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def scale_shift_swapped(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous reads (scale, shift) where the original reads (shift, scale)."""
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def mmdit_to_original(transformer) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel's weights in the original MMDiT layout (without the model.diffusion_model. prefix)."""
    weights, last = transformer.state_dict(), transformer.config.num_layers - 1
    original = {"pos_embed": weights["pos_embed.pos_embed"]}
    for name, value in weights.items():
        module, _, parameter = name.rpartition(".")
        if module in SD3_RENAMES:
            swapped = module == "norm_out.linear"
            original[f"{SD3_RENAMES[module]}.{parameter}"] = scale_shift_swapped(value) if swapped else value
    for block in range(transformer.config.num_layers):
        prefix = f"transformer_blocks.{block}."
        for name, value in weights.items():
            if not name.startswith(prefix):
                continue
            module, _, parameter = name[len(prefix):].rpartition(".")
            if module in SD3_BLOCK_RENAMES:
                swapped = module == "norm1_context.linear" and block == last  # the last context block's norm is continuous
                original[f"joint_blocks.{block}.{SD3_BLOCK_RENAMES[module]}.{parameter}"] = (
                    scale_shift_swapped(value) if swapped else value)
        for fused, parts in QKV.items():
            for parameter in ("weight", "bias"):
                original[f"joint_blocks.{block}.{fused}.{parameter}"] = torch.cat(
                    [weights[f"{prefix}{part}.{parameter}"] for part in parts])
    return original


def sd3_single_file(pipe, *, all_in_one: bool) -> dict[str, torch.Tensor]:
    """The pipeline as an SD3 file: the MMDiT, and for all-in-one its VAE and text encoders as SD3 files key them."""
    checkpoint = {f"model.diffusion_model.{key}": value for key, value in mmdit_to_original(pipe.transformer).items()}
    if all_in_one:
        for key, value in pipe.vae.state_dict().items():
            ldm = vae_key_to_ldm(key, pipe.vae)
            is_attention_matrix = ".mid.attn_1." in ldm and ldm.endswith("weight") and ".norm." not in ldm
            checkpoint[f"first_stage_model.{ldm}"] = value[:, :, None, None] if is_attention_matrix else value
        for name, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2), ("t5xxl", pipe.text_encoder_3)):
            checkpoint |= {f"text_encoders.{name}.transformer.{key}": value for key, value in encoder.state_dict().items()}
    return {key: value.contiguous().clone() for key, value in checkpoint.items()}


def sd3_pipeline_as_files_have_it() -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline with the two things diffusers assumes of an SD3 file's CLIPs: CLIP-G wider than CLIP-L
    (it tells them apart by width, 1280 against 768; here 48 against 32) and CLIP-L with no projection (an identity)."""
    components = tiny_sd3_components()
    clip_g = components["text_encoder_2"].config.to_dict() | {"hidden_size": 48, "intermediate_size": 96, "projection_dim": 48}
    components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)).eval()
    pooled = components["text_encoder"].config.projection_dim + 48
    components["transformer"] = SD3Transformer2DModel.from_config({**components["transformer"].config,
                                                                   "pooled_projection_dim": pooled}).eval()
    with torch.no_grad():
        projection = components["text_encoder"].text_projection.weight
        projection.copy_(torch.eye(projection.shape[0]))
    pipe = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-single-file")
    pipe = sd3_pipeline_as_files_have_it()
    pipe.save_pretrained(root / "folder")
    shutil.copytree(root / "folder", root / "config", ignore=lambda folder, names: [  # the transformer must come from the file
        name for name in names if Path(folder).name == "transformer" and name.endswith(".safetensors")])
    for name, all_in_one in (("tiny-sd3.safetensors", True), ("tiny-sd3-transformer.safetensors", False)):
        save_file(sd3_single_file(pipe, all_in_one=all_in_one), root / name)
    return {"root": root, "pipe": pipe}


def test_the_written_mmdit_converts_back_to_the_transformer(written):
    transformer = written["pipe"].transformer
    converted = convert_sd3_transformer_checkpoint_to_diffusers(mmdit_to_original(transformer))
    expected = transformer.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[key], expected[key]) for key in expected)


def images(capsys, model: str, out, *extra) -> np.ndarray:
    code = main(["generate", "--model", model, "--prompt", "a red cube", "--steps", "2", "--height", "32", "--width", "32",
                 "--seed", "4", "--quiet", "--no-grid", "--out", str(out), *extra])
    assert code == 0, capsys.readouterr().err
    return np.asarray(Image.open(out / "00000_4.png"))


@pytest.mark.parametrize("name", ["tiny-sd3.safetensors", "tiny-sd3-transformer.safetensors"])
def test_an_sd3_single_file_draws_what_the_folder_draws(written, name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = written["root"]
    pipe = load_single_file(root / name, torch.float32, str(root / "config"))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ours, theirs = getattr(pipe, component).state_dict(), getattr(written["pipe"], component).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs), component
    from_file = images(capsys, str(root / name), tmp_path / "file", "--model-config", str(root / "config"))
    from_folder = images(capsys, str(root / "folder"), tmp_path / "folder")
    assert np.array_equal(from_file, from_folder)


def flux_keys(*, guidance: bool, image_channels: int = 64) -> dict[str, torch.Tensor]:
    """The keys by which diffusers tells a Flux file's model type (a file for the refusals, not a model)."""
    keys = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(2), "img_in.weight": torch.zeros(4, image_channels)}
    if guidance:
        keys["guidance_in.in_layer.bias"] = torch.zeros(4)
    return {f"model.diffusion_model.{key}": value for key, value in keys.items()}


def test_model_types_and_pipeline_classes():
    assert model_type_of(flux_keys(guidance=True)) == "flux-dev"
    assert model_type_of(flux_keys(guidance=False)) == "flux-schnell"
    assert pipeline_class_for(flux_keys(guidance=True)).__name__ == "FluxPipeline"
    assert model_type_of(flux_keys(guidance=True, image_channels=384)) == "flux-fill"
    mmdit = mmdit_to_original(tiny_sd3_pipeline().transformer)
    tiny_mmdit = {f"model.diffusion_model.{key}": value for key, value in mmdit.items()}
    assert model_type_of(tiny_mmdit) == "sd3"  # diffusers' table knows the released widths only
    assert pipeline_class_for(tiny_mmdit).__name__ == "StableDiffusion3Pipeline"


def test_bad_transformer_single_files_are_one_line(written, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = written["root"]
    save_file(flux_keys(guidance=True, image_channels=384), tmp_path / "flux-fill.safetensors")
    save_file(flux_keys(guidance=False), tmp_path / "flux-schnell.safetensors")
    cases = [
        ([str(tmp_path / "flux-fill.safetensors")], "the checkpoint is a 'flux-fill' model; condkit reads"),
        ([str(tmp_path / "flux-schnell.safetensors")],
         "'flux-schnell' file without text_encoder, text_encoder_2, vae; give --model-config"),
        ([str(root / "tiny-sd3-transformer.safetensors")],
         "'sd3' file without text_encoder, text_encoder_2, text_encoder_3, vae; give --model-config"),
    ]
    for (model, *extra), message in cases:
        code = main(["generate", "--model", model, *extra, "--prompt", "x", "--quiet", "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("condkit: error: ") and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "never").exists()


FLUX_RENAMES = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
FLUX_BLOCKS = {  # original prefix: (diffusers prefix, renamed modules, fused modules)
    "double_blocks": ("transformer_blocks", {
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
        "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
        "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
        "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    }, {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}),
    "single_blocks": ("single_transformer_blocks", {
        "norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm", "proj_out": "linear2",
    }, {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}),
}


def flux_to_original(transformer) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel's weights in BFL's layout (flux1-dev.safetensors), with ComfyUI's model.diffusion_model."""
    weights = transformer.state_dict()
    original = {}
    for name, value in weights.items():
        module, _, parameter = name.rpartition(".")
        if module in FLUX_RENAMES:
            original[f"{FLUX_RENAMES[module]}.{parameter}"] = scale_shift_swapped(value) if module == "norm_out.linear" else value
    counts = {"double_blocks": transformer.config.num_layers, "single_blocks": transformer.config.num_single_layers}
    for kind, (ours, renames, fused) in FLUX_BLOCKS.items():
        for block in range(counts[kind]):
            prefix = f"{ours}.{block}."
            for name, value in weights.items():
                module, _, parameter = name.removeprefix(prefix).rpartition(".")
                if name.startswith(prefix) and module in renames:
                    renamed = renames[module]  # RMSNorm weights are "scale" in the original
                    original[f"{kind}.{block}.{renamed}.{'scale' if renamed.endswith('_norm') else parameter}"] = value
            for target, parts in fused.items():
                for parameter in ("weight", "bias"):
                    original[f"{kind}.{block}.{target}.{parameter}"] = torch.cat(
                        [weights[f"{prefix}{part}.{parameter}"] for part in parts])
    return {f"model.diffusion_model.{key}": value.contiguous().clone() for key, value in original.items()}


def test_a_transformer_only_flux_dev_file_draws_what_the_folder_draws(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    components = tiny_flux_components()
    torch.manual_seed(1)
    components["transformer"] = FluxTransformer2DModel(  # one block each, 24 heads x 128: the width diffusers converts
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
    ).eval()
    pipe = FluxPipeline(**components)
    original = flux_to_original(pipe.transformer)
    converted, expected = convert_flux_transformer_checkpoint_to_diffusers(dict(original)), pipe.transformer.state_dict()
    assert converted.keys() == expected.keys() and all(torch.equal(converted[key], expected[key]) for key in expected)
    del converted
    assert model_type_of(original) == "flux-dev"
    pipe.save_pretrained(tmp_path / "folder")
    shutil.copytree(tmp_path / "folder", tmp_path / "config", ignore=lambda folder, names: [
        name for name in names if Path(folder).name == "transformer" and name.endswith(".safetensors")])
    save_file(original, tmp_path / "flux1-dev-tiny.safetensors")
    del original
    from_file = images(capsys, str(tmp_path / "flux1-dev-tiny.safetensors"), tmp_path / "file",
                       "--model-config", str(tmp_path / "config"), "--guidance", "3.5")
    from_folder = images(capsys, str(tmp_path / "folder"), tmp_path / "from-folder", "--guidance", "3.5")
    assert np.array_equal(from_file, from_folder)
