"""Conditioners as saveable units: options and trained parts survive save/load; bad folders fail in one line."""

import json
import shutil
import sys

import pytest
import torch
from transformers import BertConfig, BertModel

import condkit
from condkit import Conditioner, load_conditioner
from condkit.conditioning.long_clip import stretch_text_model, text_embeddings
from condkit.conditioning.registry import ENTRY_POINT_GROUP, rediscover
from conformance.pipeline_cases import case
from tiny_models import byte_tokenizer, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red cube", "a big blue ball on the left"]


def assert_same_encoding(first: Conditioner, second: Conditioner) -> None:
    a, b = first.encode(PROMPTS, "blurry"), second.encode(PROMPTS, "blurry")
    assert a.tensors().keys() == b.tensors().keys()
    for key in a.tensors():
        assert torch.equal(a.tensors()[key], b.tensors()[key]), key
    if first.timestep_aware:
        rows = torch.cat([a.negative_prompt_embeds, a.prompt_embeds]).as_subclass(torch.Tensor)
        for t in (999, 400, 3):
            expected, got = first.at_timestep(rows, torch.tensor(t)), second.at_timestep(rows, torch.tensor(t))
            assert torch.equal(expected, got), t


@pytest.fixture
def sd():
    return tiny_sd_pipeline()


