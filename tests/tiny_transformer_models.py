"""Tiny, offline SD3 and Flux pipelines built from configs, for tests.

The CLIP tokenizers are tests/tiny_models.py's byte-level CLIPTokenizer. T5 needs a tokenizer that
works offline and without sentencepiece (not installed): `character_t5_tokenizer` builds a genuine
transformers T5 tokenizer on a `tokenizers` Unigram model whose pieces are single characters, with
T5's Metaspace pre-tokenizer ("▁" marks a word start) and T5's post-processor (append "</s>"), so
token counts are easy to reason about: "a red cube" is 8 tokens + "</s>".

Widths are chosen so SD3's zero padding is real: CLIP-L 32 + CLIP-G 32 = 64 features, padded to T5's 96.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from tiny_models import byte_tokenizer, clip_text_config

T5_WIDTH = 96
CLIP_WIDTH = 32
CLIP_LAYERS = 4


def character_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    characters = string.ascii_lowercase + string.digits + ",.!?'-:()[]"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -1.0) for c in characters] + [(c, -1.5) for c in characters]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=model_max_length,
    )


def tiny_t5(tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def tiny_sd3_components(seed: int = 0, with_t5: bool = True) -> dict:
    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = byte_tokenizer(), byte_tokenizer(pad_token="!"), character_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=T5_WIDTH, pooled_projection_dim=2 * CLIP_WIDTH, out_channels=4,
        pos_embed_max_size=16,
    )
    return {
        "transformer": transformer.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": _vae(latent_channels=4),
        "text_encoder": CLIPTextModelWithProjection(clip_text_config(tokenizer, CLIP_WIDTH, CLIP_WIDTH, CLIP_LAYERS)).eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(tokenizer_2, CLIP_WIDTH, CLIP_WIDTH, CLIP_LAYERS)).eval(),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": tiny_t5(tokenizer_3) if with_t5 else None,
        "tokenizer_3": tokenizer_3 if with_t5 else None,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, with_t5))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_controlnet(seed: int = 0) -> SD3ControlNetModel:
    """An SD3 ControlNet matching tiny_sd3_components' transformer. The zero-initialised output layers and control
    input get PyTorch's default random weights, so the control image and the prompt embeddings change the result."""
    torch.manual_seed(seed)
    controlnet = SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=32, pooled_projection_dim=2 * CLIP_WIDTH, out_channels=4,
        pos_embed_max_size=16,
    )
    for zero_initialised in [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]:
        zero_initialised.reset_parameters()
    return controlnet.eval()


def tiny_flux_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = byte_tokenizer(), character_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, axes_dims_rope=[4, 4, 8],
    )
    return {
        "transformer": transformer.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": _vae(latent_channels=4),
        "text_encoder": CLIPTextModel(clip_text_config(tokenizer, CLIP_WIDTH, CLIP_WIDTH, CLIP_LAYERS)).eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5(tokenizer_2),
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    pipe = FluxPipeline(**tiny_flux_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
