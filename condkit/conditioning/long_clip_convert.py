"""Official Long-CLIP checkpoints (longclip-B.pt, longclip-L.pt) → Hugging Face folders.

The released files are `torch.save` of an OpenAI-layout CLIP state dict with two position tables:
`positional_embedding` (CLIP's, stretched and frozen) and `positional_embedding_res` (fine-tuned).
Long-CLIP's effective table is rows < keep (20) of the first and rows >= keep of the second.
Public converters copy only `positional_embedding` and so lose the fine-tuned rows; here both are
used. Widths, layers and positions are read from the tensors; heads = width // 64 as OpenAI's
code computes them (pass num_heads for a model that differs).

Output, with diffusers component names so a folder drops into a pipeline:

    text_encoder/    CLIPTextModelWithProjection (CLIPTextModel if the checkpoint has no
                     text_projection); CLIPTextModel.from_pretrained on it loads the text part
    image_encoder/   CLIPVisionModelWithProjection, when the checkpoint has a ViT visual tower
    tokenizer/       when a tokenizer is given; model_max_length = the position count
    longclip.json    source file, positions, keep, logit_scale

Weights are written with the "text_model." / "vision_model." key prefixes that transformers 4.x,
diffusers and ComfyUI expect (transformers 5.x saves a bare CLIPTextModel without them, and
reads both).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
)

from condkit.conditioning import CLIP_POSITIONS
from condkit.conditioning.long_clip import LONG_CLIP_KEEP, stretch_tokenizer
from condkit.files import load_pickle_safely, read_state_dict

HEAD_WIDTH = 64
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

# HF target (relative to an encoder layer) ← OpenAI source (relative to a residual block).
_BLOCK_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def convert_longclip_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    *,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    keep: int = LONG_CLIP_KEEP,
    num_heads: int | None = None,
    vision_num_heads: int | None = None,
) -> Path:
    """Convert an official Long-CLIP checkpoint into `output_dir` (layout in the module docstring)."""
    checkpoint_path, output_dir = Path(checkpoint_path), Path(output_dir)
    state = load_longclip_state_dict(checkpoint_path)
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    text_model = longclip_text_model(state, keep=keep, num_heads=num_heads, tokenizer=tokenizer, source=checkpoint_path)
    vision_model = longclip_vision_model(state, num_heads=vision_num_heads, source=checkpoint_path)

    output_dir.mkdir(parents=True, exist_ok=True)
    save_with_prefix(text_model, output_dir / "text_encoder")
    if vision_model is not None:
        save_with_prefix(vision_model, output_dir / "image_encoder")
    positions = text_model.config.max_position_embeddings
    if tokenizer is not None:
        stretch_tokenizer(tokenizer, positions).save_pretrained(output_dir / "tokenizer")
    logit_scale = state.get("logit_scale")
    summary = {
        "source": checkpoint_path.name,
        "positions": positions,
        "keep": keep,
        "logit_scale": None if logit_scale is None else float(logit_scale),
    }
    (output_dir / "longclip.json").write_text(json.dumps(summary, indent=2) + "\n")
    return output_dir


def load_longclip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pt/.pth/.bin (safe unpickling only) or .safetensors checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"Long-CLIP checkpoint {path} does not exist")
    loaded: Any = read_state_dict(path) if path.suffix == ".safetensors" else load_pickle_safely(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}; expected a state dict of tensors")
    state = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return {key: value for key, value in state.items() if key not in OPENAI_METADATA_KEYS}


def longclip_text_model(
    state: dict[str, torch.Tensor],
    *,
    keep: int = LONG_CLIP_KEEP,
    num_heads: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    source: Path | str = "checkpoint",
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """The text tower of an OpenAI-layout Long-CLIP state dict as a Hugging Face model."""
    layers = _count_blocks(state, "transformer.resblocks.")
    required = ["token_embedding.weight", "positional_embedding", "positional_embedding_res", "ln_final.weight", "ln_final.bias"]
    _require(state, required + _block_keys("transformer.resblocks.", max(layers, 1)), source)
    positions, width = state["positional_embedding"].shape
    if positions <= CLIP_POSITIONS:
        raise ValueError(
            f"{source}: positional_embedding has {positions} rows; a Long-CLIP checkpoint has more than "
            f"{CLIP_POSITIONS} (248 in the released models)"
        )
    if state["positional_embedding_res"].shape != state["positional_embedding"].shape:
        raise ValueError(
            f"{source}: positional_embedding_res has shape {tuple(state['positional_embedding_res'].shape)}; "
            f"expected {(positions, width)} like positional_embedding"
        )
    if not 1 <= keep < positions:
        raise ValueError(f"keep must be in [1, {positions - 1}], got {keep}")
    vocab = state["token_embedding.weight"].shape[0]
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens; the checkpoint's token embedding has {vocab} rows")
    projection = state.get("text_projection")

    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=width if projection is None else projection.shape[-1],
        num_hidden_layers=layers,
        num_attention_heads=_heads(width, num_heads, "num_heads"),
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab - 2 if tokenizer is None else tokenizer.bos_token_id,
        eos_token_id=vocab - 1 if tokenizer is None else tokenizer.eos_token_id,
        pad_token_id=0 if tokenizer is None else tokenizer.pad_token_id,
    )
    table = torch.cat([state["positional_embedding"][:keep], state["positional_embedding_res"][keep:]])
    weights = {
        "embeddings.token_embedding.weight": ("token_embedding.weight", state["token_embedding.weight"]),
        "embeddings.position_embedding.weight": ("positional_embedding(_res)", table),
        "final_layer_norm.weight": ("ln_final.weight", state["ln_final.weight"]),
        "final_layer_norm.bias": ("ln_final.bias", state["ln_final.bias"]),
        **_encoder_weights(state, "transformer.resblocks.", layers),
    }
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    if hasattr(model, "text_model"):  # WithProjection; also a bare CLIPTextModel in transformers 4.x
        weights = {f"text_model.{key}": value for key, value in weights.items()}
    if projection is not None:
        weights["text_projection.weight"] = ("text_projection", projection.T)
    return _build(model, weights, source)


def longclip_vision_model(
    state: dict[str, torch.Tensor], *, num_heads: int | None = None, source: Path | str = "checkpoint"
) -> CLIPVisionModelWithProjection | None:
    """The ViT visual tower (visual.*) as a Hugging Face model, or None when there is none."""
    if not any(key.startswith("visual.") for key in state):
        return None
    layers = _count_blocks(state, "visual.transformer.resblocks.")
    singles = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"]
    singles += ["ln_post.weight", "ln_post.bias", "proj"]
    _require(state, [f"visual.{key}" for key in singles] + _block_keys("visual.transformer.resblocks.", max(layers, 1)), source)
    width, channels, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise ValueError(
            f"{source}: visual.positional_embedding has {state['visual.positional_embedding'].shape[0]} rows; "
            "expected a square patch grid plus one class position"
        )
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=state["visual.proj"].shape[-1],
        num_hidden_layers=layers,
        num_attention_heads=_heads(width, num_heads, "vision_num_heads"),
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    renames = {
        "embeddings.patch_embedding.weight": "conv1.weight",
        "embeddings.class_embedding": "class_embedding",
        "embeddings.position_embedding.weight": "positional_embedding",
        "pre_layrnorm.weight": "ln_pre.weight",
        "pre_layrnorm.bias": "ln_pre.bias",
        "post_layernorm.weight": "ln_post.weight",
        "post_layernorm.bias": "ln_post.bias",
    }
    weights = {f"vision_model.{target}": (f"visual.{name}", state[f"visual.{name}"]) for target, name in renames.items()}
    encoder = _encoder_weights(state, "visual.transformer.resblocks.", layers)
    weights |= {f"vision_model.{key}": value for key, value in encoder.items()}
    weights["visual_projection.weight"] = ("visual.proj", state["visual.proj"].T)
    return _build(CLIPVisionModelWithProjection(config), weights, source)


def save_with_prefix(model: nn.Module, folder: Path) -> None:
    """config.json + model.safetensors with keys under "text_model." / "vision_model." (4.x layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if not hasattr(model, "text_model") and not hasattr(model, "vision_model"):
        prefix = "text_model." if isinstance(model, CLIPTextModel) else "vision_model."
        state = {prefix + key: value for key, value in state.items()}
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_file({key: value.detach().contiguous() for key, value in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})


def _encoder_weights(state: dict[str, torch.Tensor], source_prefix: str, layers: int) -> dict[str, tuple[str, torch.Tensor]]:
    """OpenAI residual blocks → HF encoder layers: in_proj split into q/k/v, the rest renamed."""
    weights = {}
    for layer in range(layers):
        source, target = f"{source_prefix}{layer}.", f"encoder.layers.{layer}."
        for kind in ("weight", "bias"):
            in_proj_name = f"{source}attn.in_proj_{kind}"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), state[in_proj_name].chunk(3, dim=0)):
                weights[f"{target}self_attn.{name}.{kind}"] = (in_proj_name, part)
            for hf_name, openai_name in _BLOCK_RENAMES.items():
                name = f"{source}{openai_name}.{kind}"
                weights[f"{target}{hf_name}.{kind}"] = (name, state[name])
    return weights


