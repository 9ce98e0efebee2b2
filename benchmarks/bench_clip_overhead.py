"""condkit's inference path vs the plain pipeline: identical images, and the wall-time ratio.

Two conditioners are compared with the plain pipeline (prompt strings, diffusers encodes them):
- CLIPConditioner, the static path: its Conditioning goes in as keyword arguments;
- an identity projection with τ = 0 (ProjectedConditioner over a fresh WiCLP, which is the identity),
  the timestep-aware path: attach's hooks map the features in every UNet call.
Each round runs the three in rotating order with the same prompts, seeds and settings (encoding
included in the timed region). Prints the median ratio to the plain run of the same round.

    python benchmarks/bench_clip_overhead.py                 # embedded shapes-world model
    python benchmarks/bench_clip_overhead.py --model PATH    # any SD / SDXL pipeline folder
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from condkit import attach, load_conditioner, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, args.device, args.dtype)
    clip = load_conditioner("clip", pipe)
    identity_projection = load_conditioner("projected", pipe, projection="wiclp", switch_off_timestep=0)
    prompts = ["a red circle to the left of a blue square", "a small green triangle", "a large yellow diamond above a pink cross",
               "a purple circle on a gray background"][: args.images]
    prompts += prompts[0:1] * (args.images - len(prompts))
    negatives = ["blurry"] * len(prompts)
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")

    def seeds():
        return [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]

    def plain():
        return pipe(prompt=prompts, negative_prompt=negatives, generator=seeds(), **common).images

    def with_conditioner(conditioner):
        def run():
            with attach(pipe, conditioner):
                return pipe(**conditioner.encode(prompts, negatives).kwargs(), generator=seeds(), **common).images

        return run

    runs = {"plain pipeline": plain, "CLIPConditioner": with_conditioner(clip),
            "identity projection (hooks)": with_conditioner(identity_projection)}
    reference = plain()
    for name, run in list(runs.items())[1:]:
        assert np.array_equal(run(), reference), f"images differ between the plain pipeline and {name}"
    print("images identical: yes (both)")
    times: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(args.pairs):
        order = names[round_index % 3 :] + names[: round_index % 3]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
        for name in names:
            ratios[name].append(times[name][-1] / times["plain pipeline"][-1])
    print(f"device {pipe._execution_device}, {len(prompts)} images x {args.steps} steps, {args.pairs} rounds")
    for name in names:
        print(f"{name:28s} median {statistics.median(times[name]):.3f} s   ratio {statistics.median(ratios[name]):.4f}")
    print("target: ratio <= 1.01 for both")


if __name__ == "__main__":
    main()
