"""--lora FILE[:SCALE]: what `condkit generate` draws equals diffusers' own LoRA path, bit for bit.

The LoRA files are written here from tiny random peft adapters (UNet and text encoder, nonzero lora_B so
they change the images), in diffusers' layout and in kohya's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from PIL import Image
from safetensors.torch import save_file

from condkit import load_conditioner
from condkit.cli import main
from condkit.pipelines.lora import LoraFile, load_loras
from tiny_models import tiny_sd2_components, tiny_sd_pipeline

PROMPT = "a red circle"
COMMON = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "3", "--quiet", "--no-grid"]


def lora_layers(pipe, seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA weights for `pipe`'s UNet and text encoder, keyed as diffusers saves them."""
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                       init_lora_weights=False), pipe.text_encoder)
    return {"unet": get_peft_model_state_dict(pipe.unet), "text_encoder": get_peft_model_state_dict(pipe.text_encoder)}


def write_lora(folder, seed: int, text_encoder: bool = True):
    layers = lora_layers(tiny_sd_pipeline(), seed)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                              text_encoder_lora_layers=layers["text_encoder"] if text_encoder else None,
                                              safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    model = root / "model"
    tiny_sd_pipeline().save_pretrained(model)
    first, second = write_lora(root / "first", seed=1), write_lora(root / "second", seed=2)
    layers = lora_layers(tiny_sd_pipeline(), seed=1)
    prefixed = {f"{part}.{key}": value for part, state in layers.items() for key, value in state.items()}
    kohya = root / "kohya.safetensors"
    save_file({key: value.contiguous() for key, value in convert_state_dict_to_kohya(prefixed).items()}, kohya)
    other_base = StableDiffusionPipeline(**tiny_sd2_components())  # cross-attention 1024 wide, not 32
    other_base.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(root / "sd2", unet_lora_layers=get_peft_model_state_dict(other_base.unet),
                                              safe_serialization=True)
    return {"model": model, "first": first, "second": second, "kohya": kohya, "sd2": root / "sd2" / "pytorch_lora_weights.safetensors"}


def cli_image(capsys, files, out, *argv) -> np.ndarray:
    code = main(["generate", "--model", str(files["model"]), "--prompt", PROMPT, *COMMON, "--out", str(out), *argv])
    assert code == 0, capsys.readouterr().err
    return np.asarray(Image.open(out / "00000_3.png"))


def python_image(files, loras: list[tuple[str, float]], **call) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(files["model"])
    pipe.set_progress_bar_config(disable=True)
    for name, _ in loras:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if loras and not call:
        pipe.set_adapters([name for name, _ in loras], [scale for _, scale in loras])
    image = pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=[torch.Generator().manual_seed(3)], **call).images[0]
    return np.asarray(image)


def test_one_lora_at_a_scale_equals_diffusers(files, tmp_path, capsys):
    ours = cli_image(capsys, files, tmp_path / "a", "--lora", f"{files['first']}:0.5")
    assert np.array_equal(ours, python_image(files, [("first", 0.5)]))  # load_lora_weights + set_adapters
    # diffusers' per-call scale, which reaches the text encoder as encode_prompt(lora_scale=0.5): the same image
    assert np.array_equal(ours, python_image(files, [("first", 1.0)], cross_attention_kwargs={"scale": 0.5}))
    assert not np.array_equal(ours, python_image(files, []))
    assert json.loads((tmp_path / "a" / "00000_3.json").read_text())["loras"] == [f"{files['first']}:0.5"]


def test_two_loras_and_kohya_layout(files, tmp_path, capsys):
    both = cli_image(capsys, files, tmp_path / "b", "--lora", f"{files['first']}:0.5", "--lora", f"{files['second']}:1.2")
    assert np.array_equal(both, python_image(files, [("first", 0.5), ("second", 1.2)]))
    kohya = cli_image(capsys, files, tmp_path / "k", "--lora", f"{files['kohya']}:0.7")
    assert np.array_equal(kohya, python_image(files, [("first", 0.7)]))


