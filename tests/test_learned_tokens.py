"""The clip-embeddings unit (the family's CLIP conditioner plus learned tokens) on SD, SDXL, SD3 and Flux.

With a token it encodes exactly as the pipeline's "clip" conditioner after load_embedding; it saves each token in
the family's file format with its name in tokens.json, and loads back, with that name, on a fresh pipeline or on
the one it came from, but not over a token that holds other vectors."""

from __future__ import annotations

import json

import pytest
import torch

from condkit import load_conditioner, load_embedding
from condkit.conditioning.embedding_formats import LearnedEmbedding, detect_format
from condkit.conditioning.embeddings import text_encoder_pairs
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline

FAMILIES = {  # the tiny pipeline, the unit's class, the format its token files are written in
    "sd": (tiny_sd_pipeline, "EmbeddingsConditioner", "diffusers"),
    "sdxl": (tiny_sdxl_pipeline, "EmbeddingsConditioner", "sdxl_single_file"),
    "sd3": (tiny_sd3_pipeline, "SD3EmbeddingsConditioner", "sd3_single_file"),
    "flux": (tiny_flux_pipeline, "FluxEmbeddingsConditioner", "flux_single_file"),
}
PROMPTS, NEGATIVES = ["a <cat> cube", "a red ball"], ["blurry", ""]


def cat_embedding(pipe, seed: int = 7) -> LearnedEmbedding:
    """A two-vector token "<cat>" with random rows for each of the pipeline's text encoders."""
    generator = torch.Generator().manual_seed(seed)
    _, encoders = text_encoder_pairs(pipe)
    return LearnedEmbedding("<cat>", [torch.randn(2, encoder.get_input_embeddings().weight.shape[1], generator=generator)
                                      for encoder in encoders])


def assert_same(got, expected) -> None:
    assert got.tensors().keys() == expected.tensors().keys()
    for key, tensor in expected.tensors().items():
        assert torch.equal(got.tensors()[key], tensor), key


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_unit_encodes_its_token_and_loads_back_with_its_name(family, tmp_path):
    build, class_name, file_format = FAMILIES[family]
    pipe = build()
    unit = load_conditioner("clip-embeddings", pipe, embeddings=[cat_embedding(pipe)])
    assert type(unit).__name__ == class_name and unit.registered_name == "clip-embeddings"

    reference = build()
    load_embedding(reference, cat_embedding(reference))
    expected = load_conditioner("clip", reference).encode(PROMPTS, NEGATIVES)
    assert_same(unit.encode(PROMPTS, NEGATIVES), expected)
    other = build()
    load_embedding(other, cat_embedding(other, seed=8))
    assert not torch.equal(load_conditioner("clip", other).encode(PROMPTS, NEGATIVES).prompt_embeds[0],
                           expected.prompt_embeds[0])  # the token's vectors reach the output

    folder = unit.save_pretrained(tmp_path / "unit")
    assert detect_format(folder / "embeddings" / "00.safetensors") == file_format
    assert json.loads((folder / "embeddings" / "tokens.json").read_text()) == {"00.safetensors": "<cat>"}
    loaded = load_conditioner(folder, build())
    assert type(loaded) is type(unit) and loaded.config == unit.config and [e.token for e in loaded.embeddings] == ["<cat>"]
    assert_same(loaded.encode(PROMPTS, NEGATIVES), expected)
    assert_same(load_conditioner(folder, pipe).encode(PROMPTS, NEGATIVES), expected)  # already holds these vectors
    with pytest.raises(ValueError, match="token '<cat>' already exists in tokenizer 1"):
        load_conditioner(folder, other)


@torch.no_grad()
def test_a_folder_saved_without_tokens_json_reads_the_names_its_files_store(tmp_path):
    pipe = tiny_sd_pipeline()
    folder = load_conditioner("clip-embeddings", pipe, embeddings=[cat_embedding(pipe)]).save_pretrained(tmp_path / "unit")
    (folder / "embeddings" / "tokens.json").unlink()  # as units were written before tokens.json
    assert [e.token for e in load_conditioner(folder, tiny_sd_pipeline()).embeddings] == ["<cat>"]
