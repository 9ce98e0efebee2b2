"""The closed vocabulary of the shapes world: shapes, colours, backgrounds, sizes, positions, relations.

Everything else in the world (scene sampling, captions, the scorer) is derived from these tables.

Shapes are drawn axis-aligned inside a square box of half-width ``r`` (the object's radius), and were
chosen so that simple, scale-invariant geometry separates them even after blur:

- ``circle``    fills π/4 ≈ 0.79 of its box, centroid at the box centre.
- ``square``    fills all of its box.
- ``triangle``  (apex up) fills 1/2 of its box, centroid r/3 *below* the box centre.
- ``diamond``   fills 1/2 of its box, centroid at the box centre (this separates it from the triangle).
- ``cross``     (arms 0.8·r wide) fills 0.64 of its box but only ≈0.78 of its convex hull; its mass sits
  on the axes while a circle's is spread evenly, so a template comparison tells them apart.

Object colours are saturated hues at least ~83 apart in RGB (orange/yellow being the closest pair),
and the backgrounds were picked so that an anti-aliased edge blending an object into its background
stays ≥ 60 away from every *other* object colour (no ring of false "orange" around a red circle on
yellow). The "yellow" background is therefore a pale yellow, distinct from the yellow object colour.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 170, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
    "pink": (255, 110, 210),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "yellow": (255, 240, 150),
}

# Object radius (half the side of the object's bounding box) in pixels on a 64x64 canvas.
SIZES: dict[str, float] = {"small": 6.0, "medium": 9.0, "large": 13.0}

REFERENCE_RESOLUTION = 64

# Region centres in canvas fractions, x to the right, y downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}

RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")

# Half-width of a cross's arms as a fraction of the object radius.
CROSS_ARM_HALF_WIDTH = 0.4
