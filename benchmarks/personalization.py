"""Personalization on the shapes world: TI vs TI+CoRe vs TI+CoRe+test-time, scored by the pixel scorer.

A concept (one colour/shape/size combination) is learned from a few renders of it alone, its
words withheld: the placeholder starts from the generic word "object". Then:
- identity: "<c>", "a picture of <c>" — does the scorer find an object with the concept's colour,
  shape and size (and, reported apart, its colour and shape at any size)?
- alignment: prompts that recompose it ("<c> to the left of a blue square", "<c> on a yellow
  background", ...) — does the whole prompt hold (every object, relation and background)?
- "words", the reference: the concept's own words in place of the token, nothing learned.

Every variant draws each prompt at the same seeds, so variants compare image for image: each
column comes with its 95% crossed-bootstrap interval over prompts and seeds, and each variant
against the one it builds on with the paired difference and its interval (bootstrap.py).

    python benchmarks/personalization.py [--steps 500] [--n 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from condkit import load_pipeline
from condkit.conditioning.clip import CLIPConditioner
from condkit.shapes_world.bootstrap import interval, paired_difference
from condkit.shapes_world.captions import parse_caption
from condkit.shapes_world.concepts import concept_images
from condkit.shapes_world.scorer import score
from condkit.training.core import CoRe
from condkit.training.core_test_time import test_time_optimize
from condkit.training.loop import TrainingConfig, train
from condkit.training.textual_inversion import TextualInversion

PLACEHOLDER = "<c>"
IDENTITY_PROMPTS = ["<c>", "a picture of <c>"]
ALIGNMENT_PROMPTS = [
    "<c> to the left of a blue square",
    "a green circle above <c>",
    "<c> on a yellow background",
    "<c> below a red cross",
    "<c> to the right of a pink triangle",
    "<c> on a black background",
]


def generate_scores(pipe, prompts: list[str], concept_phrase: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """(prompts × n) score matrices, the same seeds seed … seed+n−1 for every prompt and variant: the
    concept found (colour, shape and size), its colour and shape found (any size), and the whole prompt
    holding (every object, relation and background)."""
    conditioner = CLIPConditioner.from_pipeline(pipe)
    concept_spec = parse_caption(concept_phrase)
    found, pair, whole = [], [], []
    for prompt in prompts:
        with torch.no_grad():
            cond = conditioner.encode(prompt, num_images_per_prompt=n)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        images = pipe(**cond.kwargs(), num_inference_steps=25, guidance_scale=5.0, generator=generators).images
        spec = parse_caption(prompt.replace(PLACEHOLDER, concept_phrase))
        concept_scores = [score(image, concept_spec) for image in images]
        found.append([s["object_recall"] for s in concept_scores])
        pair.append([s["colour_shape_binding"] for s in concept_scores])
        whole.append([score(image, spec)["all_correct"] for image in images])
    return {"concept": np.array(found, float), "colour_shape": np.array(pair, float), "all_correct": np.array(whole, float)}


def train_concept(method_name: str, args, images) -> tuple:
    """A fresh pipeline with the concept learned by TI ("ti") or TI + CoRe ("core")."""
    pipe = load_pipeline(args.model, "cpu", "float32")
    common = dict(placeholder=PLACEHOLDER, initializer="object", num_vectors=args.num_vectors, seed=args.seed)
    clip = CLIPConditioner.from_pipeline(pipe)
    method = TextualInversion(clip, **common) if method_name == "ti" else CoRe(clip, **common)
    config = TrainingConfig(output_dir=Path(tempfile.mkdtemp()) / method_name, max_train_steps=args.steps,
                            train_batch_size=4, learning_rate=5e-3, resolution=64, seed=args.seed,
                            checkpointing_steps=args.steps, show_progress=not args.quiet)
    train(method, pipe.unet, pipe.vae, pipe.scheduler, images, config, conditioner=clip)
    return pipe, method.eval()


def scores_with_test_time(pipe, method, prompts: list[str], concept_phrase: str, args) -> dict[str, np.ndarray]:
    """CoRe's test-time variant: per prompt, adjust the learned embedding for it, generate, restore."""
    trained = [table.new_rows.detach().clone() for table in method.embeddings]
    per_prompt = []
    for prompt in prompts:
        test_time_optimize(method, pipe, prompt, steps=10, lr=5e-4, seed=args.seed, write_back=True)
        per_prompt.append(generate_scores(pipe, [prompt], concept_phrase, args.n, args.seed))
        with torch.no_grad():
            for table, rows in zip(method.embeddings, trained):
                table.new_rows.copy_(rows)
    return {key: np.concatenate([scores[key] for scores in per_prompt]) for key in per_prompt[0]}


