"""The shapes-world scorer: exact detection on ground-truth renders, robustness, and metric semantics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from condkit.shapes_world.captions import STYLES, ObjectRequirement, Spec, describe, scene_for_spec
from condkit.shapes_world.dataset import objects_for_style
from condkit.shapes_world.prompt_sets import PROMPT_SETS, load_prompt_set
from condkit.shapes_world.scenes import Scene, SceneObject, render, sample_scene
from condkit.shapes_world.scorer import METRICS, Detection, aggregate, detect, format_table, score
from condkit.shapes_world.vocabulary import BACKGROUNDS


def blurred_and_noisy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=float)
    pixels += rng.normal(0.0, 8.0, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def detections_match_scene(detections: list[Detection], scene: Scene, tolerance: float) -> bool:
    if len(detections) != len(scene.objects):
        return False
    for obj in scene.objects:
        nearest = min(detections, key=lambda d: (d.x - obj.x) ** 2 + (d.y - obj.y) ** 2)
        if (nearest.shape, nearest.colour, nearest.size) != (obj.shape, obj.colour, obj.size):
            return False
        if max(abs(nearest.x - obj.x), abs(nearest.y - obj.y)) > tolerance:
            return False
    return True


def caption_scores(resolution: int, per_style: int, distort: bool) -> dict[str, dict[str, float]]:
    by_style = {}
    for style in STYLES:
        scores = []
        for seed in range(per_style):
            rng = np.random.default_rng([seed, resolution, int(distort)])
            n_objects = 4 if style == "long" and seed % 2 else objects_for_style(style, rng)
            scene = sample_scene(rng, n_objects, allow_held_out=True)
            caption = describe(scene, style, rng)
            image = render(scene, resolution)
            scores.append(score(blurred_and_noisy(image, rng) if distort else image, caption.spec))
        by_style[style] = aggregate(scores)
    return by_style


# --- detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [64, 32])
def test_detect_recovers_every_object_of_clean_renders(resolution):
    n_scenes = 200 if resolution == 64 else 100
    exact = 0
    for seed in range(n_scenes):
        rng = np.random.default_rng([seed, 21])
        scene = sample_scene(rng, 4 if seed % 2 else None, allow_held_out=True)
        exact += detections_match_scene(detect(render(scene, resolution)), scene, tolerance=0.02)
    assert exact / n_scenes >= 0.99


def test_detect_survives_blur_and_noise():
    n_scenes = 150
    exact = 0
    for seed in range(n_scenes):
        rng = np.random.default_rng([seed, 22])
        scene = sample_scene(rng, allow_held_out=True)
        exact += detections_match_scene(detect(blurred_and_noisy(render(scene), rng)), scene, tolerance=0.03)
    assert exact / n_scenes >= 0.95


def test_detect_reports_centres_areas_and_background_only_images():
    scene = Scene(objects=(SceneObject("triangle", "green", "large", 0.3, 0.6),), background="black")
    (detection,) = detect(render(scene))
    assert detection.shape == "triangle" and detection.colour == "green" and detection.size == "large"
    assert abs(detection.x - 0.3) < 0.01 and abs(detection.y - 0.6) < 0.01
    assert abs(detection.area - 2 * 13**2) < 6
    blank = np.zeros((64, 64, 3), dtype=np.uint8) + np.array(BACKGROUNDS["gray"], dtype=np.uint8)
    assert detect(blank) == []
    assert detect(np.asarray(render(scene))) == [detection]


def test_detect_rejects_arrays_that_are_not_images():
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        detect(np.zeros((64, 64)))


# --- scoring --------------------------------------------------------------------------------------


def test_ground_truth_renders_score_perfectly():
    for resolution, per_style in ((64, 100), (32, 40)):
        for style, metrics in caption_scores(resolution, per_style, distort=False).items():
            assert set(metrics) <= set(METRICS)
            assert all(value >= 0.99 for value in metrics.values()), (resolution, style, metrics)


def test_blurred_noisy_renders_still_score_high():
    for style, metrics in caption_scores(64, 60, distort=True).items():
        assert all(value >= 0.95 for value in metrics.values()), (style, metrics)


def test_shipped_prompt_sets_score_perfectly_on_scenes_built_for_them():
    for name in PROMPT_SETS:
        scores = []
        for index, caption in enumerate(load_prompt_set(name)):
            scene = scene_for_spec(caption.spec, np.random.default_rng([index, 5]))
            scores.append(score(render(scene), caption.spec))
        assert aggregate(scores)["all_correct"] == 1.0, name


def _requirement(**attributes) -> ObjectRequirement:
    fields = {"shape": None, "colour": None, "size": None, "position": None, "first_char": 0}
    return ObjectRequirement(**{**fields, **attributes})


TWO_OBJECTS = Scene(
    objects=(
        SceneObject("circle", "red", "medium", 0.25, 0.5),
        SceneObject("square", "blue", "medium", 0.75, 0.5),
    ),
    background="white",
)


def test_wrong_prompts_score_zero_on_what_they_get_wrong():
    image = render(TWO_OBJECTS)
    right = Spec(
        objects=[_requirement(shape="circle", colour="red"), _requirement(shape="square", colour="blue")],
        relations=[(0, "to the left of", 1)],
        background="white",
        count=2,
    )
    assert score(image, right)["all_correct"] == 1.0

    swapped_colours = Spec(objects=[_requirement(shape="circle", colour="blue"), _requirement(shape="square", colour="red")])
    result = score(image, swapped_colours)
    assert result["object_recall"] == 0.0 and result["colour_shape_binding"] == 0.0
    assert result["shape"] == 1.0 and result["colour"] == 0.0 and result["all_correct"] == 0.0

    wrong_relation = dataclasses.replace(right, relations=[(0, "to the right of", 1)])
    assert score(image, wrong_relation)["relations"] == 0.0
    assert score(image, wrong_relation)["all_correct"] == 0.0
    assert score(image, dataclasses.replace(right, count=3))["counting"] == 0.0
    assert score(image, dataclasses.replace(right, background="black"))["background"] == 0.0

    wrong_attributes = Spec(objects=[_requirement(shape="circle", size="large", position="right")])
    result = score(image, wrong_attributes)
    assert result["size"] == 0.0 and result["position"] == 0.0 and result["shape"] == 1.0
    assert result["relations"] is None and result["counting"] is None and result["background"] is None


def test_relations_have_a_dead_zone():
    side_by_side = Scene(
        objects=(SceneObject("circle", "red", "small", 0.48, 0.3), SceneObject("square", "blue", "small", 0.5, 0.7)),
        background="white",
    )
    spec = Spec(
        objects=[_requirement(shape="circle", colour="red"), _requirement(shape="square", colour="blue")],
        relations=[(0, "to the left of", 1), (0, "above", 1)],
    )
    assert score(render(side_by_side), spec)["relations"] == 0.5


def test_objects_are_matched_by_an_optimal_assignment():
    # Greedy matching would give the first (any-colour circle) the red circle and leave the second unmatched.
    scene = Scene(
        objects=(SceneObject("circle", "red", "medium", 0.25, 0.5), SceneObject("circle", "blue", "medium", 0.75, 0.5)),
        background="white",
    )
    spec = Spec(objects=[_requirement(shape="circle"), _requirement(shape="circle", colour="red")])
    assert score(render(scene), spec)["object_recall"] == 1.0
    extra = Spec(objects=[*spec.objects, _requirement(shape="circle")])
    assert score(render(scene), extra)["object_recall"] == pytest.approx(2 / 3)


def test_aggregate_skips_missing_values_and_table_lists_categories():
    scores = [
        {"object_recall": 1.0, "relations": None, "all_correct": 1.0},
        {"object_recall": 0.5, "relations": 0.0, "all_correct": 0.0},
    ]
    means = aggregate(scores)
    assert means == {"object_recall": 0.75, "relations": 0.0, "all_correct": 0.5}
    table = format_table({"short": means, "long": {"object_recall": 0.25}})
    lines = table.splitlines()
    assert "object_recall" in lines[0] and "relations" in lines[0] and "colour" not in lines[0]
    assert lines[2].startswith("short") and "0.750" in lines[2] and "0.500" in lines[2]
    assert lines[3].startswith("long") and "0.250" in lines[3] and "-" in lines[3]


def test_equal_matches_are_broken_by_the_relations_they_satisfy():
    # Both orange circles fit "an orange circle"; only the one far to the right of the pink circle
    # satisfies the relation, so the matching must give it to the second object.
    scene = Scene(
        objects=(
            SceneObject("circle", "orange", "small", 0.8, 0.2),
            SceneObject("circle", "pink", "small", 0.15, 0.5),
            SceneObject("circle", "orange", "small", 0.18, 0.85),
        ),
        background="white",
    )
    spec = Spec(
        objects=[_requirement(shape="circle", colour="orange"), _requirement(shape="circle", colour="pink"),
                 _requirement(shape="circle", colour="orange")],
        relations=[(2, "to the right of", 1)],
    )  # fmt: skip
    assert score(render(scene), spec)["relations"] == 1.0
    swapped = Spec(objects=spec.objects, relations=[(0, "to the right of", 1)])
    assert score(render(scene), swapped)["relations"] == 1.0
