"""`condkit generate` on 2 processes × 1 thread against 1 process × 1 thread, on the embedded model.

Each run is the whole command a user types (interpreter start, imports, pipeline load, generation,
PNG + JSON + grid), so the ratio counts the start-up every process pays. Prints the median seconds
of each over repeated runs and the throughput ratio (goal ≥ 1.8×), and checks that both wrote the
same bytes.

    python benchmarks/bench_generate_processes.py [--runs 3] [--images 48] [--steps 25]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red circle", "a blue square to the left of a yellow triangle", "a small green diamond", "a pink cross above a cyan circle"]


def timed_run(launcher: list[str], out: Path, images: int, steps: int) -> float:
    prompts = [argument for prompt in PROMPTS for argument in ("--prompt", prompt)]
    command = [*launcher, "-m", "condkit", "generate", *prompts, "--num-images", str(images // len(PROMPTS)),
               "--steps", str(steps), "--guidance", "5", "--batch-size", "4", "--out", str(out), "--quiet"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, env=environment, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    launchers = {"1 x 1 thread": [sys.executable],
                 "2 x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]}
    seconds: dict[str, list[float]] = {label: [] for label in launchers}
    folders: dict[str, list[Path]] = {label: [] for label in launchers}
    for _ in range(args.runs):
        for label, launcher in launchers.items():
            folders[label].append(Path(tempfile.mkdtemp()) / "out")
            seconds[label].append(timed_run(launcher, folders[label][-1], args.images, args.steps))
    same = all((a / name).read_bytes() == (b / name).read_bytes()
               for a, b in zip(*folders.values()) for name in os.listdir(a))
    single, double = (statistics.median(values) for values in seconds.values())
    print(f"{args.runs} runs, {args.images} images x {args.steps} steps with CFG, embedded model, whole command")
    print(f"1 process  x 1 thread  median {single:.1f} s  ({args.images / single:.2f} images/s)")
    print(f"2 processes x 1 thread median {double:.1f} s  ({args.images / double:.2f} images/s)")
    print(f"throughput ratio {single / double:.2f}x  (goal >= 1.8x); identical files: {same}")


if __name__ == "__main__":
    main()
