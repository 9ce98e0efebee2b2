"""Which single shapes survive a VAE round trip, by shape and size, read by the strict scorer.

For every shape and size it renders `--scenes` one-object scenes (random colour, background and
place, the same for every VAE given `--seed`), encodes them to the posterior mean, decodes, and
prints the share the scorer credits with the right colour and shape. The recipe-v2 VAE loses
almost every small cross (it draws a four-pointed star the scorer reads as a diamond):

    python benchmarks/vae_shapes_by_size.py runs/world-v2/vae/final condkit/shapes_world/model/vae
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from diffusers import AutoencoderKL

from condkit.shapes_world.captions import describe
from condkit.shapes_world.scenes import EDGE_MARGIN, Scene, SceneObject, radius_fraction, render
from condkit.shapes_world.scorer import score
from condkit.shapes_world.train_vae import RoundTrip, mean_latent_round_trip, round_trip_renders
from condkit.shapes_world.vocabulary import BACKGROUNDS, COLOURS, SHAPES, SIZES


def one_object_scenes(shape: str, size: str, count: int, rng: np.random.Generator) -> list[Scene]:
    scenes = []
    low, high = radius_fraction(size) + EDGE_MARGIN, 1 - radius_fraction(size) - EDGE_MARGIN
    for _ in range(count):
        background = str(rng.choice(list(BACKGROUNDS)))
        colour = str(rng.choice([c for c in COLOURS if c != background]))
        x, y = rng.uniform(low, high, size=2)
        scenes.append(Scene((SceneObject(shape, colour, size, float(x), float(y)),), background))
    return scenes


def binding_by_shape_and_size(round_trip: RoundTrip, scenes_per_cell: int, seed: int = 7) -> dict[str, dict[str, float]]:
    """{shape: {size: share credited}} for images in [-1, 1] (N, 3, H, W) passed through round_trip."""
    rng = np.random.default_rng(seed)
    table: dict[str, dict[str, float]] = {}
    for shape in SHAPES:
        table[shape] = {}
        for size in SIZES:
            scenes = one_object_scenes(shape, size, scenes_per_cell, rng)
            specs = [describe(scene, "short", rng).spec for scene in scenes]
            renders = np.stack([np.asarray(render(scene)) for scene in scenes])
            decoded = round_trip_renders(round_trip, renders)
            credited = [score(image, spec)["colour_shape_binding"] for image, spec in zip(decoded, specs)]
            table[shape][size] = float(np.mean(credited))
    return table


def markdown(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    header = "| VAE | shape | " + " | ".join(SIZES) + " |"
    lines = [header, "|" + " --- |" * (len(SIZES) + 2)]
    for name, table in tables.items():
        for shape, row in table.items():
            lines.append(f"| {name} | {shape} | " + " | ".join(f"{row[size]:.3f}" for size in SIZES) + " |")
        overall = np.mean([value for row in table.values() for value in row.values()])
        lines.append(f"| {name} | all | {overall:.3f} (mean of cells) |" + " |" * (len(SIZES) - 1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("vaes", nargs="+", help="AutoencoderKL folders (config.json + weights)")
    parser.add_argument("--scenes", type=int, default=24, help="scenes per shape and size (default: 24)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.scenes < 1:
        parser.error(f"--scenes must be at least 1, got {args.scenes}")
    for folder in map(Path, args.vaes):
        if not (folder / "config.json").is_file():
            parser.error(f"{str(folder)!r} holds no config.json; expected an AutoencoderKL folder")
    tables = {}
    for folder in args.vaes:
        vae = AutoencoderKL.from_pretrained(folder).eval()
        tables[folder] = binding_by_shape_and_size(mean_latent_round_trip(vae), args.scenes, args.seed)
    print(markdown(tables))


if __name__ == "__main__":
    main()
