"""The recipe's fixes, each on a tiny budget: hard negatives that really contradict the image (NegCLIP
swaps), caption dropout for classifier-free guidance, small-object weighting in the VAE loss, and a
UNet that grows without breaking the shipped folder's 40 MB."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from condkit.shapes_world import MODEL_DIR
from condkit.shapes_world import train_clip
from condkit.shapes_world.captions import STYLES, describe, parse_caption
from condkit.shapes_world.dataset import objects_for_style, world_words
from condkit.shapes_world.hard_negatives import changes_meaning, hard_negatives, swap_shapes
from condkit.shapes_world.recipe import SCALES
from condkit.shapes_world.scenes import Scene, SceneObject, render, sample_scene
from condkit.shapes_world.scorer import score
from condkit.shapes_world.tokenizer import build_tokenizer
from condkit.shapes_world.train_decoder import DecoderStage
from condkit.shapes_world.train_unet import UnetStage, build_unet
from condkit.shapes_world.train_vae import build_vae, object_areas, outline_weighted_error, small_object_weights


def captioned_scenes(count: int):
    for index in range(count):
        rng = np.random.default_rng([index, 31])
        style = STYLES[index % len(STYLES)]
        scene = sample_scene(rng, objects_for_style(style, rng))
        yield scene, describe(scene, style, rng).text


def test_every_hard_negative_is_a_swap_the_image_contradicts():
    rng = random.Random(0)
    kinds = Counter()
    for scene, caption in captioned_scenes(45):
        image = render(scene)
        negatives = hard_negatives(caption, rng, 4)
        assert negatives and len(set(negatives)) == len(negatives), caption
        # The scorer reads the true caption off the ground-truth render, and none of its negatives.
        assert score(image, parse_caption(caption))["all_correct"] == 1.0
        for negative in negatives:
            words, negative_words = caption.split(), negative.split()
            changed = sum(a != b for a, b in zip(words, negative_words))
            assert len(words) == len(negative_words) and changed >= 1
            kinds["swap" if sorted(words) == sorted(negative_words) else "change"] += 1
            assert score(image, parse_caption(negative))["all_correct"] == 0.0, (caption, negative)
    assert kinds["swap"] >= 15 and kinds["change"] >= 15, kinds


def test_swaps_that_leave_the_scene_the_same_are_not_negatives():
    rng = random.Random(1)
    same_scene = "a red circle and a blue circle"
    assert not changes_meaning(same_scene, "a blue circle and a red circle")
    assert all("blue circle and a red circle" not in n for n in hard_negatives(same_scene, rng, 4))
    assert changes_meaning("a red circle is to the left of a blue circle", "a blue circle is to the left of a red circle")
    assert swap_shapes("a red circle is above two blue squares", rng) == "a red square is above two blue circles"
    assert swap_shapes("a red circle", rng) is None


def test_clip_stage_adds_several_negatives_per_image(monkeypatch, tmp_path):
    tokenizer = build_tokenizer(world_words(), tmp_path / "tokenizer")
    seen = {}

    def record(model, tokenizer, pixels, captions, negatives):
        seen.update(captions=captions, negatives=negatives)
        return torch.zeros(())

    monkeypatch.setattr(train_clip, "contrastive_loss", record)
    scenes = list(captioned_scenes(12))
    items = [{"caption": caption, "image": torch.zeros(3, 64, 64)} for _, caption in scenes]
    config = train_clip.clip_config(tokenizer, SCALES["tiny"].clip, 64)
    stage = train_clip.ClipStage(train_clip.CLIPModel(config), tokenizer, negatives_per_image=3)
    torch.manual_seed(0)
    stage(items)
    assert stage.settings() == {"negatives_per_image": 3}
    assert len(seen["negatives"]) > 2 * len(items)
    for negative in seen["negatives"]:
        assert any(len(negative.split()) == len(c.split()) and changes_meaning(c, negative) for c in seen["captions"])


def test_caption_dropout_gives_guidance_an_unconditional():
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=77))  # fmt: skip
    unet = build_unet(SCALES["tiny"].unet, cross_attention_dim=32, latent_size=8)
    stage = UnetStage(unet, tokenizer=None, text_encoder=text_encoder, ema_decay=0.9, caption_dropout=SCALES["full"].unet.caption_dropout)
    torch.manual_seed(0)
    captions = [f"caption {i}" for i in range(2000)]
    prompts = stage.prompts_for(SimpleNamespace(captions=captions))  # dropout reads only the captions
    dropped = sum(p == "" for p in prompts) / len(prompts)
    assert 0.08 <= dropped <= 0.12 and all(p in ("", c) for p, c in zip(prompts, captions))


def test_small_objects_weigh_more_in_the_vae_loss():
    scene = Scene((SceneObject("cross", "red", "small", 0.25, 0.25), SceneObject("square", "blue", "large", 0.7, 0.7)), "white")
    image = torch.from_numpy(np.asarray(render(scene), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    areas = object_areas(image)
    assert areas[0, 0, 2, 2] == 0  # background
    assert 80 <= areas[0, 0, 16, 16] <= 130 and 650 <= areas[0, 0, 45, 45] <= 760  # cross ≈ 93 px, square 676 px
    weights = small_object_weights(image, 4.0)
    assert weights[0, 0, 2, 2] == 1.0 and weights[0, 0, 16, 16] > 2 * weights[0, 0, 45, 45] > 2.0
    # Losing the small cross (painting it white) costs more with the weighting than without it.
    lost = image.clone()
    lost[..., 8:25, 8:25] = 1.0
    assert outline_weighted_error(lost, image, 4.0) > 1.5 * outline_weighted_error(lost, image, 0.0)


def test_the_decoder_stage_weighs_small_objects_as_asked():
    scene = Scene((SceneObject("cross", "red", "small", 0.25, 0.25), SceneObject("square", "blue", "large", 0.7, 0.7)), "white")
    items = [{"image": torch.from_numpy(np.asarray(render(scene), dtype=np.float32)).permute(2, 0, 1) / 255}]
    vae = build_vae(SCALES["tiny"].vae, resolution=64)
    images = items[0]["image"][None] * 2 - 1
    losses = {}
    for weight in (0.0, 16.0):
        stage = DecoderStage(vae, small_object_weight=weight)
        torch.manual_seed(0)
        losses[weight] = stage(items)
        torch.manual_seed(0)
        with torch.no_grad():
            expected = outline_weighted_error(vae.decode(vae.encode(images).latent_dist.sample()).sample, images, weight)
        assert torch.allclose(losses[weight], expected) and stage.settings() == {"small_object_weight": weight}
    assert not torch.allclose(losses[0.0], losses[16.0])
    assert {name for name, p in vae.named_parameters() if p.requires_grad} == {
        name for name, _ in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))
    }

def test_full_recipe_grows_the_unet_within_the_folder_budget():
    full = SCALES["full"]
    assert full.clip.negatives_per_image >= 2 and full.vae.small_object_weight > 0
    unet = build_unet(full.unet, cross_attention_dim=full.clip.width, latent_size=16)
    parameters = sum(p.numel() for p in unet.parameters())
    shipped_unet = sum(p.stat().st_size for p in (MODEL_DIR / "unet").rglob("*") if p.is_file())
    assert parameters * 4 > 1.1 * shipped_unet and unet.config.layers_per_block == full.unet.layers_per_block
    everything_else = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file()) - shipped_unet
    assert everything_else + parameters * 4 + 100_000 <= 40 * 2**20
