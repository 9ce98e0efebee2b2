"""Tiny, offline diffusers pipelines built from configs, for tests.

The tokenizer is a genuine transformers CLIPTokenizer with a byte-level vocabulary and no merges:
every character is one token, so token counts are easy to reason about in tests.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def write_byte_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@lru_cache(maxsize=None)
def byte_tokenizer_dir(pad_token: str = "<|endoftext|>") -> Path:
    import tempfile

    return write_byte_tokenizer(Path(tempfile.mkdtemp(prefix="condkit-tok-")), pad_token)


def byte_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(byte_tokenizer_dir(pad_token))


def clip_text_config(tokenizer: CLIPTokenizer, hidden: int, projection: int = 32, layers: int = 3) -> CLIPTextConfig:
    """A tiny CLIP text encoder's config for `tokenizer` (SD, SDXL and the SD3/Flux pipelines of tiny_transformer_models)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection,
        layer_norm_eps=1e-5,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )


def _unet(**config) -> UNet2DConditionModel:
    """A two-level UNet for 16x16 latents; `config` gives its cross-attention settings."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **config,
    )


def tiny_sd_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    unet = _unet(cross_attention_dim=32, attention_head_dim=4)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _vae(),
        "text_encoder": CLIPTextModel(clip_text_config(tokenizer, 32)).eval(),
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**tiny_sd_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    tokenizer_2 = byte_tokenizer(pad_token="!")
    unet = _unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=32 + 32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer, 32)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tokenizer_2, 32, projection=32)).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet matching `unet`, for 2x-downsampled control images (32 px images, 16 px latents).

    The zero-initialised output convolutions get PyTorch's default random weights, so the control image
    and the prompt embeddings the ControlNet sees both change the result.
    """
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8), load_weights_from_unet=False)
    zero_initialised = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
    for conv in zero_initialised:
        conv.reset_parameters()
    return controlnet.eval()


def tiny_sd2_components(seed: int = 0) -> dict:
    """SD2-like components: 1024-wide text encoder and cross-attention, linear projections, v-prediction."""
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(pad_token="!")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
        layer_norm_eps=1e-5,
    )
    unet = _unet(cross_attention_dim=1024, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _vae(),
        "text_encoder": CLIPTextModel(text_config).eval(),
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }
