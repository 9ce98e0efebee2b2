"""CLIPConditioner vs the plain pipeline: identical images, and the wall-time ratio.

Each pair runs the pipeline twice with the same prompts, seeds and settings — once with prompt
strings (diffusers encodes them), once with CLIPConditioner's Conditioning (encoding included in
the timed region) — in alternating order. Prints the median ratio over the pairs.

    python benchmarks/bench_clip_overhead.py                 # embedded shapes-world model
    python benchmarks/bench_clip_overhead.py --model PATH    # any SD / SDXL pipeline folder
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from condkit.conditioning.clip import CLIPConditioner
from condkit.pipelines.loading import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, args.device, args.dtype)
    conditioner = CLIPConditioner.from_pipeline(pipe)
    prompts = ["a red circle to the left of a blue square", "a small green triangle", "a large yellow diamond above a pink cross",
               "a purple circle on a gray background"][: args.images]
    prompts += prompts[0:1] * (args.images - len(prompts))
    negatives = ["blurry"] * len(prompts)
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")

    def seeds():
        return [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]

    def plain():
        return pipe(prompt=prompts, negative_prompt=negatives, generator=seeds(), **common).images

    def ours():
        with torch.no_grad():
            cond = conditioner.encode(prompts, negatives)
        return pipe(**cond.kwargs(), generator=seeds(), **common).images

    assert np.array_equal(plain(), ours()), "images differ between the plain pipeline and CLIPConditioner"
    print("images identical: yes")
    ratios, plain_times, our_times = [], [], []
    for pair in range(args.pairs):
        order = (plain, ours) if pair % 2 == 0 else (ours, plain)
        timings = {}
        for run in order:
            start = time.perf_counter()
            run()
            timings[run] = time.perf_counter() - start
        plain_times.append(timings[plain])
        our_times.append(timings[ours])
        ratios.append(timings[ours] / timings[plain])
    print(f"device {pipe._execution_device}, {len(prompts)} images x {args.steps} steps, {args.pairs} pairs")
    print(f"plain pipeline   median {statistics.median(plain_times):.3f} s")
    print(f"CLIPConditioner  median {statistics.median(our_times):.3f} s")
    print(f"ratio (ours / plain), median of pairs: {statistics.median(ratios):.4f}  (target <= 1.02)")


if __name__ == "__main__":
    main()
