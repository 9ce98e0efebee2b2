"""Textual inversion trains only the new rows, for SD and SDXL, through the shared loop."""

import pytest
import torch
from PIL import Image

from condkit.training.loop import TrainingConfig
from condkit.training.textual_inversion import NewTokenEmbedding, TextualInversion, placeholder_tokens
from training_helpers import clip, train_with_clip
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline


def red_squares(n=4):
    return [(Image.new("RGB", (32, 32), (200, 20, 20)), "unused") for _ in range(n)]


def test_new_token_embedding_matches_a_resized_table():
    base = torch.nn.Embedding(10, 4)
    rows = torch.randn(2, 4)
    table = NewTokenEmbedding(base, rows)
    ids = torch.tensor([[0, 9, 10, 11]])
    expected = torch.cat([base.weight, rows])[ids]
    assert torch.equal(table(ids), expected)
    assert table.num_embeddings == 12 and torch.equal(table.weight, torch.cat([base.weight, rows]))


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_only_new_rows_train(make_pipe, tmp_path):
    pipe = make_pipe()
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    frozen_before = [{n: p.clone() for n, p in e.named_parameters()} for e in encoders]
    unet_before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    method = TextualInversion(clip(pipe), "<c>", "red", num_vectors=2)
    start = method.learned_vectors()
    assert sum(p.numel() for p in method.trainable_parameters()) == 2 * sum(e.config.hidden_size for e in encoders)
    config = TrainingConfig(output_dir=tmp_path, max_train_steps=3, train_batch_size=2, learning_rate=1e-2,
                            show_progress=False, checkpointing_steps=10)
    result = train_with_clip(pipe, method, red_squares(), config)
    assert len(result.losses) == 3
    for learned, initial in zip(method.learned_vectors(), start):
        assert not torch.equal(learned, initial)
    for encoder, before in zip(encoders, frozen_before):
        for name, parameter in encoder.named_parameters():
            if "new_rows" not in name:  # the original table now sits at token_embedding.base
                assert torch.equal(parameter, before[name.replace(".base.", ".")]), name
    assert all(torch.equal(p, unet_before[n]) for n, p in pipe.unet.named_parameters())


def test_placeholder_expansion_and_refusals():
    assert placeholder_tokens("<c>", 3) == ["<c>", "<c>_1", "<c>_2"]
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="placeholder token 'a' is already in the tokenizer's vocabulary"):
        TextualInversion(clip(pipe), "a", "red")
    with pytest.raises(ValueError, match="initializer word '  ' is unknown"):
        TextualInversion(clip(pipe), "<new>", "  ")
    with pytest.raises(ValueError, match="unknown template set 'nope'"):
        TextualInversion(clip(pipe), "<new>", "red", templates="nope")


def test_template_draws_are_reproducible(tmp_path):
    from condkit.training.method import TrainingBatch

    method = TextualInversion(clip(tiny_sd_pipeline()), "<c>", "red", num_vectors=2, seed=3)
    batch = TrainingBatch(indices=torch.tensor([0, 1, 2]), captions=["", "", ""], latents=None, noise=None, step=5, image_size=(32, 32))
    prompts = method.prompts_for(batch)
    assert prompts == method.prompts_for(batch)
    assert all("<c> <c>_1" in prompt for prompt in prompts)
