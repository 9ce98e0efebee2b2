"""A StableDiffusion 1.5-architecture pipeline folder with random weights, built from configs (no download).

The UNet, VAE and text encoder have SD1.5's exact shapes (UNet 860M parameters, VAE 84M, CLIP ViT-L/14
text tower 123M with a 49,408-row token table), so memory and time per step are those of SD1.5; the
images are noise. No CLIP vocabulary can be downloaded here, so the tokenizer is the shapes world's
BPE with filler entries up to CLIP's 49,408 ids, its two special tokens last (49406, 49407) as in CLIP;
the fillers are never produced from text, they only give the table its real size.

    python benchmarks/sd15_random_pipeline.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from condkit.shapes_world import MODEL_DIR

CLIP_VOCAB_SIZE = 49408
BOS_ID, EOS_ID = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_CONFIG = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": EOS_ID,
}

SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def clip_sized_tokenizer(folder: Path):
    """The shapes world's CLIPTokenizer with its vocabulary padded to CLIP's 49,408 ids, specials last."""
    from transformers import CLIPTokenizer

    source = json.loads((MODEL_DIR / "tokenizer" / "tokenizer.json").read_text())
    vocab = source["model"]["vocab"]
    specials = {token["content"]: token for token in source["added_tokens"]}
    words = [word for word, _ in sorted(vocab.items(), key=lambda item: item[1]) if word not in specials]
    fillers = [f"<filler{index}>" for index in range(CLIP_VOCAB_SIZE - 2 - len(words))]
    new_ids = {word: index for index, word in enumerate(words + fillers)}
    new_ids |= {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
    source["model"]["vocab"] = new_ids
    for token in source["added_tokens"]:
        token["id"] = new_ids[token["content"]]
    source["post_processor"]["cls"] = ["<|startoftext|>", BOS_ID]
    source["post_processor"]["sep"] = ["<|endoftext|>", EOS_ID]
    with tempfile.TemporaryDirectory() as staging:
        (Path(staging) / "tokenizer.json").write_text(json.dumps(source))
        config = json.loads((MODEL_DIR / "tokenizer" / "tokenizer_config.json").read_text())
        (Path(staging) / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = CLIPTokenizer.from_pretrained(staging)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"padded tokenizer has {len(tokenizer)} ids, expected {CLIP_VOCAB_SIZE}")
    tokenizer.save_pretrained(folder / "tokenizer")
    return tokenizer


def build_sd15_random_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the pipeline folder (about 4.3 GB in fp32 safetensors) and returns its path."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    vae = AutoencoderKL(**SD15_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_sized_tokenizer(out_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if Path(args.out_dir).exists() and any(Path(args.out_dir).iterdir()):
        parser.error(f"{args.out_dir!r} exists and is not empty; give a new folder")
    folder = build_sd15_random_pipeline(args.out_dir, args.seed)
    print(f"wrote an SD1.5-architecture pipeline with random weights to {folder}")


if __name__ == "__main__":
    main()
