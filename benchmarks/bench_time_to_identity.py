"""Time to identity: steps and seconds until a learned token draws the concept, condkit vs diffusers' example.

Both tools learn "<c>" (1 vector, from "object") on the same 6 shapes-world renders of one concept, on
the embedded shapes world, each as its own subprocess, saving the token every --every steps (condkit:
`--checkpointing-steps`, the peer: `--save_steps`). Each saved token is then scored as
benchmarks/personalization.py scores identity: "<c>" and "a picture of <c>", --n images each
(25 steps, CFG 5, seeds 0..n-1), the pixel scorer asked whether the concept's colour and shape are
drawn (identity colour+shape) and also its size (identity full). "Time" is when the save's file was
written, counted from the subprocess's start (interpreter, imports, loading, one-off encoding, all
included). Two recipes:

- same: both tools with the same batch (4), learning rate (5e-3, constant), resolution, seed;
- own: each tool as its documentation runs it, the peer with its README's recipe (batch 1, gradient
  accumulation 4, lr 5e-4 with --scale_lr, so 2e-3), condkit with its defaults (batch 4, lr 5e-3).

    python benchmarks/bench_time_to_identity.py --diffusers-repo PATH [--recipe same|own] [--steps 400] [--every 25]

The peer script is read at run time from a diffusers checkout, as in bench_textual_inversion.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_textual_inversion import INITIALIZER, PLACEHOLDER, child_environment, prepare_workdir  # noqa: E402
from personalization import IDENTITY_PROMPTS, generate_scores  # noqa: E402

from condkit import load_pipeline  # noqa: E402
from condkit.conditioning.embedding_formats import LearnedEmbedding  # noqa: E402
from condkit.conditioning.embeddings import load_embedding  # noqa: E402
from condkit.shapes_world import MODEL_DIR  # noqa: E402

TARGET = 0.75
RECIPES = {
    "same": {"peer": dict(batch=4, accumulation=1, lr=5e-3, scale_lr=False), "ours": dict(batch=4, lr=5e-3)},
    "own": {"peer": dict(batch=1, accumulation=4, lr=5e-4, scale_lr=True), "ours": dict(batch=4, lr=5e-3)},
}


@dataclass
class Save:
    tool: str
    step: int
    seconds: float
    identity_colour_shape: float
    identity_full: float


def peer_command(launch: list[str], recipe: dict, args, images: Path, out: Path) -> list[str]:
    command = [
        *launch, "--pretrained_model_name_or_path", str(MODEL_DIR), "--train_data_dir", str(images),
        "--placeholder_token", PLACEHOLDER, "--initializer_token", INITIALIZER, "--num_vectors", "1",
        "--learnable_property", "object", "--resolution", "64",
        "--train_batch_size", str(recipe["batch"]), "--gradient_accumulation_steps", str(recipe["accumulation"]),
        "--max_train_steps", str(args.steps), "--learning_rate", str(recipe["lr"]),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", "no", "--seed", str(args.seed),
        "--checkpointing_steps", str(10**9), "--save_steps", str(args.every), "--dataloader_num_workers", "0",
        "--output_dir", str(out),
    ]  # fmt: skip
    return command + (["--scale_lr"] if recipe["scale_lr"] else [])


def ours_command(recipe: dict, args, images: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "condkit.cli", "train", "textual-inversion", "--images", str(images),
        "--placeholder", PLACEHOLDER, "--initializer", INITIALIZER, "--num-vectors", "1", "--templates", "object",
        "--resolution", "64", "--train-batch-size", str(recipe["batch"]), "--max-train-steps", str(args.steps),
        "--learning-rate", str(recipe["lr"]), "--lr-scheduler", "constant", "--mixed-precision", "no",
        "--seed", str(args.seed), "--checkpointing-steps", str(args.every), "--out", str(out), "--quiet",
    ]  # fmt: skip


def run_timed(command: list[str], env: dict, cwd: Path, log: Path) -> float:
    """Starts the subprocess and waits; returns its start time (time.time) for the saves' mtimes."""
    with open(log, "w") as handle:
        start = time.time()
        finished = subprocess.run(command, env=env, cwd=cwd, stdout=handle, stderr=handle.fileno())
    if finished.returncode != 0:
        sys.exit("\n".join(log.read_text(errors="replace").splitlines()[-20:]) + f"\nexit status {finished.returncode}")
    return start


