"""Personalization on the shapes world: TI vs TI+CoRe vs TI+CoRe+test-time, scored by the pixel scorer.

A concept (one colour/shape/size combination) is learned from a few renders of it alone, its
words withheld: the placeholder starts from the generic word "object". Then:
- identity: "<c>", "a picture of <c>" — does the scorer find an object with the concept's colour,
  shape and size (and, reported apart, its colour and shape at any size)?
- alignment: prompts that recompose it ("<c> to the left of a blue square", "<c> on a yellow
  background", ...) — does the whole prompt hold (every object, relation and background)?
- "words", the reference: the concept's own words in place of the token, nothing learned.

    python benchmarks/personalization.py [--steps 300] [--n 4]
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


def generate_scores(pipe, prompts: list[str], concept_phrase: str, n: int, seed: int) -> dict[str, float]:
    """Averaged over prompts × n images: the concept found (colour, shape and size), its colour and
    shape found (any size), and the whole prompt holding (every object, relation and background)."""
    conditioner = CLIPConditioner.from_pipeline(pipe)
    concept_spec = parse_caption(concept_phrase)
    found, pair, whole = [], [], []
    for prompt in prompts:
        with torch.no_grad():
            cond = conditioner.encode(prompt, num_images_per_prompt=n)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        images = pipe(**cond.kwargs(), num_inference_steps=25, guidance_scale=5.0, generator=generators).images
        spec = parse_caption(prompt.replace(PLACEHOLDER, concept_phrase))
        for image in images:
            concept_scores = score(image, concept_spec)
            found.append(concept_scores["object_recall"])
            pair.append(concept_scores["colour_shape_binding"])
            whole.append(score(image, spec)["all_correct"])
    return {"concept": float(np.mean(found)), "colour_shape": float(np.mean(pair)), "all_correct": float(np.mean(whole))}


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


def scores_with_test_time(pipe, method, prompts: list[str], concept_phrase: str, args) -> dict[str, float]:
    """CoRe's test-time variant: per prompt, adjust the learned embedding for it, generate, restore."""
    trained = [table.new_rows.detach().clone() for table in method.embeddings]
    per_prompt = []
    for prompt in prompts:
        test_time_optimize(method, pipe, prompt, steps=10, lr=5e-4, seed=args.seed, write_back=True)
        per_prompt.append(generate_scores(pipe, [prompt], concept_phrase, args.n, args.seed))
        with torch.no_grad():
            for table, rows in zip(method.embeddings, trained):
                table.new_rows.copy_(rows)
    return {key: float(np.mean([scores[key] for scores in per_prompt])) for key in per_prompt[0]}


def row(identity: dict[str, float], alignment: dict[str, float]) -> dict:
    return {
        "identity": identity["concept"],
        "identity_colour_shape": identity["colour_shape"],
        "alignment_concept_found": alignment["concept"],
        "alignment_all_correct": alignment["all_correct"],
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
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
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
    print(f"concept: {concept_phrase}, {args.images} images, {args.steps} steps, {args.n} images per prompt")
    print(f"{'variant':16s} {'identity':>9s} {'identity: colour+shape':>23s} {'align: concept':>15s} {'align: all correct':>19s}")
    for name, scores in rows.items():
        print(f"{name:16s} {scores['identity']:9.3f} {scores['identity_colour_shape']:23.3f} "
              f"{scores['alignment_concept_found']:15.3f} {scores['alignment_all_correct']:19.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
