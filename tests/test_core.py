"""CoRe: context regularizers, the cross-attention probe, training through the shared loop, test-time optimisation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from condkit.conditioning.chunking import chunk_prompt
from condkit.conditioning.embedding_formats import LearnedEmbedding
from condkit.conditioning.prompt_syntax import parse_prompt
from condkit.training import core_test_time
from condkit.training.attention_probe import RecordingCrossAttentionProcessor, probe_cross_attention
from condkit.training.core import REGULARIZATION_TEMPLATES, CoRe
from condkit.training.core_regularizers import align_context
from condkit.training.core_templates import SHAPES_WORLD
from condkit.training.loop import TrainingConfig
from condkit.training.textual_inversion import TextualInversion
from training_helpers import clip, train_with_clip
from tiny_models import byte_tokenizer, tiny_sd_pipeline, tiny_sdxl_pipeline

# In the tiny byte-level tokenizer every character is a token, so "o" is a one-token category word.
ONE_TOKEN_CATEGORY = "o"



def squares(n: int = 4) -> list[tuple[Image.Image, str]]:
    return [(Image.new("RGB", (32, 32), (200, 20 * i, 20)), "unused") for i in range(n)]


def unet_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=generator), torch.randint(1000, (batch,), generator=generator)


def randomize_rows(method: TextualInversion, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in method.embeddings:
            table.new_rows.copy_(torch.randn(table.new_rows.shape, generator=generator))


def run_config(tmp_path, **changes) -> TrainingConfig:
    settings = dict(output_dir=tmp_path, max_train_steps=3, train_batch_size=2, learning_rate=1e-2,
                    show_progress=False, checkpointing_steps=10)
    return TrainingConfig(**{**settings, **changes})


def test_templates_are_about_a_hundred_plain_single_window_prompts():
    assert 95 <= len(REGULARIZATION_TEMPLATES) <= 110
    assert len(set(REGULARIZATION_TEMPLATES)) == len(REGULARIZATION_TEMPLATES)
    tokenizer = byte_tokenizer()
    for template in REGULARIZATION_TEMPLATES:
        assert template.count("{}") == 1, template
        runs = parse_prompt(template)
        assert len(runs) == 1 and runs[0].weight == 1.0 and runs[0].text == template, template  # no A1111 syntax
        # A byte-level tokenizer is the worst case: one token per character.
        assert chunk_prompt(tokenizer, template.format("<placeholder>")).n_chunks == 1, template
    assert "a {} to the left of a blue square" in SHAPES_WORLD and set(SHAPES_WORLD) <= set(REGULARIZATION_TEMPLATES)


def test_alignment_maps_context_tokens_across_concept_lengths():
    bos, eos, pad = 100, 101, 0
    # "a <c> <c>_1 in jungle" against "a teddy bear in jungle": 2 concept vectors, 3 category tokens.
    placeholder_ids = [bos, 1, 50, 51, 2, 3, eos, pad, pad]
    category_ids = [bos, 1, 7, 8, 9, 2, 3, eos, pad]
    alignment = align_context(placeholder_ids, category_ids, [50, 51], [7, 8, 9], eos)
    assert alignment.placeholder_positions.tolist() == [0, 1, 4, 5, 6]
    assert alignment.category_positions.tolist() == [0, 1, 5, 6, 7]
    assert [placeholder_ids[i] for i in alignment.placeholder_positions] == [category_ids[i] for i in alignment.category_positions]
    # Two occurrences, each replaced by the category word.
    twice = align_context([bos, 50, 51, 4, 50, 51, eos], [bos, 7, 4, 7, eos], [50, 51], [7], eos)
    assert twice.placeholder_positions.tolist() == [0, 3, 6] and twice.category_positions.tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="none of the placeholder's tokens"):
        align_context([bos, 1, 2, eos], [bos, 1, 2, eos], [50], [7], eos)
    with pytest.raises(ValueError, match="merges the word with its neighbours"):
        align_context([bos, 1, 50, 2, eos], [bos, 1, 78, eos], [50], [7], eos)


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_regularizers_vanish_when_the_rows_are_the_category_word(make_pipe):
    pipe = make_pipe()
    method = CoRe(clip(pipe), "<c>", ONE_TOKEN_CATEGORY, num_vectors=1)
    latents, timesteps = unet_inputs()
    for template in ("a {} in the jungle", "a {} to the left of a blue square", "{}"):
        losses = method.regularization_losses(pipe.unet, template, latents, timesteps, (32, 32))
        assert losses.embedding.item() < 1e-6, template
        assert losses.attention.item() == 0.0, template
    randomize_rows(method)
    for template in ("a {} in the jungle", "a {} to the left of a blue square"):
        losses = method.regularization_losses(pipe.unet, template, latents, timesteps, (32, 32))
        assert losses.embedding.item() > 1e-3, template
        assert losses.attention.item() > 0.0, template


def test_multi_vector_placeholder_and_multi_token_category_are_compared_on_context_only():
    pipe = tiny_sd_pipeline()
    method = CoRe(clip(pipe), "<c>", "red", num_vectors=3)
    latents, timesteps = unet_inputs()
    losses = method.regularization_losses(pipe.unet, "a {} on a yellow background", latents, timesteps, (32, 32))
    assert torch.isfinite(losses.embedding) and losses.embedding.item() > 0
    assert torch.isfinite(losses.attention) and losses.attention.item() > 0
    losses.weighted(1.0, 1.0).backward()
    assert all(table.new_rows.grad is not None and table.new_rows.grad.abs().sum() > 0 for table in method.embeddings)


def test_probe_covers_every_cross_attention_layer_and_restores_the_processors():
    unet = tiny_sd_pipeline().unet
    originals = dict(unet.attn_processors)
    cross = sorted(name for name in originals if name.endswith("attn2.processor"))
    assert len(cross) == 4
    latents, timesteps = unet_inputs()
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    reference = unet(latents, timesteps, encoder_hidden_states=context).sample
    with probe_cross_attention(unet) as probe:
        installed = unet.attn_processors
        assert sorted(n for n, p in installed.items() if isinstance(p, RecordingCrossAttentionProcessor)) == cross
        assert all(installed[n] is p for n, p in originals.items() if n not in cross)
        output = unet(latents, timesteps, encoder_hidden_states=context).sample
        assert sorted(name for name, _ in probe.records) == cross  # each layer reported once
        per_token = probe.take()
        assert probe.records == []
    assert per_token.shape == (len(cross), 2, 77)
    assert torch.allclose(per_token.sum(dim=-1), torch.ones(len(cross), 2), atol=1e-5)  # softmax rows, averaged
    assert torch.allclose(output, reference, atol=1e-5)  # the recording processor computes the same attention
    assert all(unet.attn_processors[name] is processor for name, processor in originals.items())

    with pytest.raises(RuntimeError, match="boom"):
        with probe_cross_attention(unet):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[name] is processor for name, processor in originals.items())


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_core_trains_only_the_new_rows(make_pipe, tmp_path):
    pipe = make_pipe()
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    encoders_before = [{n: p.clone() for n, p in encoder.named_parameters()} for encoder in encoders]
    unet_before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    processors_before = dict(pipe.unet.attn_processors)
    method = CoRe(clip(pipe), "<c>", "red", num_vectors=2, lambda_embedding=1.0, lambda_attention=1.0)
    start = method.learned_vectors()
    result = train_with_clip(pipe, method, squares(), run_config(tmp_path))
    assert len(result.losses) == 3
    assert all(not torch.equal(learned, initial) for learned, initial in zip(method.learned_vectors(), start))
    for encoder, before in zip(encoders, encoders_before):
        for name, parameter in encoder.named_parameters():
            if "new_rows" not in name:  # the original table now sits at token_embedding.base
                assert torch.equal(parameter, before[name.replace(".base.", ".")]), name
    assert all(torch.equal(p, unet_before[n]) for n, p in pipe.unet.named_parameters())
    assert all(pipe.unet.attn_processors[name] is processor for name, processor in processors_before.items())


def test_core_adds_its_regularizers_to_the_textual_inversion_loss(tmp_path):
    def curve(make_method, name):
        pipe = tiny_sd_pipeline()
        return train_with_clip(pipe, make_method(clip(pipe)), squares(), run_config(tmp_path / name)).losses

    plain = curve(lambda conditioner: TextualInversion(conditioner, "<c>", "red", num_vectors=2), "plain")
    silent = curve(lambda conditioner: CoRe(conditioner, "<c>", "red", num_vectors=2, lambda_embedding=0.0, lambda_attention=0.0), "silent")
    regularized = curve(lambda conditioner: CoRe(conditioner, "<c>", "red", num_vectors=2, lambda_embedding=1.0, lambda_attention=1.0), "core")
    assert silent == plain  # with both weights 0 CoRe is textual inversion, bit for bit
    # Step 1 starts from the same rows and draws the same noise, so it differs only by the regularizers,
    # which are positive here: two averaged vectors of "red" do not act like its three tokens.
    assert regularized[0] > plain[0]


@pytest.mark.parametrize("which", ["embedding", "attention"])
def test_each_regularizer_lowers_itself_when_trained_alone(which):
    pipe = tiny_sd_pipeline()
    method = CoRe(clip(pipe), "<c>", ONE_TOKEN_CATEGORY, num_vectors=1)
    randomize_rows(method)
    latents, timesteps = unet_inputs()
    template = "a {} in the snow"
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=5e-2)
    values = []
    for _ in range(12):
        losses = method.regularization_losses(pipe.unet, template, latents, timesteps, (32, 32))
        value = getattr(losses, which)
        values.append(value.item())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert values[-1] < 0.5 * values[0], values


def test_norm_rescaling_holds_the_norm_inside_the_window(tmp_path):
    pipe = tiny_sd_pipeline()
    method = CoRe(clip(pipe), "<c>", "red", num_vectors=2, norm_window=(2, 4), lambda_attention=0.0)
    norms: dict[int, torch.Tensor] = {}

    def record_norms(step, trained):
        norms[step] = trained.learned_vectors()[0].norm(dim=-1)

    config = run_config(tmp_path, max_train_steps=6, learning_rate=0.2, validation_steps=1, adam_weight_decay=0.0)
    train_with_clip(pipe, method, squares(), config, validate=record_norms)
    assert sorted(norms) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4):
        assert torch.allclose(norms[step], norms[2], rtol=1e-6), (step, norms)
    assert not torch.allclose(norms[2], norms[1], rtol=1e-4)
    assert not torch.allclose(norms[5], norms[4], rtol=1e-4)  # free again after the window
    assert torch.allclose(method.reference_norms[0], norms[2])


def test_resume_inside_the_norm_window_gives_the_identical_curve(tmp_path):
    def run(output_dir, max_train_steps, resume):
        pipe = tiny_sd_pipeline()
        method = CoRe(clip(pipe), "<c>", "red", num_vectors=2, seed=5, norm_window=(1, 3), lambda_embedding=1.0)
        config = run_config(output_dir, max_train_steps=max_train_steps, checkpointing_steps=2, learning_rate=0.1,
                            resume_from_checkpoint="latest" if resume else None)
        return train_with_clip(pipe, method, squares(), config), method

    whole, whole_method = run(tmp_path / "whole", 4, resume=False)
    first, _ = run(tmp_path / "split", 2, resume=False)
    rest, rest_method = run(tmp_path / "split", 4, resume=True)
    assert rest.first_step == 2
    assert first.losses + rest.losses == whole.losses
    assert torch.equal(rest_method.learned_vectors()[0], whole_method.learned_vectors()[0])
    assert torch.equal(rest_method.reference_norms, whole_method.reference_norms)


def test_regularization_templates_are_drawn_from_seed_and_step():
    method = CoRe(clip(tiny_sd_pipeline()), "<c>", "red", seed=3)
    draws = [method.regularization_template(step) for step in range(20)]
    assert draws == [method.regularization_template(step) for step in range(20)]
    assert len(set(draws)) > 5 and set(draws) <= set(REGULARIZATION_TEMPLATES)
    other_seed = CoRe(clip(tiny_sd_pipeline()), "<c>", "red", seed=4)
    assert draws != [other_seed.regularization_template(step) for step in range(20)]


def test_test_time_optimisation_lowers_the_loss_and_leaves_the_method_alone():
    pipe = tiny_sd_pipeline()
    method = CoRe(clip(pipe), "<c>", "red", num_vectors=2)
    randomize_rows(method)
    before = method.learned_vectors()
    tables = [encoder.get_input_embeddings() for encoder in clip(pipe).text_encoders]
    states_before = clip(pipe).embed(["a <c> on the beach"]).prompt_embeds

    adjusted = core_test_time.test_time_optimize(method, pipe, "a <c> on the beach", steps=10, lr=5e-3)
    assert adjusted.final_loss < adjusted.initial_loss
    assert adjusted.embedding.token == "<c>" and adjusted.embedding.vectors[0].shape == (2, 32)
    assert not torch.equal(adjusted.embedding.vectors[0], before[0])
    assert torch.equal(method.learned_vectors()[0], before[0])
    assert [encoder.get_input_embeddings() for encoder in clip(pipe).text_encoders] == tables
    assert torch.equal(clip(pipe).embed(["a <c> on the beach"]).prompt_embeds, states_before)
    assert all(p.grad is None for p in pipe.unet.parameters())

    again = core_test_time.test_time_optimize(method, pipe, "a <c> on the beach", steps=10, lr=5e-3, write_back=True)
    assert torch.equal(again.embedding.vectors[0], adjusted.embedding.vectors[0])  # seeded: the same result
    assert torch.equal(method.learned_vectors()[0], adjusted.embedding.vectors[0])


def test_test_time_optimisation_of_a_loaded_embedding():
    pipe = tiny_sdxl_pipeline()
    generator = torch.Generator().manual_seed(0)
    embedding = LearnedEmbedding("<e>", [torch.randn(1, 32, generator=generator), torch.randn(1, 32, generator=generator)])
    original = [vectors.clone() for vectors in embedding.vectors]
    with pytest.raises(ValueError, match="category is required for embedding '<e>'"):
        core_test_time.test_time_optimize(embedding, pipe, "a <e> in the snow")
    adjusted = core_test_time.test_time_optimize(embedding, pipe, "a <e> in the snow", steps=5, lr=5e-3, category="o")
    assert adjusted.final_loss < adjusted.initial_loss
    assert all(torch.equal(a, b) for a, b in zip(embedding.vectors, original))
    assert [v.shape for v in adjusted.embedding.vectors] == [(1, 32), (1, 32)]


def test_refusals_name_the_bad_value():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match=r"norm_window must be .* got \(5, 2\)"):
        CoRe(clip(pipe), "<a>", "red", norm_window=(5, 2))
    with pytest.raises(ValueError, match="lambda_attention must be a non-negative number, got -1.0"):
        CoRe(clip(pipe), "<a>", "red", lambda_attention=-1.0)
    with pytest.raises(ValueError, match="'a photo' has no '{}' slot"):
        CoRe(clip(pipe), "<b>", "red", regularization_templates=["a photo"])
    method = CoRe(clip(pipe), "<c>", "red")
    with pytest.raises(ValueError, match="does not contain the placeholder '<c>'"):
        core_test_time.test_time_optimize(method, pipe, "a photo of a dog")
    with pytest.raises(ValueError, match="needs 2 windows"):
        method.regularization_losses(pipe.unet, "{} " + "x " * 80, *unet_inputs(), (32, 32))
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        core_test_time.test_time_optimize(method, pipe, "a <c>", steps=0)
    assert core_test_time.prompt_as_template("a <c> <c>_1 and a <c>", "<c>") == "a {} and a {}"
