"""Scenes of the shapes world: sampling non-overlapping objects and rendering them anti-aliased.

A scene is a background plus 1–4 axis-aligned shapes. Coordinates are fractions of the canvas
(x to the right, y downwards) and name the centre of each object's square bounding box, whose
half-width is the object's radius (``SIZES``, in pixels at 64x64, scaled with resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .vocabulary import (
    BACKGROUNDS,
    COLOURS,
    CROSS_ARM_HALF_WIDTH,
    POSITIONS,
    REFERENCE_RESOLUTION,
    SHAPES,
    SIZES,
)

MAX_OBJECTS = 4
# Minimum empty space between two objects' bounding boxes, and between a box and the canvas edge,
# as a fraction of the canvas (4 px and 2 px at 64x64).
MIN_GAP = 4 / REFERENCE_RESOLUTION
EDGE_MARGIN = 2 / REFERENCE_RESOLUTION
# Probability that an object is placed near one of the named region centres, and how far from the
# centre it may land; the rest are placed uniformly.
REGION_SNAP_PROBABILITY = 0.5
REGION_JITTER = 0.05
SUPERSAMPLING = 4

# Colour-shape pairs never drawn in training scenes: one per colour, every shape at least once,
# so each colour and each shape is still seen with other partners.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "square"),
        ("orange", "cross"),
        ("yellow", "circle"),
        ("green", "triangle"),
        ("cyan", "diamond"),
        ("blue", "cross"),
        ("purple", "circle"),
        ("pink", "triangle"),
    }
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str


def radius_fraction(size: str) -> float:
    """Object radius as a fraction of the canvas side."""
    return SIZES[size] / REFERENCE_RESOLUTION


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Whether points at offsets (dx, dy) from an object's box centre lie inside the shape."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if shape == "triangle":
        # Apex at the top of the box, base along its bottom edge.
        return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    if shape == "cross":
        arm = CROSS_ARM_HALF_WIDTH * radius
        inside_box = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
        return inside_box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"Unknown shape {shape!r}; expected one of {list(SHAPES)}.")


def shape_coverage(
    shape: str,
    centre_x: float,
    centre_y: float,
    radius: float,
    window: tuple[int, int, int, int],
    supersampling: int = SUPERSAMPLING,
) -> np.ndarray:
    """Fraction of each pixel covered by a shape, over ``window = (x0, y0, x1, y1)`` (pixels, end exclusive).

    All lengths are in pixels; pixel (i, j) spans [i, i+1] x [j, j+1].
    """
    x0, y0, x1, y1 = window
    offsets = (np.arange(supersampling) + 0.5) / supersampling
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1) - centre_x
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1) - centre_y
    inside = shape_mask(shape, xs[None, :], ys[:, None], radius)
    height, width = y1 - y0, x1 - x0
    return inside.reshape(height, supersampling, width, supersampling).mean(axis=(1, 3))


def object_window(obj: SceneObject, resolution: int) -> tuple[int, int, int, int]:
    """Pixel window (x0, y0, x1, y1) that contains an object, clipped to the canvas."""
    radius = radius_fraction(obj.size) * resolution
    cx, cy = obj.x * resolution, obj.y * resolution
    x0 = max(int(np.floor(cx - radius)) - 1, 0)
    y0 = max(int(np.floor(cy - radius)) - 1, 0)
    x1 = min(int(np.ceil(cx + radius)) + 1, resolution)
    y1 = min(int(np.ceil(cy + radius)) + 1, resolution)
    return x0, y0, x1, y1


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """Draw a scene as an RGB image, anti-aliased by supersampling each object's coverage."""
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}.")
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"Unknown background {scene.background!r}; expected one of {list(BACKGROUNDS)}.")
    canvas = np.empty((resolution, resolution, 3), dtype=np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        if obj.colour not in COLOURS:
            raise ValueError(f"Unknown colour {obj.colour!r}; expected one of {list(COLOURS)}.")
        window = object_window(obj, resolution)
        x0, y0, x1, y1 = window
        if x1 <= x0 or y1 <= y0:
            continue
        radius = radius_fraction(obj.size) * resolution
        coverage = shape_coverage(obj.shape, obj.x * resolution, obj.y * resolution, radius, window)
        patch = canvas[y0:y1, x0:x1]
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        patch += coverage[..., None] * (colour - patch)
    return Image.fromarray(np.rint(canvas).astype(np.uint8), mode="RGB")


def boxes_are_apart(a: SceneObject, b: SceneObject, gap: float = MIN_GAP) -> bool:
    """True when the two objects' bounding boxes are separated by at least ``gap`` on some axis."""
    reach = radius_fraction(a.size) + radius_fraction(b.size) + gap
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def _place(rng: np.random.Generator, size: str) -> tuple[float, float]:
    radius = radius_fraction(size)
    low, high = radius + EDGE_MARGIN, 1.0 - radius - EDGE_MARGIN
    if rng.random() < REGION_SNAP_PROBABILITY:
        region = list(POSITIONS)[rng.integers(len(POSITIONS))]
        centre_x, centre_y = POSITIONS[region]
        x = centre_x + rng.uniform(-REGION_JITTER, REGION_JITTER)
        y = centre_y + rng.uniform(-REGION_JITTER, REGION_JITTER)
        return float(np.clip(x, low, high)), float(np.clip(y, low, high))
    return float(rng.uniform(low, high)), float(rng.uniform(low, high))


def _pick_colour_and_shape(rng: np.random.Generator, background: str, allow_held_out: bool) -> tuple[str, str]:
    while True:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if colour == background:
            continue
        if not allow_held_out and (colour, shape) in HELD_OUT:
            continue
        return colour, shape


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, allow_held_out: bool = False
) -> Scene:
    """Sample a scene with ``n_objects`` (1–4, random when None) non-overlapping objects inside the canvas.

    Deterministic given the generator's state. Unless ``allow_held_out``, no object is a ``HELD_OUT``
    colour-shape pair. No object has the background's colour name.
    """
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be between 1 and {MAX_OBJECTS}, got {n_objects}.")
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    sizes = list(SIZES)
    while True:
        objects: list[SceneObject] = []
        for _ in range(n_objects):
            colour, shape = _pick_colour_and_shape(rng, background, allow_held_out)
            size = sizes[rng.integers(len(sizes))]
            placed = _try_to_place(rng, objects, shape, colour, size)
            if placed is None:
                break
            objects.append(placed)
        if len(objects) == n_objects:
            return Scene(objects=tuple(objects), background=background)


def _try_to_place(
    rng: np.random.Generator, placed: list[SceneObject], shape: str, colour: str, size: str, attempts: int = 40
) -> SceneObject | None:
    for _ in range(attempts):
        x, y = _place(rng, size)
        candidate = SceneObject(shape=shape, colour=colour, size=size, x=x, y=y)
        if all(boxes_are_apart(candidate, other) for other in placed):
            return candidate
    return None
