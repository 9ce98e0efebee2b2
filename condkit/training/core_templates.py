"""CoRe's regularization prompts: contexts in which the new concept should behave like its category.

Each template holds one "{}", filled once with the placeholder and once with the category word.
They are grouped by the kind of context they add — where the concept is, its colour, the style of
the picture, what it does, what it is made of, where it stands relative to other things — and a
group written for the embedded shapes world. No A1111 syntax (brackets, colons, BREAK) appears, so
a template means the same to every conditioner, and each stays well inside one 77-token window.
"""

from __future__ import annotations

BACKGROUNDS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} in a desert",
    "a {} on a city street",
    "a {} in a quiet forest",
    "a {} on top of a mountain",
    "a {} in a kitchen",
    "a {} in a living room",
    "a {} on a wooden table",
    "a {} under water",
    "a {} in outer space",
    "a {} in a field of flowers",
    "a {} at night",
    "a {} in the rain",
    "a {} at sunset",
    "a {} in a library",
    "a {} on a rooftop",
    "a {} in a garden",
    "a {} next to a river",
    "a {} in a busy market",
    "a {} on a boat",
    "a {} in a museum",
    "a {} in front of a brick wall",
    "a {} on a white background",
)

COLOURS = (
    "a red {}",
    "a blue {}",
    "a green {}",
    "a yellow {}",
    "a purple {}",
    "an orange {}",
    "a black {}",
    "a white {}",
    "a pink {}",
    "a golden {}",
    "a rainbow coloured {}",
    "a {} painted bright red",
    "a striped {}",
)

STYLES = (
    "a watercolor painting of a {}",
    "an oil painting of a {}",
    "a pencil sketch of a {}",
    "a cartoon drawing of a {}",
    "a pixel art {}",
    "a {} in the style of van gogh",
    "a {} in the style of a comic book",
    "a low poly render of a {}",
    "an anime illustration of a {}",
    "a black and white photo of a {}",
    "a vintage photograph of a {}",
    "a mosaic of a {}",
    "a graffiti of a {} on a wall",
    "a stained glass window showing a {}",
    "a children's drawing of a {}",
)

ACTIONS = (
    "a {} jumping",
    "a {} running through a park",
    "a {} sleeping on a sofa",
    "a {} swimming in a lake",
    "a {} flying in the sky",
    "a {} floating in the air",
    "a {} spinning around",
    "a {} falling from a shelf",
    "a {} rolling down a hill",
    "a {} wearing a red hat",
    "a {} wearing sunglasses",
    "a {} wearing a scarf",
)

MATERIALS = (
    "a {} made of wood",
    "a {} made of glass",
    "a {} made of gold",
    "a {} made of paper",
    "a {} made of ice",
    "a {} made of lego bricks",
    "a plush toy {}",
    "a clay model of a {}",
    "a marble statue of a {}",
    "a knitted {}",
)

POSITIONS = (
    "a {} next to a cup",
    "a {} on top of a box",
    "a {} under a table",
    "a {} behind a tree",
    "a {} between two chairs",
    "a {} in front of a car",
    "two {} side by side",
    "a {} and a dog",
    "a {} beside a lamp",
    "a {} inside a basket",
    "a {} on a shelf with books",
)

SHAPES_WORLD = (
    "a small {}",
    "a large {}",
    "a {} on a yellow background",
    "a {} on a black background",
    "a {} to the left of a blue square",
    "a {} to the right of a red circle",
    "a {} above a green triangle",
    "a {} below a white star",
    "a {} next to a purple circle",
    "a {} in the top left corner",
    "a {} in the bottom right corner",
    "a {} in the middle",
    "a small {} and a large red square",
    "a {} between two orange squares",
)

TEMPLATE_GROUPS = {
    "backgrounds": BACKGROUNDS,
    "colours": COLOURS,
    "styles": STYLES,
    "actions": ACTIONS,
    "materials": MATERIALS,
    "positions": POSITIONS,
    "shapes_world": SHAPES_WORLD,
}

REGULARIZATION_TEMPLATES: tuple[str, ...] = tuple(template for group in TEMPLATE_GROUPS.values() for template in group)