@torch.no_grad()
def test_text_encoder_scale_reaches_the_conditioner_exactly(files):
    pipe = tiny_sd_pipeline()
    load_loras(pipe, [LoraFile(files["first"], 0.5)])
    ours = load_conditioner("clip", pipe).encode(PROMPT, "blurry")
    reference = tiny_sd_pipeline()
    reference.load_lora_weights(str(files["first"]))
    theirs, their_negative = reference.encode_prompt(PROMPT, "cpu", 1, True, "blurry", lora_scale=0.5)
    assert (ours.prompt_embeds - theirs).abs().max().item() == 0.0
    assert torch.equal(ours.negative_prompt_embeds, their_negative)
    assert not torch.equal(ours.prompt_embeds, tiny_sd_pipeline().encode_prompt(PROMPT, "cpu", 1, False)[0])


@torch.no_grad()
def test_long_clip_carries_loras_loaded_before_it_and_refuses_later_changes(files):
    plain = load_conditioner("long-clip", tiny_sd_pipeline()).encode(PROMPT).prompt_embeds
    pipe = tiny_sd_pipeline()
    load_loras(pipe, [LoraFile(files["first"], 1.0)])
    with_lora = load_conditioner("long-clip", pipe)
    assert not torch.equal(with_lora.encode(PROMPT).prompt_embeds, plain)
    # the first 77 positions of a short prompt are the pipeline encoder's own (stretching keeps rows < 20, and the
    # prompt's states end long before): so the copy holds the LoRA exactly as the pipeline's encoder does
    tokens = len(PROMPT) + 2
    assert torch.equal(with_lora.encode(PROMPT).prompt_embeds[:, :tokens].float(),
                       pipe.encode_prompt(PROMPT, "cpu", 1, False)[0][:, :tokens])
    pipe.set_adapters([next(iter(pipe.get_list_adapters()["unet"]))], [0.3])
    with pytest.raises(ValueError, match="LoRAs changed after this Long-CLIP conditioner was built"):
        with_lora.encode(PROMPT)
    assert not torch.equal(load_conditioner("long-clip", pipe).encode(PROMPT).prompt_embeds, plain)


def test_a_unet_only_lora_prints_nothing(files, tmp_path, capsys):
    unet_only = write_lora(tmp_path / "unet-only", seed=4, text_encoder=False)
    code = main(["generate", "--model", str(files["model"]), "--prompt", PROMPT, *COMMON, "--out", str(tmp_path / "o"),
                 "--lora", str(unet_only)])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == "", captured.err


def bad_cases(folder, files) -> list[tuple[list[str], str]]:
    garbage = folder / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    no_lora = folder / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, no_lora)
    pickle = folder / "lora.ckpt"
    pickle.write_bytes(b"not read")
    return [
        ([str(folder / "missing.safetensors")], "missing.safetensors': no such file"),
        ([str(garbage)], "garbage.safetensors': not a readable safetensors file"),
        ([str(no_lora)], "holds no LoRA weights"),
        ([str(pickle)], "expected a .safetensors LoRA file"),
        ([f"{files['first']}:nan"], "the scale must be a finite number"),
        ([str(files["sd2"])], "has shape [4, 1024] in the file but [4, 32] in the model (a LoRA for another base model?)"),
    ]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_bad_lora_is_one_line_exit_2_nothing_written(files, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for value, message in bad_cases(tmp_path, files):
        before = sorted(tmp_path.rglob("*"))
        extra = ["--prompt", PROMPT] if command == "generate" else ["--prompt-set", "short", "--limit", "1", "-n", "1"]
        code = main([command, "--model", str(files["model"]), *extra, *COMMON[:-1], "--out", str(tmp_path / "never"),
                     "--lora", *value])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("condkit: error: ") and err.count("\n") == 1 and message in err, err
        assert sorted(tmp_path.rglob("*")) == before
