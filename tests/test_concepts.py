"""Personalization training images: the concept alone, found by the scorer in every image."""

import pytest

from condkit.shapes_world.captions import parse_caption
from condkit.shapes_world.concepts import concept_images, save_concept_images
from condkit.shapes_world.scorer import score
from condkit.training.data import folder_dataset


def test_every_image_holds_exactly_the_concept(tmp_path):
    images = concept_images("large", "orange", "diamond", count=4, seed=3)
    spec = parse_caption("a large orange diamond")
    assert [score(image, spec)["all_correct"] for image in images] == [1.0] * 4
    assert len({image.tobytes() for image in images}) == 4
    folder = save_concept_images(images, tmp_path / "concept")
    assert len(folder_dataset(folder, caption_required=False)) == 4


@pytest.mark.parametrize("size,colour,shape,message", [
    ("huge", "red", "circle", "unknown size 'huge'"),
    ("small", "mauve", "circle", "unknown colour 'mauve'"),
    ("small", "red", "star", "unknown shape 'star'"),
])
def test_unknown_attributes_are_named(size, colour, shape, message):
    with pytest.raises(ValueError, match=message):
        concept_images(size, colour, shape)
