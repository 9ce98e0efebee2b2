"""`condkit generate` speed on the embedded model: 4 images, 25 steps, CFG, after imports.

Times what the CLI does once Python has imported its modules — load the pipeline, encode, denoise,
decode, write PNG + JSON — over repeated runs, and prints the medians (target: ≤ 5 s on 2 CPU
cores).

    python benchmarks/bench_generate_speed.py [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from condkit import load_pipeline
from condkit.conditioning.clip import CLIPConditioner
from condkit.embedded import NAME
from condkit.pipelines.generate import GenerationSettings, PromptRequest, describe_run, generate, save_results

PROMPTS = ["a red circle", "a blue square to the left of a yellow triangle", "a small green diamond", "a pink cross above a cyan circle"]


def one_run(out_dir: str) -> tuple[float, float]:
    start = time.perf_counter()
    pipe = load_pipeline(None, "cpu", "float32")  # None: the embedded model
    loaded = time.perf_counter()
    settings = GenerationSettings(steps=25, guidance=5.0, seed=0, batch_size=4)
    results = generate(pipe, CLIPConditioner.from_pipeline(pipe), [PromptRequest(p) for p in PROMPTS], settings)
    save_results(results, out_dir, describe_run(pipe, "clip", NAME, settings))
    return loaded - start, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    one_run(tempfile.mkdtemp())  # warm-up: first-call kernel selection, file cache
    loads, totals = zip(*(one_run(tempfile.mkdtemp()) for _ in range(args.runs)))
    print(f"{args.runs} runs, {args.threads} threads, 4 images x 25 steps with CFG")
    print(f"load pipeline      median {statistics.median(loads):.2f} s")
    print(f"load+generate+save median {statistics.median(totals):.2f} s  (target <= 5 s)")


if __name__ == "__main__":
    main()
