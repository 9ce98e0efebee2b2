"""Textual-inversion training: condkit vs diffusers' example script, steps/s and peak memory.

Both tools learn one new token ("<c>", 1 vector, initialised from "object") on the same few
shapes-world renders of one concept, with the same model (default: the embedded shapes world,
64x64), batch size, resolution, learning rate (constant, no warm-up), seed, fp32, no gradient
checkpointing, no validation and no intermediate checkpoints. Each run is its own subprocess:
condkit as `python -m condkit.cli train textual-inversion`, the peer as
`python textual_inversion.py` (diffusers' examples/textual_inversion/textual_inversion.py).

    python benchmarks/bench_textual_inversion.py --diffusers-repo PATH [--steps 100] [--repeats 3] [--json out.json]
    python benchmarks/bench_textual_inversion.py --peer-script PATH/textual_inversion.py
    python benchmarks/sd15_random_pipeline.py /tmp/sd15 && python benchmarks/bench_textual_inversion.py \
        --diffusers-repo PATH --model /tmp/sd15 --resolution 512 --batch-size 1 --steps 2 --repeats 2 \
        --also-gradient-checkpointing                     # SD1.5 scale: full architecture, random weights

The peer script is never part of this repository: it is read at run time from a diffusers git
directory or checkout (`git clone --depth 1 https://github.com/huggingface/diffusers`), or from
--peer-script, and copied into a temporary folder.

How it measures:
- steps/s: each tool runs at S and 2S steps; S / (wall(2S) - wall(S)) cancels everything that
  does not grow with the step count (interpreter start, imports, model load, condkit's one-off
  latent encoding, the final save), without relying on either tool's log format.
- peak memory: the maximum resident set size of the subprocess (os.wait4's rusage of that child
  alone), the larger of its two runs.
- Repeats interleave the tools, alternating which goes first, after one unmeasured warm-up run of
  each (file cache, first imports); the table shows medians over repeats.
- Both get the same OMP_NUM_THREADS / MKL_NUM_THREADS (--threads) and run offline
  (HF_HUB_OFFLINE=1); the peer gets no --push_to_hub and no --validation_prompt.

Differences that belong to the tools and are measured as such: the peer encodes every batch with
the VAE and randomly flips images (p=0.5), condkit encodes each image once and does not flip; the
peer trains the whole (resized) token table and copies the original rows back after every step,
condkit trains only the new row; condkit clips the gradient norm at 1.0 (its CLI default), the
peer does not clip. The peer logs to tensorboard (its default) only if tensorboard is installed.

torchvision shim: the peer imports `torchvision.transforms` and uses only
`transforms.RandomHorizontalFlip(p)` on PIL images. When torchvision is not importable (there is
no CPU wheel on some machines), a two-file stand-in `torchvision` package is written into the
temporary folder; it implements just that transform, as torchvision does (flip left-right when
torch.rand(1) < p). It cannot simply go on PYTHONPATH: transformers takes any importable
`torchvision` for the real one and then imports parts of it the stand-in lacks. So the peer's
subprocess runs through a small launcher, also written there, that first has transformers record
(in its cached availability check) that torchvision is absent, then puts the stand-in on sys.path
and runs the unmodified script with runpy as __main__. With torchvision installed, the script
runs directly with the real one. The output says which.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from condkit.shapes_world import MODEL_DIR
from condkit.shapes_world.concepts import concept_images, save_concept_images

PEER_PATH_IN_REPO = "examples/textual_inversion/textual_inversion.py"
HOW_TO_GET_PEER = (
    "bench_textual_inversion: error: the diffusers example script is needed; pass --diffusers-repo PATH to a diffusers "
    "git directory or checkout (git clone --depth 1 https://github.com/huggingface/diffusers) or --peer-script "
    f"PATH to its {PEER_PATH_IN_REPO}"
)
PLACEHOLDER = "<c>"
INITIALIZER = "object"
NEVER = 10**9  # a step interval no run reaches: no intermediate checkpoints or saves

STAND_IN_TRANSFORMS = '''"""Stand-in torchvision.transforms: RandomHorizontalFlip only."""
import torch
from PIL import Image


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        if torch.rand(1) < self.p:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image
'''

STAND_IN_LAUNCHER = '''"""Runs a script with the stand-in torchvision; written by bench_textual_inversion.py."""
import runpy
import sys

from transformers.utils import import_utils

import_utils.is_torchvision_available()  # cached as False before the stand-in becomes importable
sys.path.insert(1, STAND_IN_DIR)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@dataclass
class Settings:
    model: str
    images_dir: str
    batch_size: int
    resolution: int
    learning_rate: float
    seed: int
    threads: int


@dataclass
class Run:
    tool: str
    steps: int
    repeat: int
    wall_s: float
    max_rss_mib: float


def peer_script_source(args: argparse.Namespace) -> tuple[str, str]:
    """(the peer script's text, where it came from)."""
    if args.peer_script:
        script = Path(args.peer_script)
        if not script.is_file():
            sys.exit(f"bench_textual_inversion: error: --peer-script {str(script)!r} is not a file")
        return script.read_text(), str(script.resolve())
    repo = Path(args.diffusers_repo)
    checked_out = repo / PEER_PATH_IN_REPO
    if args.diffusers_ref is None and checked_out.is_file():
        return checked_out.read_text(), f"{checked_out.resolve()} (working tree; HEAD is {git_commit(repo, 'HEAD')})"
    ref = args.diffusers_ref or "HEAD"
    shown = subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{PEER_PATH_IN_REPO}"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        reason = shown.stderr.strip().splitlines()[-1] if shown.stderr.strip() else "git failed"
        sys.exit(f"bench_textual_inversion: error: cannot read {PEER_PATH_IN_REPO} at {ref} from {repo}: {reason}")
    return shown.stdout, f"{repo.resolve()} at {git_commit(repo, ref)}"


def prepare_workdir(args: argparse.Namespace, workdir: Path) -> tuple[list[str], bool, str, Path]:
    """Writes the peer script and the concept's images into `workdir`: (the peer's command start, whether it
    uses the torchvision stand-in, where the script came from, the images folder)."""
    peer_text, peer_origin = peer_script_source(args)
    peer_script = workdir / "peer" / "textual_inversion.py"
    peer_script.parent.mkdir()
    peer_script.write_text(peer_text)
    launch, stand_in = peer_launch(peer_script, workdir)
    images_dir = workdir / "images"
    size, colour, shape = args.concept.split()
    save_concept_images(concept_images(size, colour, shape, args.images, args.seed), images_dir)
    return launch, stand_in, peer_origin, images_dir


def git_commit(repo: Path, ref: str) -> str:
    found = subprocess.run(["git", "-C", str(repo), "rev-parse", ref], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "unknown commit"


def peer_launch(script: Path, folder: Path) -> tuple[list[str], bool]:
    """(the command that runs the peer script, whether it goes through the torchvision stand-in)."""
    if importlib.util.find_spec("torchvision") is not None:
        return [sys.executable, str(script)], False
    package = folder / "stand_in" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Stand-in torchvision written by bench_textual_inversion.py."""\n')
    (package / "transforms.py").write_text(STAND_IN_TRANSFORMS)
    launcher = script.parent / "run_with_stand_in_torchvision.py"
    launcher.write_text(STAND_IN_LAUNCHER.replace("STAND_IN_DIR)", f"{str(package.parent)!r})"))
    return [sys.executable, str(launcher), str(script)], True


def peer_command(launch: list[str], settings: Settings, steps: int, out_dir: Path) -> list[str]:
    return [
        *launch,
        "--pretrained_model_name_or_path", settings.model,
        "--train_data_dir", settings.images_dir,
        "--placeholder_token", PLACEHOLDER, "--initializer_token", INITIALIZER, "--num_vectors", "1",
        "--learnable_property", "object",
        "--resolution", str(settings.resolution),
        "--train_batch_size", str(settings.batch_size), "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(steps),
        "--learning_rate", str(settings.learning_rate), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--mixed_precision", "no",
        "--seed", str(settings.seed),
        "--checkpointing_steps", str(NEVER), "--save_steps", str(NEVER),
        "--dataloader_num_workers", "0",
        "--output_dir", str(out_dir),
    ]  # fmt: skip


def ours_command(settings: Settings, steps: int, out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "condkit.cli", "train", "textual-inversion",
        "--model", settings.model,
        "--images", settings.images_dir,
        "--placeholder", PLACEHOLDER, "--initializer", INITIALIZER, "--num-vectors", "1",
        "--templates", "object",
        "--resolution", str(settings.resolution),
        "--train-batch-size", str(settings.batch_size), "--gradient-accumulation-steps", "1",
        "--max-train-steps", str(steps),
        "--learning-rate", str(settings.learning_rate), "--lr-scheduler", "constant",
        "--mixed-precision", "no",
        "--seed", str(settings.seed),
        "--checkpointing-steps", str(NEVER),
        "--out", str(out_dir),
    ]  # fmt: skip


# condkit's variants besides its defaults: (name in the table, flags added to its command)
OURS_VARIANTS = {"ours": (), "ours-gc": ("--gradient-checkpointing",)}
TOOL_NAMES = {"peer": "diffusers example", "ours": "condkit", "ours-gc": "condkit --gradient-checkpointing"}


def run_measured(command: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> tuple[float, float]:
    """(wall seconds, max RSS in MiB) of one subprocess; exits with the log's tail if it fails."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        sys.exit(f"{tail}\nbench_textual_inversion: error: exit status {process.returncode} from: {' '.join(command)}")
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return wall, usage.ru_maxrss * rss_unit / 2**20


def child_environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def summarise(runs: list[Run], tool: str, steps: int) -> dict:
    """Median steps/s (from the S and 2S runs of each repeat), peak RSS and wall time of a tool."""
    mine = [run for run in runs if run.tool == tool]
    rates, peaks = [], []
    for repeat in sorted({run.repeat for run in mine}):
        short, long = (next(r for r in mine if r.repeat == repeat and r.steps == n) for n in (steps, 2 * steps))
        extra_time = long.wall_s - short.wall_s
        rates.append(steps / extra_time if extra_time > 0 else float("nan"))
        peaks.append(max(short.max_rss_mib, long.max_rss_mib))
    return {
        "steps_per_s": statistics.median(rates),
        "peak_rss_mib": statistics.median(peaks),
        "wall_s_short": statistics.median(r.wall_s for r in mine if r.steps == steps),
        "wall_s_long": statistics.median(r.wall_s for r in mine if r.steps == 2 * steps),
        "steps_per_s_each_repeat": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--diffusers-repo", default=None, help="a diffusers git directory or checkout")
    source.add_argument("--peer-script", default=None, help=f"a copy of diffusers' {PEER_PATH_IN_REPO}")
    parser.add_argument("--diffusers-ref", default=None,
                        help="read the script at this git ref (default: a checkout's working tree, else HEAD)")
    parser.add_argument("--model", default=str(MODEL_DIR),
                        help="SD-1.x-style pipeline folder (default: the embedded shapes world)")
    parser.add_argument("--steps", type=int, default=100, help="S: each tool runs at S and 2S steps (default: 100)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--images", type=int, default=6, help="concept images to train on (default: 6)")
    parser.add_argument("--concept", default="large orange diamond", help="SIZE COLOUR SHAPE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads for both tools (default: the CPUs this process may use)")
    parser.add_argument("--json", default=None, help="also write settings, every run and the summary here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary folder (logs, outputs)")
    parser.add_argument("--also-gradient-checkpointing", action="store_true",
                        help="also measure condkit with --gradient-checkpointing (less memory, slower)")
    args = parser.parse_args()
    if not (args.diffusers_repo or args.peer_script):
        sys.exit(HOW_TO_GET_PEER)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be positive")

    workdir = Path(tempfile.mkdtemp(prefix="bench-ti-"))
    try:
        launch, stand_in, peer_origin, images_dir = prepare_workdir(args, workdir)
        settings = Settings(model=str(Path(args.model).resolve()), images_dir=str(images_dir),
                            batch_size=args.batch_size, resolution=args.resolution,
                            learning_rate=args.learning_rate, seed=args.seed, threads=args.threads)
        env = child_environment(args.threads)

        def measure(tool: str, steps: int, label: str) -> tuple[float, float]:
            out_dir = workdir / "runs" / f"{tool}-{label}"
            if tool == "peer":
                command = peer_command(launch, settings, steps, out_dir)
            else:
                command = ours_command(settings, steps, out_dir) + list(OURS_VARIANTS[tool])
            return run_measured(command, env, workdir, workdir / "logs" / f"{tool}-{label}.log")

        (workdir / "logs").mkdir()
        tools = ("peer", "ours", "ours-gc") if args.also_gradient_checkpointing else ("peer", "ours")
        for tool in tools:
            measure(tool, 1, "warmup")
        runs = []
        for repeat in range(args.repeats):
            order = tools if repeat % 2 == 0 else tools[::-1]
            for steps in (args.steps, 2 * args.steps):
                for tool in order:
                    wall, rss = measure(tool, steps, f"{steps}steps-r{repeat}")
                    runs.append(Run(tool, steps, repeat, wall, rss))
                    print(f"  repeat {repeat + 1}/{args.repeats}  {tool:7s} {steps:5d} steps  {wall:7.2f} s  "
                          f"{rss:7.0f} MiB", flush=True)

        summary = {tool: summarise(runs, tool, args.steps) for tool in tools}
        ratios = {tool: {"speed_ours_over_peer": summary[tool]["steps_per_s"] / summary["peer"]["steps_per_s"],
                         "peak_memory_ours_over_peer": summary[tool]["peak_rss_mib"] / summary["peer"]["peak_rss_mib"]}
                  for tool in tools if tool != "peer"}
        print(f"\ntextual inversion on {settings.model}: {args.images} images at {args.resolution}px, batch "
              f"{args.batch_size}, lr {args.learning_rate} constant, 1 vector, fp32, {args.threads} threads; "
              f"{args.steps} and {2 * args.steps} steps, medians of {args.repeats} repeats")
        torchvision = "stand-in (RandomHorizontalFlip only)" if stand_in else "installed"
        print(f"peer: {peer_origin}; torchvision: {torchvision}")
        print(f"{'tool':34s} {'steps/s':>8s} {'peak RSS MiB':>13s} {f'wall {args.steps} s':>12s} "
              f"{f'wall {2 * args.steps} s':>12s}")
        for tool in tools:
            row = summary[tool]
            print(f"{TOOL_NAMES[tool]:34s} {row['steps_per_s']:8.3f} {row['peak_rss_mib']:13.0f} {row['wall_s_short']:12.2f} "
                  f"{row['wall_s_long']:12.2f}")
        for tool, ratio in ratios.items():
            speed, memory = ratio["speed_ours_over_peer"], ratio["peak_memory_ours_over_peer"]
            print(f"{TOOL_NAMES[tool]} / peer: speed {speed:.2f}x (goal >= 1.3x: {'met' if speed >= 1.3 else 'missed'}), "
                  f"peak memory {memory:.2f}x (goal <= 0.8x: {'met' if memory <= 0.8 else 'missed'})")
        if any(math.isnan(rate) for row in summary.values() for rate in row["steps_per_s_each_repeat"]):
            print(f"note: in some repeat {2 * args.steps} steps took no longer than {args.steps} (nan); "
                  "raise --steps")
        if args.json:
            report = {
                "settings": {**asdict(settings), "steps": args.steps, "repeats": args.repeats, "images": args.images,
                             "concept": args.concept, "placeholder": PLACEHOLDER, "initializer": INITIALIZER},
                "peer_script": peer_origin,
                "torchvision": torchvision,
                "environment": {"python": platform.python_version(), "platform": platform.platform(),
                                **{name: installed_version(name)
                                   for name in ("torch", "diffusers", "transformers", "accelerate")}},
                "runs": [asdict(run) for run in runs],
                "summary": summary,
                "ratios": ratios,
            }
            Path(args.json).write_text(json.dumps(report, indent=2))
    finally:
        if args.keep_workdir:
            print(f"logs and outputs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
