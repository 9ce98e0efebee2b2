"""How often a model draws a noise texture instead of a scene, from a `condkit eval` folder.

An image is a texture when more than TEXTURE_UNEXPLAINED of its pixels are unexplained by the
scorer's reconstruction (background plus each detected object's template): the first shipped model
drew held-out pairs as textures covering 67–77% of the canvas, while a clean scene has at most 1%
and a scene with a badly drawn object a few percent. Reads the images back from grid.png (rows are
prompts, columns the seeds) and splits prompts by whether they ask for a held-out colour–shape pair.

    python benchmarks/texture_collapse.py runs/claims/eval-short-clip
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from condkit.shapes_world.scenes import HELD_OUT
from condkit.shapes_world.scorer import read_scene

TEXTURE_UNEXPLAINED = 0.25


def tiles(grid: Image.Image, rows: int, columns: int) -> list[list[Image.Image]]:
    width, height = grid.width // columns, grid.height // rows
    return [[grid.crop((c * width, r * height, (c + 1) * width, (r + 1) * height)) for c in range(columns)] for r in range(rows)]


def asks_held_out_pair(spec: dict) -> bool:
    return any((item.get("colour"), item.get("shape")) in HELD_OUT for item in spec.get("objects", []))


def texture_rates(folder: Path) -> dict[str, dict[str, float]]:
    report = json.loads((folder / "eval.json").read_text())
    prompts = report["prompts"]
    columns = len(prompts[0]["seeds"])
    images = tiles(Image.open(folder / "grid.png").convert("RGB"), len(prompts), columns)
    groups: dict[str, list[float]] = {"all prompts": [], "held-out pairs": [], "trained pairs only": []}
    for record, row in zip(prompts, images):
        unexplained = [read_scene(np.asarray(image)).unexplained for image in row]
        groups["all prompts"] += unexplained
        groups["held-out pairs" if asks_held_out_pair(record["spec"]) else "trained pairs only"] += unexplained
    return {
        name: {"images": len(values), "texture_rate": float(np.mean(np.array(values) > TEXTURE_UNEXPLAINED)),
               "clean_rate": float(np.mean(np.array(values) <= 0.01)), "median_unexplained": float(np.median(values))}
        for name, values in groups.items() if values
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("folders", nargs="+", help="condkit eval output folders (eval.json and grid.png)")
    args = parser.parse_args()
    for folder in map(Path, args.folders):
        if not (folder / "eval.json").is_file() or not (folder / "grid.png").is_file():
            parser.error(f"{str(folder)!r} holds no eval.json and grid.png; expected a condkit eval output folder")
    for folder in map(Path, args.folders):
        print(folder)
        for name, row in texture_rates(folder).items():
            print(f"  {name:20s} {row['images']:4d} images  textures (> {TEXTURE_UNEXPLAINED:.0%} unexplained) "
                  f"{row['texture_rate']:.3f}  clean scenes {row['clean_rate']:.3f}  median unexplained {row['median_unexplained']:.3f}")


if __name__ == "__main__":
    main()
