"""Training images for personalization: one concept (size, colour, shape) alone in a few scenes.

    images = concept_images("large", "orange", "diamond", count=6)      # PIL images, 64x64
    save_concept_images(images, "my_concept/")                           # a folder ImageFolder reads

The concept moves around the canvas and the background cycles through gray, white and black, so
what the images share is the object itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from condkit.shapes_world.scenes import Scene, SceneObject, render
from condkit.shapes_world.vocabulary import COLOURS, SHAPES, SIZES

CONCEPT_BACKGROUNDS = ("gray", "white", "black")


def concept_images(
    size: str, colour: str, shape: str, count: int = 6, seed: int = 0, resolution: int = 64
) -> list[Image.Image]:
    for value, known, what in ((size, SIZES, "size"), (colour, COLOURS, "colour"), (shape, SHAPES, "shape")):
        if value not in known:
            raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(known)}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        x, y = rng.uniform(0.3, 0.7, size=2)
        scene = Scene(objects=(SceneObject(shape, colour, size, float(x), float(y)),), background=CONCEPT_BACKGROUNDS[index % 3])
        images.append(render(scene, resolution))
    return images


def save_concept_images(images: list[Image.Image], folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"{index:02d}.png")
    return folder
