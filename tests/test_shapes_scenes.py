"""Shapes world data side: vocabulary, scene sampling, rendering, captions and their specs, dataset, prompt sets."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from PIL import Image

from condkit.shapes_world.captions import (
    POSITION_ASSERT_RADIUS,
    RELATION_ASSERT_MARGIN,
    STYLES,
    TOKEN_PATTERN,
    Caption,
    Spec,
    approx_clip_token_count,
    describe,
    parse_caption,
    position_of,
    relation_holds,
    scene_for_spec,
)
from condkit.shapes_world.dataset import ShapesDataset, world_words
from condkit.shapes_world.prompt_sets import (
    PROMPT_SETS,
    build_prompt_set,
    describes_object_past_window,
    load_prompt_set,
)
from condkit.shapes_world.scenes import (
    EDGE_MARGIN,
    HELD_OUT,
    MIN_GAP,
    Scene,
    SceneObject,
    boxes_are_apart,
    radius_fraction,
    render,
    sample_scene,
)
from condkit.shapes_world.vocabulary import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES


def spec_is_true_of(spec: Spec, scene: Scene) -> bool:
    """Whether some one-to-one choice of scene objects makes every assertion of the spec true."""
    if spec.background is not None and spec.background != scene.background:
        return False
    if spec.count is not None and spec.count != len(scene.objects):
        return False
    for chosen in itertools.permutations(scene.objects, len(spec.objects)):
        attributes_hold = all(
            (req.shape is None or req.shape == obj.shape)
            and (req.colour is None or req.colour == obj.colour)
            and (req.size is None or req.size == obj.size)
            and (req.position is None or position_of(obj.x, obj.y) == req.position)
            for req, obj in zip(spec.objects, chosen)
        )
        relations_hold = all(
            relation_holds(rel, (chosen[i].x, chosen[i].y), (chosen[j].x, chosen[j].y), RELATION_ASSERT_MARGIN)
            for i, rel, j in spec.relations
        )
        if attributes_hold and relations_hold:
            return True
    return False


# --- vocabulary -----------------------------------------------------------------------------------


def test_vocabulary_is_large_enough_and_well_separated():
    assert len(SHAPES) >= 5 and len(COLOURS) >= 8
    assert {"white", "gray", "black", "yellow"} <= set(BACKGROUNDS)
    assert list(SIZES) == ["small", "medium", "large"] and SIZES["small"] < SIZES["medium"] < SIZES["large"]
    assert set(POSITIONS) == {"left", "right", "top", "bottom", "centre"}
    assert RELATIONS == ("to the left of", "to the right of", "above", "below")
    palette = np.array(list(COLOURS.values()), dtype=float)
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)]
    assert min(distances) > 80


def test_held_out_pairs_leave_every_colour_and_shape_in_training():
    assert 6 <= len(HELD_OUT) <= 10
    assert all(colour in COLOURS and shape in SHAPES for colour, shape in HELD_OUT)
    training_pairs = {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT
    assert {c for c, _ in training_pairs} == set(COLOURS)
    assert {s for _, s in training_pairs} == set(SHAPES)


# --- scenes ---------------------------------------------------------------------------------------


def test_sampled_scenes_are_valid_and_avoid_held_out_pairs():
    counts = set()
    for seed in range(400):
        scene = sample_scene(np.random.default_rng(seed))
        counts.add(len(scene.objects))
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            radius = radius_fraction(obj.size)
            assert EDGE_MARGIN + radius <= obj.x + 1e-9 and obj.x + radius <= 1 - EDGE_MARGIN + 1e-9
            assert EDGE_MARGIN + radius <= obj.y + 1e-9 and obj.y + radius <= 1 - EDGE_MARGIN + 1e-9
            assert (obj.colour, obj.shape) not in HELD_OUT
            assert obj.colour != scene.background
        for a, b in itertools.combinations(scene.objects, 2):
            assert boxes_are_apart(a, b, MIN_GAP - 1e-9)
    assert counts == {1, 2, 3, 4}


def test_sample_scene_is_deterministic_and_honours_arguments():
    assert sample_scene(np.random.default_rng(5)) == sample_scene(np.random.default_rng(5))
    assert len(sample_scene(np.random.default_rng(1), n_objects=4).objects) == 4
    held_out_seen = any(
        (obj.colour, obj.shape) in HELD_OUT
        for seed in range(200)
        for obj in sample_scene(np.random.default_rng(seed), allow_held_out=True).objects
    )
    assert held_out_seen
    with pytest.raises(ValueError, match="n_objects"):
        sample_scene(np.random.default_rng(0), n_objects=5)


def test_render_draws_each_object_in_its_colour_with_soft_edges():
    scene = Scene(
        objects=(
            SceneObject("circle", "red", "large", 0.3, 0.3),
            SceneObject("square", "blue", "small", 0.75, 0.75),
        ),
        background="white",
    )
    image = render(scene, 64)
    assert image.mode == "RGB" and image.size == (64, 64)
    pixels = np.asarray(image)
    assert tuple(pixels[int(0.3 * 64), int(0.3 * 64)]) == COLOURS["red"]
    assert tuple(pixels[int(0.75 * 64), int(0.75 * 64)]) == COLOURS["blue"]
    assert tuple(pixels[1, 62]) == BACKGROUNDS["white"]
    palette = {COLOURS["red"], COLOURS["blue"], BACKGROUNDS["white"]}
    blended = {tuple(p) for p in pixels.reshape(-1, 3)} - palette
    assert blended, "expected anti-aliased edge pixels"
    red_area = np.all(pixels == COLOURS["red"], axis=2).sum()
    radius = SIZES["large"]
    assert abs(red_area - np.pi * radius**2) < 2 * np.pi * radius  # within one perimeter
    assert render(scene, 32).size == (32, 32)


def test_render_is_fast():
    scenes = [sample_scene(np.random.default_rng(seed), n_objects=4) for seed in range(100)]
    start = time.perf_counter()
    for scene in scenes:
        render(scene)
    assert (time.perf_counter() - start) / len(scenes) < 0.005


def test_render_rejects_unknown_names():
    with pytest.raises(ValueError, match="mauve"):
        render(Scene(objects=(SceneObject("circle", "mauve", "small", 0.5, 0.5),), background="white"))
    with pytest.raises(ValueError, match="hexagon"):
        render(Scene(objects=(SceneObject("hexagon", "red", "small", 0.5, 0.5),), background="white"))


# --- captions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_describe_then_parse_round_trips_and_is_true(style):
    for seed in range(700):
        rng = np.random.default_rng([seed, 11])
        scene = sample_scene(rng, allow_held_out=True)
        caption = describe(scene, style, rng)
        assert parse_caption(caption.text) == caption.spec, caption.text
        assert spec_is_true_of(caption.spec, scene), caption.text
        assert Spec.from_json(caption.spec.to_json()) == caption.spec
        for obj in caption.spec.objects:
            assert caption.text[obj.first_char :].startswith(("a ", "an "))
            assert obj.colour is not None and obj.shape is not None


def test_caption_styles_have_their_promised_content():
    rng = np.random.default_rng(0)
    relations = backgrounds = sizes = positions = counts = 0
    long_token_counts = []
    for _ in range(300):
        short = describe(sample_scene(rng, 1), "short", rng)
        assert len(short.spec.objects) == 1 and not short.spec.relations
        sizes += short.spec.objects[0].size is not None
        pair = describe(sample_scene(rng, 2), "compositional", rng)
        relations += len(pair.spec.relations)
        backgrounds += pair.spec.background is not None
        long = describe(sample_scene(rng, int(rng.integers(2, 5))), "long", rng)
        assert long.text.count(".") >= 3
        positions += any(obj.position for obj in long.spec.objects)
        counts += long.spec.count is not None
        long_token_counts.append(approx_clip_token_count(long.text))
    assert 0 < sizes < 300 and 150 < relations <= 300 and 0 < backgrounds < 300
    assert positions > 100 and 0 < counts < 300
    assert np.mean(np.array(long_token_counts) > 77) > 0.2


def test_filler_sentences_assert_nothing():
    from condkit.shapes_world.captions import FILLER_SENTENCES

    for sentence in FILLER_SENTENCES:
        assert parse_caption(sentence) == Spec()


def test_describe_rejects_unknown_style():
    scene = sample_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match="poem.*short"):
        describe(scene, "poem", np.random.default_rng(0))


def test_scene_for_spec_satisfies_the_spec():
    for seed in range(200):
        rng = np.random.default_rng([seed, 3])
        caption = describe(sample_scene(rng, allow_held_out=True), STYLES[seed % 3], rng)
        scene = scene_for_spec(caption.spec, rng)
        assert spec_is_true_of(caption.spec, scene)


# --- dataset --------------------------------------------------------------------------------------


def test_dataset_items_are_deterministic_and_consistent():
    dataset = ShapesDataset(50, seed=3)
    again = ShapesDataset(50, seed=3)
    other_seed = ShapesDataset(50, seed=4)
    assert len(dataset) == 50
    styles = set()
    for index in range(50):
        item = dataset[index]
        assert set(item) == {"image", "caption", "spec", "style"}
        assert isinstance(item["image"], Image.Image) and item["image"].size == (64, 64)
        assert parse_caption(item["caption"]) == item["spec"]
        repeat = again[index]
        assert repeat["caption"] == item["caption"]
        assert np.array_equal(np.asarray(repeat["image"]), np.asarray(item["image"]))
        styles.add(item["style"])
    assert styles == set(STYLES)
    assert [dataset[i]["caption"] for i in range(10)] != [other_seed[i]["caption"] for i in range(10)]
    with pytest.raises(IndexError):
        dataset[50]


def test_dataset_never_shows_held_out_pairs_in_words_unless_allowed():
    held_out_words = {f"{colour} {shape}" for colour, shape in HELD_OUT}
    training = ShapesDataset(300, seed=0)
    assert not any(words in training[i]["caption"] for i in range(300) for words in held_out_words)
    evaluation = ShapesDataset(300, seed=0, allow_held_out=True)
    assert any(words in evaluation[i]["caption"] for i in range(300) for words in held_out_words)


def test_dataset_validates_arguments():
    with pytest.raises(ValueError, match="haiku"):
        ShapesDataset(10, styles=("haiku",), style_weights=(1.0,))
    with pytest.raises(ValueError, match="style_weights"):
        ShapesDataset(10, styles=("short",), style_weights=(0.5, 0.5))


def test_world_words_cover_every_caption_token():
    words = world_words()
    assert words == sorted(set(words)) and all(word == word.lower() for word in words)
    assert 50 < len(words) < 400
    vocabulary = set(words)
    dataset = ShapesDataset(600, seed=9, allow_held_out=True)
    for index in range(len(dataset)):
        assert set(TOKEN_PATTERN.findall(dataset[index]["caption"])) <= vocabulary


# --- prompt sets ----------------------------------------------------------------------------------


def test_shipped_prompt_sets_match_their_generator():
    for name in PROMPT_SETS:
        shipped = load_prompt_set(name)
        assert len(shipped) == 40
        regenerated = build_prompt_set(name, 40, 0)
        assert [(c.text, c.spec) for c in shipped] == [(c.text, c.spec) for c in regenerated]
        for caption in shipped:
            assert isinstance(caption, Caption)
            assert parse_caption(caption.text) == caption.spec


def test_prompt_sets_meet_their_coverage_requirements():
    short = load_prompt_set("short")
    assert {c.spec.objects[0].colour for c in short} == set(COLOURS)
    assert {c.spec.objects[0].shape for c in short} == set(SHAPES)
    for caption in load_prompt_set("compositional"):
        assert len(caption.spec.objects) == 2 and caption.spec.relations
        assert any((obj.colour, obj.shape) in HELD_OUT for obj in caption.spec.objects)
    long = load_prompt_set("long")
    assert sum(describes_object_past_window(c) for c in long) >= len(long) / 2
    with pytest.raises(ValueError, match="medium.*short"):
        load_prompt_set("medium")


def test_position_assertions_are_well_inside_their_regions():
    for name, (x, y) in POSITIONS.items():
        assert position_of(x, y) == name
        assert position_of(x + POSITION_ASSERT_RADIUS * 1.01, y) is None