@pytest.fixture
def language_model_folder(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=len(byte_tokenizer()), hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@torch.no_grad()
def test_clip_options_survive_save_and_load(sd, tmp_path):
    clip = load_conditioner("clip", sd, clip_skip=1, max_chunks=1, pad_to_multiple_of=11)
    loaded = load_conditioner(clip.save_pretrained(tmp_path / "clip"), sd)
    assert (loaded.clip_skip, loaded.max_chunks, loaded.pad_to_multiple_of) == (1, 1, 11)
    assert_same_encoding(clip, loaded)
    assert not torch.equal(loaded.encode(PROMPTS).prompt_embeds[:, :11], load_conditioner("clip", sd).encode(PROMPTS).prompt_embeds[:, :11])


@torch.no_grad()
def test_long_clip_keeps_its_own_text_encoder(sd, tmp_path):
    own = tmp_path / "own-long-clip"
    encoder = stretch_text_model(sd.text_encoder)
    positions = text_embeddings(encoder).position_embedding.weight
    positions.add_(0.1 * torch.randn_like(positions))
    encoder.save_pretrained(own / "text_encoder")
    sd.tokenizer.save_pretrained(own / "tokenizer")
    long_clip = load_conditioner("long-clip", sd, text_encoder_path=own, pad_token="zero")
    folder = long_clip.save_pretrained(tmp_path / "saved")
    shutil.rmtree(own)  # the unit holds the encoder itself
    loaded = load_conditioner(folder, sd)
    assert loaded.pad_token == "zero" and loaded.has_own_text_encoder
    assert_same_encoding(long_clip, loaded)
    stretched = load_conditioner("long-clip", sd, pad_token="zero")
    assert not torch.equal(stretched.encode(PROMPTS).prompt_embeds, loaded.encode(PROMPTS).prompt_embeds)


@torch.no_grad()
def test_projected_keeps_inner_conditioner_projection_and_tau(sd, tmp_path):
    projected = load_conditioner("projected", sd, projection="clp", switch_off_timestep=500, clip_skip=1)
    torch.nn.init.normal_(projected.projection.linear.weight, std=0.2)
    loaded = load_conditioner(projected.save_pretrained(tmp_path / "projected"), sd)
    assert loaded.switch_off_timestep == 500 and loaded.conditioner.clip_skip == 1
    assert_same_encoding(projected, loaded)
    overridden = load_conditioner(tmp_path / "projected", sd, switch_off_timestep=900)
    assert overridden.switch_off_timestep == 900


@torch.no_grad()
def test_llm_adapter_records_its_language_model_and_options(sd, tmp_path, language_model_folder):
    torch.manual_seed(0)
    adapter = load_conditioner("llm-adapter", sd, language_model=language_model_folder, connector="new", num_latents=8,
                               num_blocks=1, flexible_length=True, max_length=40)
    folder = adapter.save_pretrained(tmp_path / "adapter")
    record = json.loads((folder / "conditioner_config.json").read_text())
    assert record["config"] == {"language_model": str(language_model_folder), "flexible_length": True, "max_length": 40}
    loaded = load_conditioner(folder, sd)
    assert_same_encoding(adapter, loaded)


@torch.no_grad()
def test_concat_saves_both_parts(sd, tmp_path):
    concat = load_conditioner("concat", sd, first="projected", first_options={"projection": "wiclp", "switch_off_timestep": 300},
                              second="clip", second_options={"clip_skip": 1})
    loaded = load_conditioner(concat.save_pretrained(tmp_path / "concat"), sd)
    assert loaded.first.switch_off_timestep == 300 and loaded.second.clip_skip == 1
    assert_same_encoding(concat, loaded)


def test_nothing_is_overwritten_and_nothing_non_finite_is_saved(sd, tmp_path):
    projected = load_conditioner("projected", sd, projection="wiclp")
    folder = projected.save_pretrained(tmp_path / "saved")
    with pytest.raises(FileExistsError, match="already exists"):
        projected.save_pretrained(folder)
    with torch.no_grad():
        projected.projection.conv.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite values in projection.conv.bias"):
        projected.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_folder_that_is_not_a_saved_conditioner(sd, tmp_path):
    with pytest.raises(ValueError) as error:
        load_conditioner(tmp_path, sd)
    assert "is not a saved conditioner (no conditioner_config.json)" in one_line(error)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_conditioner(tmp_path / "missing" / "conditioner", sd)
    (tmp_path / "conditioner_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_conditioner(tmp_path, sd)


@pytest.mark.parametrize("other_pipeline", ["sdxl", "sd2"])
def test_a_conditioner_saved_for_another_base(sd, tmp_path, other_pipeline):
    folder = load_conditioner("clip", sd).save_pretrained(tmp_path / "clip")
    other = tiny_sdxl_pipeline() if other_pipeline == "sdxl" else case("sd2-v-prediction-1024").build()
    with pytest.raises(ValueError) as error:
        load_conditioner(folder, other)
    message = one_line(error)
    assert "gives 32-wide embeddings with no pooled vector" in message and "saved for another base model or pipeline family" in message


def test_a_missing_language_model(sd, tmp_path, language_model_folder):
    torch.manual_seed(0)
    adapter = load_conditioner("llm-adapter", sd, language_model=language_model_folder, connector="new", num_blocks=1)
    folder = adapter.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(language_model_folder)
    with pytest.raises(ValueError) as error:
        load_conditioner(folder, sd)
    assert f"language model {str(language_model_folder)!r} could not be loaded" in one_line(error)
    assert "language_model=PATH" in one_line(error)


@pytest.mark.parametrize("name, needs", [("projected", "projection="), ("llm-adapter", "connector="), ("concat", "first=")])
def test_names_that_need_an_option_say_which(sd, name, needs):
    with pytest.raises(ValueError) as error:
        load_conditioner(name, sd)
    assert f"--opt {needs}" in one_line(error)


def test_an_entry_point_that_fails_to_import(tmp_path, monkeypatch):
    dist_info = tmp_path / "broken_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = no_such_module_for_condkit\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    with pytest.raises(ValueError) as error:
        rediscover()
    assert "entry point broken = 'no_such_module_for_condkit'" in one_line(error) and "ModuleNotFoundError" in one_line(error)
    monkeypatch.undo()
    rediscover()


def test_public_api():
    assert set(condkit.__all__) >= {
        "Conditioning", "Conditioner", "CLIPConditioner", "LongCLIPConditioner", "LLMAdapterConditioner",
        "ProjectedConditioner", "ConcatConditioner", "attach", "load_conditioner", "load_pipeline", "load_embedding",
        "generate", "train", "__version__",
    }  # fmt: skip
    for name in condkit.__all__:
        assert getattr(condkit, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        condkit.nope  # noqa: B018


def test_encode_keeps_no_graph_and_embed_does(sd):
    projected = load_conditioner("projected", sd, projection="clp")
    assert not projected.encode("a red cube").prompt_embeds.requires_grad
    assert text_embeddings(sd.text_encoder).token_embedding.weight.requires_grad
    assert projected.embed("a red cube").prompt_embeds.requires_grad