def _build(model: nn.Module, weights: dict[str, tuple[str, torch.Tensor]], source: Path | str) -> nn.Module:
    """Load `weights` (target key → (source key, tensor)) into `model`, naming any wrong shape."""
    expected = {key: value for key, value in model.state_dict().items()}
    for target, (name, tensor) in weights.items():
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)}; expected {tuple(expected[target].shape)} "
                f"for a width-{model.config.hidden_size} model"
            )
    dtype = next(iter(weights.values()))[1].dtype
    model.load_state_dict({target: tensor for target, (_, tensor) in weights.items()}, strict=True)
    return model.to(dtype).eval()


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(match.group(1)) for key in state if (match := pattern.match(key))]
    return max(indices, default=-1) + 1


def _block_keys(prefix: str, layers: int) -> list[str]:
    names = ["attn.in_proj_weight", "attn.in_proj_bias"]
    names += [f"{openai_name}.{kind}" for openai_name in _BLOCK_RENAMES.values() for kind in ("weight", "bias")]
    return [f"{prefix}{layer}.{name}" for layer in range(layers) for name in names]


def _require(state: dict[str, torch.Tensor], keys: list[str], source: Path | str) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(
            f"{source} is not a Long-CLIP checkpoint in the OpenAI layout: missing {', '.join(missing[:3])}{more}"
        )


def _heads(width: int, num_heads: int | None, option: str) -> int:
    if num_heads is None:
        if width % HEAD_WIDTH:
            raise ValueError(f"width {width} is not a multiple of {HEAD_WIDTH}; pass {option} explicitly")
        return width // HEAD_WIDTH
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"{option} must divide the width {width}, got {num_heads}")
    return num_heads