# Each reported column: (name, which prompts, which score matrix).
COLUMNS = (
    ("identity", "identity", "concept"),
    ("identity_colour_shape", "identity", "colour_shape"),
    ("alignment_concept_found", "alignment", "concept"),
    ("alignment_all_correct", "alignment", "all_correct"),
)


def row(identity: dict[str, np.ndarray], alignment: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    matrices = {"identity": identity, "alignment": alignment}
    return {column: matrices[prompts][key] for column, prompts, key in COLUMNS}


def paired_comparisons(rows: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, dict]]:
    """A − B with its 95% interval over prompts and seeds, for every column, between each variant
    and the one it builds on (TI vs the words, CoRe vs TI, test-time vs CoRe and vs TI)."""
    pairs = [("ti", "words"), ("core", "ti"), ("core+test-time", "core"), ("core+test-time", "ti")]
    return {
        f"{a} - {b}": {column: paired_difference(rows[a][column], rows[b][column]) for column, _, _ in COLUMNS}
        for a, b in pairs if a in rows and b in rows
    }


def run_variants(variants: list[str], args, images, concept_phrase: str) -> dict:
    """TI trains once; "core" and "core+test-time" share one CoRe training. "words" is the reference:
    the concept's own words in place of the token, nothing learned (what the model can draw at best)."""
    rows = {}
    if "words" in variants:
        pipe = load_pipeline(args.model, "cpu", "float32")
        rows["words"] = row(*(generate_scores(pipe, [p.replace(PLACEHOLDER, concept_phrase) for p in prompts],
                                              concept_phrase, args.n, args.seed)
                              for prompts in (IDENTITY_PROMPTS, ALIGNMENT_PROMPTS)))
    if "ti" in variants:
        pipe, _ = train_concept("ti", args, images)
        rows["ti"] = row(*(generate_scores(pipe, p, concept_phrase, args.n, args.seed)
                           for p in (IDENTITY_PROMPTS, ALIGNMENT_PROMPTS)))
    if "core" in variants or "core+test-time" in variants:
        pipe, method = train_concept("core", args, images)
        if "core" in variants:
            rows["core"] = row(*(generate_scores(pipe, p, concept_phrase, args.n, args.seed)
                                 for p in (IDENTITY_PROMPTS, ALIGNMENT_PROMPTS)))
        if "core+test-time" in variants:
            rows["core+test-time"] = row(*(scores_with_test_time(pipe, method, p, concept_phrase, args)
                                           for p in (IDENTITY_PROMPTS, ALIGNMENT_PROMPTS)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--concept", default="large orange diamond", help="SIZE COLOUR SHAPE")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num-vectors", type=int, default=1)
    parser.add_argument("--n", type=int, default=8, help="images per prompt (default: 8, as condkit eval)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="words,ti,core,core+test-time")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    size, colour, shape = args.concept.split()
    images = [(image, "") for image in concept_images(size, colour, shape, args.images, args.seed)]
    concept_phrase = f"a {size} {colour} {shape}"
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - {"words", "ti", "core", "core+test-time"})
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; expected words, ti, core, core+test-time")
    rows = run_variants(variants, args, images, concept_phrase)
    comparisons = paired_comparisons(rows)
    print(f"concept: {concept_phrase}, {args.images} images, {args.steps} steps, {args.n} images per prompt "
          f"(seeds {args.seed}…{args.seed + args.n - 1} for every prompt and variant); 95% crossed-bootstrap intervals")
    print(f"{'variant':16s} " + " ".join(f"{column:>26s}" for column, _, _ in COLUMNS))
    for name, matrices in rows.items():
        cells = [("%.3f [%.3f, %.3f]" % interval(matrices[column])).rjust(26) for column, _, _ in COLUMNS]
        print(f"{name:16s} " + " ".join(cells))
    for label, columns in comparisons.items():
        print(f"{label:22s} " + "  ".join(
            f"{column} {c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]{' *' if c['significant'] else ''}"
            for column, c in columns.items()))
    if args.json:
        table = {name: {column: dict(zip(("mean", "low", "high"), interval(matrix))) for column, matrix in matrices.items()}
                 for name, matrices in rows.items()}
        scores = {name: {column: matrix.tolist() for column, matrix in matrices.items()} for name, matrices in rows.items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": table, "comparisons": comparisons,
                                               "scores": scores}, indent=2))


if __name__ == "__main__":
    main()
