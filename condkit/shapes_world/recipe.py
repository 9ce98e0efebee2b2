"""The training recipe of the shapes world's embedded pipeline.

    train_world("runs/world", scale="full")

runs the stages tokenizer → clip → vae → unet → decoder → assemble. Each trained stage runs on
condkit's training loop in its own folder under `out_dir` (see stage_runner): it checkpoints
atomically and resumes exactly from its latest checkpoint; a finished stage (one with done.json)
is skipped; resume=False starts every stage asked for over. The decoder stage sharpens the VAE
decoder with the encoder (and so the UNet's latent space) frozen; assemble uses its VAE when that
stage has run, the VAE stage's otherwise.

"tiny" runs every stage for a few steps on tiny models (for tests). "full" writes the shipped
pipeline folder condkit/shapes_world/model/. The shipped model was trained by the first full recipe
(CLIP 2000 steps ~35 min, VAE ~15 min, UNet 8000 steps ~95 min, decoder ~12 min on two CPU cores).
The full recipe now fixes what issue 18 measured as limiting it; its first run is in progress
(runs/world-v2, carried by commits; stage numbers in docs/results.md):
- CLIP: two hard negatives per image (NegCLIP swaps of colours, of shapes between objects, a shape
  changed, a relation flipped; each checked to describe another scene), not one;
- VAE: small objects' pixels weighted up to 5× (`small_object_weight`), since the VAE alone lost
  every small cross; it still loses them (drawn as four-pointed stars), and neither 8 latent
  channels nor weighting the decoder stage 17× (`DecoderScale.small_object_weight`) held them in
  trials, so both stay off (benchmarks/vae_shapes_by_size.py, docs/results.md);
- UNet: two ResNet/attention layers per level, channels (32, 96, 128): 6.5M parameters instead of
  5.7M and twice the depth, keeping the folder near 38 MB (of 40); 8000 steps, 10% caption dropout (the
  unconditional classifier-free guidance needs, as before).
Per-step cost against the first recipe, timed interleaved on this machine (idle): CLIP 1.28 s with
one negative, 1.86 s with two, 2.74 s with three (the text tower encodes every negative); VAE +5%
(the weights); UNet ×1.08 (×1.37 on a shared CPU). Estimated: CLIP ~62 min, VAE ~16, UNet ~105,
decoder ~12 — about 3 h 15 min in all (three negatives would add half an hour).

CLIP trains for 2000 steps because the UNet can only draw what the text encoder tells apart: at
500 steps it preferred a caption over a shape-changed one 59% of the time (colour 78%), and the
UNet trained on it drew every shape as the same blob; at 2000 steps, 72% (colour 86%).

A stage's learning rate warms up and then decays linearly to zero over its steps, so a checkpoint
only resumes a run of the same length (a resume with other steps is refused, naming them). To train
a stage for more steps, raise them here and start it over: `condkit world train --stages
STAGE,assemble --no-resume` (and the stages after it, which build on its output).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel

from . import MODEL_DIR
from .assemble import build_pipeline, folder_size_mb, save_pipeline, text_encoder_from_clip
from .dataset import world_words
from .model_card import model_card
from .stage_runner import mark_done, read_report, start_over, write_json
from .tokenizer import build_tokenizer, load_tokenizer
from .train_clip import ClipScale, train_clip
from .train_decoder import DecoderScale, train_decoder
from .train_unet import UnetScale, train_unet
from .train_vae import VaeScale, train_vae
from .world_data import render_pool

STAGES: tuple[str, ...] = ("tokenizer", "clip", "vae", "unet", "decoder", "assemble")
RESOLUTION = 64

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipeScale:
    pool_size: int
    held_out_size: int
    clip: ClipScale
    vae: VaeScale
    unet: UnetScale
    decoder: DecoderScale


SCALES: dict[str, RecipeScale] = {
    "tiny": RecipeScale(
        pool_size=64,
        held_out_size=32,
        clip=ClipScale(
            width=32, layers=1, heads=2, steps=4, batch_size=8, learning_rate=1e-3, checkpoint_every=2,
            negatives_per_image=3,
        ),  # fmt: skip
        vae=VaeScale(
            channels=(8, 16, 16), steps=4, batch_size=4, learning_rate=1e-3, kl_weight=1e-6, checkpoint_every=2,
            scored_images=4, small_object_weight=4.0,
        ),  # fmt: skip
        unet=UnetScale(
            channels=(32, 32, 32), attention_levels=(False, True, True), attention_head_dim=8,
            steps=4, batch_size=4, learning_rate=1e-3, ema_decay=0.9, checkpoint_every=2, layers_per_block=2,
        ),  # fmt: skip
        decoder=DecoderScale(steps=4, batch_size=4, learning_rate=1e-3, checkpoint_every=2, scored_images=4),
    ),
    "full": RecipeScale(
        pool_size=30_000,
        held_out_size=1024,
        clip=ClipScale(
            width=128, layers=4, heads=4, steps=2000, batch_size=96, learning_rate=5e-4, checkpoint_every=50,
            negatives_per_image=2,
        ),  # fmt: skip
        vae=VaeScale(
            channels=(16, 32, 64), steps=2000, batch_size=32, learning_rate=1e-3, kl_weight=1e-6, checkpoint_every=100,
            scored_images=200, small_object_weight=4.0,
        ),  # fmt: skip
        unet=UnetScale(
            channels=(32, 96, 128), attention_levels=(False, True, True), attention_head_dim=32,
            steps=8000, batch_size=32, learning_rate=3e-4, ema_decay=0.999, checkpoint_every=100, layers_per_block=2,
        ),  # fmt: skip
        decoder=DecoderScale(steps=1000, batch_size=32, learning_rate=3e-4, checkpoint_every=100, scored_images=200),
    ),
}


def _check_arguments(scale: str, stages: tuple[str, ...]) -> None:
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r}; expected one of {sorted(SCALES)}.")
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown}; expected a subset of {list(STAGES)}.")


def _require(folder: Path, stage: str) -> Path:
    if not folder.exists():
        raise FileNotFoundError(f"Stage {stage!r} has no output at {str(folder)!r}; run that stage first.")
    return folder


def _load(model_class: type, out_dir: Path, stage: str):
    return model_class.from_pretrained(_require(out_dir / stage / "final", stage))


def _stage(stage_dir: Path, resume: bool, run: Callable[[Path], dict]) -> dict:
    """The report of a finished stage when resuming; otherwise run (or resume) it and mark it done."""
    if not resume:
        start_over(stage_dir)
    report = read_report(stage_dir)
    if report is None:
        report = run(stage_dir)
        mark_done(stage_dir, report)
    return report


def train_world(
    out_dir: str | Path,
    *,
    scale: str = "full",
    stages: tuple[str, ...] = STAGES,
    resume: bool = True,
    seed: int = 0,
    model_dir: str | Path | None = None,
) -> Path:
    """Train the shapes world's pipeline and return the folder of the assembled pipeline.

    model_dir defaults to the shipped folder (condkit/shapes_world/model) for scale="full" and
    to out_dir/model for any other scale, so test runs never overwrite the shipped model.
    """
    stages = tuple(stages)
    _check_arguments(scale, stages)
    recipe = SCALES[scale]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = MODEL_DIR if scale == "full" else out_dir / "model"
    model_dir = Path(model_dir)
    torch.set_num_threads(2)

    tokenizer_dir = out_dir / "tokenizer"
    if "tokenizer" in stages and not (resume and (tokenizer_dir / "vocab.json").is_file()):
        build_tokenizer(world_words(), tokenizer_dir)

    needs_data = any(stage in stages for stage in ("clip", "vae", "unet", "decoder"))
    if needs_data:
        tokenizer = load_tokenizer(_require(tokenizer_dir, "tokenizer"))
        pool = render_pool(recipe.pool_size, seed, out_dir / "data", resolution=RESOLUTION)
        held_out = render_pool(
            recipe.held_out_size, seed + 1, out_dir / "data", resolution=RESOLUTION
        )
    reports: dict[str, dict] = {}
    trained: dict[str, Callable[[Path], dict]] = {
        "clip": lambda folder: train_clip(folder, tokenizer, pool, held_out, recipe.clip, seed=seed),
        "vae": lambda folder: train_vae(folder, pool, held_out, recipe.vae, seed=seed),
        "unet": lambda folder: train_unet(
            folder, tokenizer, text_encoder_from_clip(_load(CLIPModel, out_dir, "clip")),
            _load(AutoencoderKL, out_dir, "vae"), pool, recipe.unet, seed=seed,
        ),
        "decoder": lambda folder: train_decoder(
            folder, _load(AutoencoderKL, out_dir, "vae"), pool, held_out, recipe.decoder, seed=seed
        ),
    }  # fmt: skip
    for stage, run in trained.items():
        if stage in stages:
            reports[stage] = _stage(out_dir / stage, resume, run)
    if "assemble" in stages:
        tokenizer = load_tokenizer(_require(tokenizer_dir, "tokenizer"))
        clip = _load(CLIPModel, out_dir, "clip")
        decoder_dir = out_dir / "decoder" / "final"
        vae_dir = decoder_dir if decoder_dir.is_dir() else _require(out_dir / "vae" / "final", "vae")
        vae = AutoencoderKL.from_pretrained(vae_dir)
        unet = _load(UNet2DConditionModel, out_dir, "unet")
        card = model_card(asdict(recipe), {stage: read_report(out_dir / stage) for stage in trained})
        save_pipeline(build_pipeline(tokenizer, clip, vae, unet), clip, model_dir, card)
        reports["assemble"] = {"model_dir": str(model_dir), "vae": str(vae_dir), "size_mb": folder_size_mb(model_dir)}
    if reports:
        summary = {"scale": scale, "seed": seed, "recipe": asdict(recipe), "reports": reports}
        write_json(out_dir / f"report-{'-'.join(reports)}.json", summary)
        logger.info("stage reports: %s", json.dumps(reports))
    return model_dir
