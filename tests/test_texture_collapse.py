"""benchmarks/texture_collapse.py tells noise textures from clean scenes in an eval folder's grid."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from condkit.pipelines.generate import image_grid
from condkit.shapes_world.concepts import concept_images

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "texture_collapse.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("texture_collapse", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_textures_are_counted_per_prompt_group(tmp_path):
    texture_collapse = load_benchmark()
    renders = concept_images("large", "red", "circle", 2, seed=0)  # (red, circle) is a trained pair
    noise = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(2)]
    held_out_render = concept_images("large", "pink", "triangle", 1, seed=0)[0]  # (pink, triangle) is held out
    image_grid([*renders, held_out_render, *noise[:1]], columns=2).save(tmp_path / "grid.png")
    spec = lambda colour, shape: {"objects": [{"shape": shape, "colour": colour}]}  # noqa: E731
    prompts = [{"prompt": "a red circle", "spec": spec("red", "circle"), "seeds": [0, 1]},
               {"prompt": "a pink triangle", "spec": spec("pink", "triangle"), "seeds": [0, 1]}]
    (tmp_path / "eval.json").write_text(json.dumps({"prompts": prompts}))

    rates = texture_collapse.texture_rates(tmp_path)
    assert rates["trained pairs only"] == {"images": 2, "texture_rate": 0.0, "clean_rate": 1.0, "median_unexplained": 0.0}
    assert rates["held-out pairs"]["images"] == 2
    assert rates["held-out pairs"]["texture_rate"] == 0.5 and rates["held-out pairs"]["clean_rate"] == 0.5
    assert rates["all prompts"]["texture_rate"] == 0.25
