"""`condkit` command line: generate | eval | world | train | convert.

Errors a user can cause print one line, `condkit: error: ...`, and exit with status 2; set
CONDKIT_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or local pipeline folder (default: the embedded shapes-world model)")
    parser.add_argument("--conditioner", default="clip", help="conditioner name (see `condkit generate --list-conditioners`)")
    parser.add_argument("--clip-skip", type=int, default=None, help="CLIP layers to skip from the end, as diffusers' clip_skip")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on CUDA, else float32)")


def _add_sampling_options(parser: argparse.ArgumentParser, steps: int, guidance: float) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k (default: 0)")
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    parser.add_argument("--guidance", type=float, default=guidance, help=f"classifier-free guidance scale (default: {guidance})")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default: 4)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="condkit", description="Swappable text conditioning for diffusers pipelines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images from prompts", description="Generate images from prompts.")
    prompts = generate.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several); A1111 syntax")
    prompts.add_argument("--prompts-file", default=None, help="a .txt file (one prompt per line) or .jsonl ({\"prompt\", \"negative_prompt\", \"seed\"})")
    generate.add_argument("--negative", action="append", default=None, help="negative prompt: one for all prompts, or one per --prompt")
    generate.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    generate.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    generate.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    generate.add_argument("--list-conditioners", action="store_true", help="list conditioner names and exit")
    _add_model_options(generate)
    _add_sampling_options(generate, steps=25, guidance=7.5)
    generate.set_defaults(handler=run_generate)

    evaluate = commands.add_parser("eval", help="score a conditioner on shapes-world prompt sets",
                                   description="Generate N images per prompt of a shapes-world prompt set and score them with the exact pixel scorer.")
    evaluate.add_argument("--prompt-set", default="short", help="short, compositional, long, or a .jsonl file of {prompt, spec} (default: short)")
    evaluate.add_argument("-n", "--images-per-prompt", type=int, default=4, help="images per prompt (default: 4)")
    evaluate.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    evaluate.add_argument("--out", default=None, help="folder for eval.json and grid.png (default: outputs/eval-SET-CONDITIONER)")
    _add_model_options(evaluate)
    _add_sampling_options(evaluate, steps=25, guidance=5.0)
    evaluate.set_defaults(handler=run_eval)

    world = commands.add_parser("world", help="the embedded shapes world")
    world_commands = world.add_subparsers(dest="world_command", required=True, metavar="WORLD_COMMAND")
    train_world = world_commands.add_parser("train", help="train the shapes-world pipeline (resumable)",
                                            description="Train the shapes world's pipeline: tokenizer → clip → vae → unet → assemble.")
    train_world.add_argument("--out", default="runs/world", help="checkpoint folder (default: runs/world)")
    train_world.add_argument("--model-dir", default=None, help="where to write the pipeline (default: the shipped model folder)")
    train_world.add_argument("--scale", default="full", choices=("full", "tiny"), help="full recipe or a tiny smoke run")
    train_world.add_argument("--stages", default=None, help="comma-separated subset of tokenizer,clip,vae,unet,assemble")
    train_world.add_argument("--seed", type=int, default=0)
    train_world.add_argument("--no-resume", action="store_true", help="start over instead of resuming checkpoints")
    train_world.add_argument("--quiet", action="store_true", help="no progress bars")
    train_world.set_defaults(handler=run_world_train)
    return parser


def run_generate(args: argparse.Namespace) -> None:
    from condkit.conditioning.base import available_conditioners, get_conditioner_class
    from condkit.pipelines.generate import GenerationSettings, PromptRequest, check_writable, describe_run, generate, save_results
    from condkit.pipelines.loading import load_pipeline
    from condkit.pipelines.prompts_file import read_prompts_file

    if args.list_conditioners:
        print("\n".join(available_conditioners()))
        return
    requests = _requests_from_args(args, PromptRequest, read_prompts_file)
    settings = GenerationSettings(
        steps=args.steps, guidance=args.guidance, seed=args.seed, num_images_per_prompt=args.num_images,
        batch_size=args.batch_size, height=args.height, width=args.width,
    )
    conditioner_class = get_conditioner_class(args.conditioner)
    out_dir = check_writable(args.out)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    conditioner = conditioner_class.from_pipeline(pipe, **_conditioner_options(args))
    results = generate(pipe, conditioner, requests, settings, progress=not args.quiet)
    run = describe_run(pipe, args.conditioner, args.model or "condkit:shapes-world", settings)
    paths = save_results(results, out_dir, run, grid=not args.no_grid)
    if not args.quiet:
        print(f"wrote {len(paths)} image(s) to {out_dir}")


def run_eval(args: argparse.Namespace) -> None:
    from condkit.conditioning.base import get_conditioner_class
    from condkit.pipelines.evaluate import evaluate_prompt_set, load_captions, table_text, write_report
    from condkit.pipelines.generate import GenerationSettings, check_writable, describe_run
    from condkit.pipelines.loading import load_pipeline

    if args.images_per_prompt <= 0:
        raise ValueError(f"-n/--images-per-prompt must be a positive integer, got {args.images_per_prompt}")
    load_captions(args.prompt_set)
    settings = GenerationSettings(steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                                  height=args.height, width=args.width, num_images_per_prompt=args.images_per_prompt)
    conditioner_class = get_conditioner_class(args.conditioner)
    out_dir = check_writable(args.out or f"outputs/eval-{Path(args.prompt_set).stem}-{args.conditioner}")
    pipe = load_pipeline(args.model, args.device, args.dtype)
    conditioner = conditioner_class.from_pipeline(pipe, **_conditioner_options(args))
    report = evaluate_prompt_set(pipe, conditioner, args.prompt_set, args.images_per_prompt, settings,
                                 progress=not args.quiet, limit=args.limit)
    run = describe_run(pipe, args.conditioner, args.model or "condkit:shapes-world", settings)
    path = write_report(report, out_dir, {**run, "prompt_set": args.prompt_set})
    print(table_text(report))
    if not args.quiet:
        print(f"wrote {path} and {path.parent / 'grid.png'}")


def run_world_train(args: argparse.Namespace) -> None:
    from condkit.shapes_world.recipe import STAGES, train_world

    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    model_dir = train_world(args.out, scale=args.scale, stages=stages, resume=not args.no_resume, seed=args.seed,
                            progress=not args.quiet, model_dir=args.model_dir)
    print(f"pipeline written to {model_dir}")


def _requests_from_args(args: argparse.Namespace, PromptRequest: Any, read_prompts_file: Callable) -> list:
    if args.prompts_file:
        if args.negative:
            raise ValueError("--negative cannot be combined with --prompts-file; put negative_prompt in the JSONL lines")
        return read_prompts_file(args.prompts_file)
    if not args.prompt:
        raise ValueError("no prompt given; use --prompt TEXT or --prompts-file FILE")
    negatives = args.negative or []
    if len(negatives) == 1:
        negatives = negatives * len(args.prompt)
    elif negatives and len(negatives) != len(args.prompt):
        raise ValueError(f"got {len(negatives)} --negative values for {len(args.prompt)} prompts; expected 1 or {len(args.prompt)}")
    return [PromptRequest(prompt, negatives[i] if negatives else None) for i, prompt in enumerate(args.prompt)]


def _conditioner_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"clip_skip": args.clip_skip} if args.clip_skip is not None else {}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore")
    try:
        args.handler(args)
    except USER_ERRORS as error:
        if os.environ.get("CONDKIT_DEBUG"):
            raise
        print(f"condkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("condkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
