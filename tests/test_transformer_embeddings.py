"""Textual inversion on SD3 (clip_l, clip_g, t5xxl) and Flux (clip_l, t5xxl): ComfyUI's single-file layout,
multi-vector tokens in every encoder, and the one-line refusals."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from condkit import load_conditioner, load_embedding
from condkit.cli import main
from condkit.conditioning.embedding_formats import LearnedEmbedding, detect_format, read_embedding, write_embedding
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline

LENGTH = 16


def embedding_file(path, **vectors):
    torch.manual_seed(7)
    safetensors.torch.save_file({key: torch.randn(2, width) for key, width in vectors.items()}, str(path))
    return path


@torch.no_grad()
def test_flux_token_in_clip_l_and_t5_matches_the_pipelines_own_expansion(tmp_path):
    pipe = tiny_flux_pipeline()
    path = embedding_file(tmp_path / "cat.safetensors", clip_l=32, t5xxl=96)
    assert detect_format(path) == "flux_single_file"
    assert load_embedding(pipe, path, token="<cat>") == ["<cat>", "<cat>_1"]
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    got = conditioner.encode(["a <cat> cube", "a red cube"])
    # FluxPipeline is a TextualInversionLoaderMixin: it expands "<cat>" to "<cat> <cat>_1" for both tokenizers itself
    embeds, pooled, _ = pipe.encode_prompt(["a <cat> cube", "a red cube"], max_sequence_length=LENGTH)
    assert torch.equal(got.prompt_embeds, embeds) and torch.equal(got.pooled_prompt_embeds, pooled)
    t5_ids = pipe.tokenizer_2.convert_tokens_to_ids(["<cat>", "<cat>_1"])
    t5_table = pipe.text_encoder_2.get_input_embeddings().weight
    assert torch.equal(t5_table[t5_ids], read_embedding(path).vectors[1])


@torch.no_grad()
def test_sd3_token_in_all_three_encoders(tmp_path):
    pipe = tiny_sd3_pipeline()
    path = embedding_file(tmp_path / "cat.safetensors", clip_l=32, clip_g=32, t5xxl=96)
    assert detect_format(path) == "sd3_single_file"
    load_embedding(pipe, path, token="<cat>")
    conditioner = load_conditioner("clip", pipe, max_sequence_length=LENGTH)
    got = conditioner.encode("a <cat> cube", "blurry")
    # StableDiffusion3Pipeline has no textual-inversion mixin: give it the expanded text
    expected = pipe.encode_prompt("a <cat> <cat>_1 cube", None, None, negative_prompt="blurry", max_sequence_length=LENGTH)
    for ours, theirs in zip([got.prompt_embeds, got.negative_prompt_embeds, got.pooled_prompt_embeds,
                             got.negative_pooled_prompt_embeds], expected):
        assert torch.equal(ours, theirs)
    plain = conditioner.encode("a red cube")
    assert not torch.equal(got.prompt_embeds[:, 77:], plain.prompt_embeds[:, 77:])  # T5 reads the token's vectors


def test_written_and_read_back_in_both_layouts(tmp_path):
    for format, widths in (("sd3_single_file", [32, 32, 96]), ("flux_single_file", [32, 96])):
        embedding = LearnedEmbedding("<x>", [torch.randn(3, width) for width in widths])
        (path,) = write_embedding(embedding, tmp_path / f"{format}.safetensors", format)
        back = read_embedding(path, token="<x>")
        assert detect_format(path) == format and all(torch.equal(a, b) for a, b in zip(back.vectors, embedding.vectors))


REFUSALS = [
    (tiny_flux_pipeline, {"clip_l": 32, "t5xxl": 4096},
     "is 4096 wide for text encoder 2, but that encoder's token embeddings are 96 wide"),
    (tiny_sd3_pipeline, {"clip_l": 32, "clip_g": 32},  # an SDXL file on SD3
     "has vectors for 2 text encoder(s), but the target has 3 (CLIPTextModelWithProjection, CLIPTextModelWithProjection, "
     "T5EncoderModel)"),
    (tiny_flux_pipeline, {"clip_l": 32, "clip_g": 32},
     "is 32 wide for text encoder 2, but that encoder's token embeddings are 96 wide"),
]


@pytest.mark.parametrize("build, vectors, message", REFUSALS)
def test_an_embedding_for_other_encoders_is_refused_in_one_line(tmp_path, build, vectors, message):
    path = embedding_file(tmp_path / "x.safetensors", **vectors)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_embedding(build(), path, token="<x>")


def test_cli_embedding_on_a_flux_folder(tmp_path, capsys):
    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    path = embedding_file(tmp_path / "cat.safetensors", clip_l=32, t5xxl=96)
    code = main(["generate", "--model", str(tmp_path / "flux"), "--embedding", f"<cat>={path}", "--prompt", "a <cat> cube",
                 "--steps", "1", "--height", "32", "--width", "32", "--device", "cpu", "--max-sequence-length", "16",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "00000_0.png").is_file()
