"""Long-CLIP fine-tuning on a tiny CLIPModel: primary components, frozen first rows, a falling loss, exact resume."""

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from condkit.conditioning.long_clip import LongCLIPConditioner, position_count
from condkit.shapes_world.dataset import long_caption_pairs
from condkit.training.long_clip import (
    LongCLIPMethod,
    primary_components,
    save_long_clip_text_encoder,
    train_long_clip,
)
from condkit.training.loop import TrainingConfig, train
from tiny_models import byte_tokenizer, tiny_sd_pipeline

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "white": (1.0, 1.0, 1.0)}
FILLER = "this picture was drawn for a study of how text encoders read very long descriptions of images"


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=16,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8,
        projection_dim=16,
    )  # fmt: skip
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    return CLIPModel(config), tokenizer


def colour_pairs(count=32):
    """Flat colour images; the long caption names the colour only after ~80 tokens of filler."""
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for index in range(count):
        name = list(COLOURS)[index % len(COLOURS)]
        image = torch.tensor(COLOURS[name])[:, None, None] * 0.8 + 0.2 * torch.randn(3, 16, 16, generator=generator)
        pairs.append({"image": image, "long_caption": f"{FILLER}, and it is {name}", "short_caption": name})
    return pairs


def test_primary_components_keep_the_leading_directions():
    generator = torch.Generator().manual_seed(0)
    major, minor = torch.randn(40, 1, generator=generator) * 10, torch.randn(40, 1, generator=generator) * 0.1
    major, minor = major - major.mean(), minor + 3.0
    minor = minor - (minor * major).sum() / (major * major).sum() * major  # uncorrelated with major
    axes = torch.linalg.qr(torch.randn(6, 2, generator=generator)).Q.T
    mean = torch.randn(1, 6, generator=generator)
    features = mean + major * axes[0] + minor * axes[1]
    reduced = primary_components(features, 1)
    torch.testing.assert_close(reduced, mean + major * axes[0] + minor.mean() * axes[1], atol=1e-4, rtol=0)
    # With as many components as the centred batch has rank, nothing changes (Long-CLIP issue #68).
    torch.testing.assert_close(primary_components(features, 2), features, atol=1e-4, rtol=0)


def test_primary_components_pass_gradients_to_the_features():
    features = torch.randn(10, 4, requires_grad=True)
    primary_components(features, 2).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_batches_too_small_for_the_components_are_refused(tmp_path):
    method = LongCLIPMethod(*tiny_clip(), components=32)
    config = TrainingConfig(tmp_path / "run", max_train_steps=1, train_batch_size=32, show_progress=False)
    with pytest.raises(ValueError, match="batch size 32 with components 32.*expected >= 34"):
        train_long_clip(method, colour_pairs(40), config)
    assert not (tmp_path / "run").exists()


def test_the_denoising_entry_point_refuses_it():
    with pytest.raises(TypeError, match="computes its own loss; run it with train_with_own_loss"):
        train(LongCLIPMethod(*tiny_clip()), None, None, None, [], TrainingConfig("unused", max_train_steps=1))


def run(steps, folder, pairs=16, resume=False, checkpointing_steps=100):
    model, tokenizer = tiny_clip()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    method = LongCLIPMethod(model, tokenizer, components=2)
    config = TrainingConfig(
        folder, max_train_steps=steps, train_batch_size=8, learning_rate=1e-3, show_progress=False,
        checkpointing_steps=checkpointing_steps, resume_from_checkpoint="latest" if resume else None,
    )  # fmt: skip
    return original, method, train_long_clip(method, colour_pairs(pairs), config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run(steps=12, folder=tmp_path_factory.mktemp("long-clip"))


def test_text_tower_is_stretched_with_the_first_rows_frozen(trained):
    original, method, _ = trained
    model = method.model
    assert position_count(model.text_model) == 248 and model.config.text_config.max_position_embeddings == 248
    assert method.tokenizer.model_max_length == 248
    table = model.text_model.embeddings.position_embedding.weight
    assert torch.equal(table[:20], original["text_model.embeddings.position_embedding.weight"][:20])
    assert not torch.allclose(table[20:77], original["text_model.embeddings.position_embedding.weight"][20:77])
    assert not torch.equal(model.text_projection.weight, original["text_projection.weight"])
    vision = {name: tensor for name, tensor in model.state_dict().items() if name.startswith(("vision_model.", "visual_projection."))}
    assert all(torch.equal(tensor, original[name]) for name, tensor in vision.items())


def test_loss_falls_and_a_resumed_run_continues_the_same_curve(trained, tmp_path):
    losses = trained[2].losses
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    first = run(steps=5, folder=tmp_path, checkpointing_steps=5)[2]
    assert first.losses == losses[:5]
    resumed = run(steps=12, folder=tmp_path, resume=True)[2]
    assert resumed.first_step == 5 and resumed.losses == losses[5:]


@torch.no_grad()
def test_saved_text_encoder_plugs_into_the_conditioner(trained, tmp_path):
    result = trained[1]
    folder = save_long_clip_text_encoder(result.model, result.tokenizer, tmp_path / "long-clip")
    conditioner = LongCLIPConditioner.from_pipeline(tiny_sd_pipeline(), folder)
    prompt = f"{FILLER}, and it is red"
    ids = result.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
    expected = result.model.text_model(input_ids=ids).last_hidden_state
    embeds = conditioner.encode(prompt).prompt_embeds  # the window's states, cut at a multiple of 77
    assert embeds.shape[1] == 154 and len(result.tokenizer(prompt).input_ids) > 77
    torch.testing.assert_close(embeds, expected[:, :154])


def test_long_caption_pairs_have_a_long_and_a_short_caption():
    pairs = long_caption_pairs(2, resolution=32)
    assert [sorted(pair) for pair in pairs] == [["image", "long_caption", "short_caption"]] * 2
    for pair in pairs:
        assert pair["image"].shape == (3, 32, 32) and -1 <= pair["image"].min() <= pair["image"].max() <= 1
        assert len(pair["long_caption"]) > len(pair["short_caption"]) > 0