def peer_saves(out: Path) -> list[tuple[int, Path]]:
    return sorted((int(path.stem.rsplit("-", 1)[1]), path) for path in out.glob("learned_embeds-steps-*.safetensors"))


def ours_saves(out: Path) -> list[tuple[int, Path]]:
    found = [(int(folder.name.split("-")[1]), folder / "trainable.safetensors")
             for folder in (out / "checkpoints").glob("step-*")]
    return sorted(found)


def vector(tool: str, path: Path) -> torch.Tensor:
    tensors = load_file(path)
    return tensors[PLACEHOLDER] if tool == "peer" else tensors["embeddings.0.new_rows"]


def identity(vector_: torch.Tensor, concept_phrase: str, n: int, seed: int) -> dict[str, float]:
    pipe = load_pipeline(None, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    load_embedding(pipe, LearnedEmbedding(PLACEHOLDER, [vector_.reshape(1, -1)]))
    return generate_scores(pipe, IDENTITY_PROMPTS, concept_phrase, n, seed)


def first_reaching(saves: list[Save], key: str) -> Save | None:
    return next((save for save in saves if getattr(save, key) >= TARGET), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers-repo", default=None)
    source.add_argument("--peer-script", default=None)
    parser.add_argument("--diffusers-ref", default=None)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="same")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--n", type=int, default=8, help="images per identity prompt (default: 8)")
    parser.add_argument("--concept", default="large orange diamond")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.steps < 1 or args.every < 1 or args.every > args.steps:
        parser.error("--steps and --every must be positive, --every at most --steps")

    workdir = Path(tempfile.mkdtemp(prefix="bench-identity-"))
    try:
        launch, _, peer_origin, images = prepare_workdir(args, workdir)
        env = child_environment(args.threads)
        recipe = RECIPES[args.recipe]
        torch.set_num_threads(args.threads)

        results: dict[str, list[Save]] = {}
        for tool in ("peer", "ours"):
            out = workdir / tool
            command = (peer_command(launch, recipe["peer"], args, images, out) if tool == "peer"
                       else ours_command(recipe["ours"], args, images, out))
            start = run_timed(command, env, workdir, workdir / f"{tool}.log")
            saves = peer_saves(out) if tool == "peer" else ours_saves(out)
            results[tool] = []
            for step, path in saves:
                scores = identity(vector(tool, path), f"a {args.concept}", args.n, args.seed)
                save = Save(tool, step, path.stat().st_mtime - start, scores["colour_shape"], scores["concept"])
                results[tool].append(save)
                print(f"  {tool:4s} step {step:5d}  {save.seconds:7.1f} s  identity colour+shape "
                      f"{save.identity_colour_shape:.3f}  full {save.identity_full:.3f}", flush=True)

        print(f"\ntime to identity {TARGET} on '{args.concept}' ({args.images} images, 64 px, recipe '{args.recipe}': "
              f"peer {recipe['peer']}, condkit {recipe['ours']}; {args.n} images per prompt, {args.threads} threads)")
        print(f"peer: {peer_origin}")
        summary = {}
        for key, label in (("identity_colour_shape", "colour+shape"), ("identity_full", "full")):
            reached = {tool: first_reaching(results[tool], key) for tool in results}
            summary[key] = {tool: (asdict(save) if save else None) for tool, save in reached.items()}
            cells = [f"{tool} " + (f"step {save.step} at {save.seconds:.1f} s" if save else f"not within {args.steps} steps")
                     for tool, save in reached.items()]
            ratio = (reached["peer"].seconds / reached["ours"].seconds
                     if reached["peer"] and reached["ours"] else None)
            summary[key]["seconds_peer_over_ours"] = ratio
            shown = f"{ratio:.2f}x faster (goal >= 2x: {'met' if ratio >= 2 else 'missed'})" if ratio else "no ratio"
            print(f"identity {label:13s}: {'; '.join(cells)}; condkit {shown}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "peer_script": peer_origin,
                                                   "saves": {t: [asdict(s) for s in v] for t, v in results.items()},
                                                   "summary": summary}, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
