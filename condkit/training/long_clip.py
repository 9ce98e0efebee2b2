"""Long-CLIP fine-tuning: a stretched text tower taught to read long captions without forgetting short ones.

Each step takes images with a long and a short caption of the same picture (Zhang et al., 2024):

- fine-grained alignment: image features ↔ long-caption features (contrastive);
- primary-component matching: the image features reduced to their top `components` principal
  components over the batch (centre, project onto the leading right-singular vectors, add the mean
  back) ↔ short-caption features (contrastive).

Both are symmetric cross-entropy over the batch with label smoothing, at the model's logit scale;
the loss is their sum. As in Long-CLIP, the first `keep` rows of the stretched position table stay
exactly as CLIP learned them (their gradient is masked and they get no weight decay), and the rows
after them are trained. The vision tower is frozen unless `train_vision`.

Long-CLIP's released code silently does nothing for the short-caption branch when the batch has no
more than `components` + 1 images (centred features then have rank < `components`, so the
projection is exact); here that configuration is refused.

Self-contained for now: it does not use the shared denoising loop in `condkit.training.loop`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModelWithProjection

from condkit.conditioning.long_clip import (
    LONG_CLIP_KEEP,
    LONG_CLIP_RATIO,
    position_count,
    stretch_text_model,
    stretch_tokenizer,
    text_embeddings,
)
from condkit.conditioning.long_clip_convert import save_with_prefix


@dataclass
class LongCLIPTrainingConfig:
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-6
    weight_decay: float = 1e-2
    components: int = 32
    label_smoothing: float = 0.1
    keep: int = LONG_CLIP_KEEP
    ratio: int = LONG_CLIP_RATIO
    stretch: bool = True  # False: the text tower is already long (a converted Long-CLIP)
    train_vision: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "components"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size <= self.components + 1:
            raise ValueError(
                f"batch_size {self.batch_size} with components {self.components}: primary-component matching is a "
                f"no-op unless batch_size > components + 1; expected batch_size >= {self.components + 2}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class LongCLIPTrainingResult:
    model: CLIPModel
    tokenizer: Any
    losses: list[float] = field(default_factory=list)


def primary_components(features: torch.Tensor, components: int) -> torch.Tensor:
    """`features` (batch, dim) reduced to their top principal components over the batch.

    The basis is computed without gradient; gradients flow through the projection of the features.
    """
    mean = features.mean(dim=0, keepdim=True)
    centred = features - mean
    with torch.no_grad():
        _, _, right = torch.linalg.svd(centred.float(), full_matrices=False)
        basis = right[:components].to(features.dtype)
    return mean + centred @ basis.T @ basis


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Symmetric cross-entropy of matching normalised image and text features row for row."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    text_to_image = F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    return (image_to_text + text_to_image) / 2


def train_long_clip(
    model: CLIPModel, tokenizer: Any, pairs: Sequence[dict[str, Any]], config: LongCLIPTrainingConfig
) -> LongCLIPTrainingResult:
    """Fine-tune `model` in place on `pairs`: mappings with "image" (a (3, H, W) float tensor, normalised as
    the vision tower expects), "long_caption" and "short_caption"."""
    if len(pairs) < config.batch_size:
        raise ValueError(f"got {len(pairs)} training pairs; expected at least batch_size={config.batch_size}")
    torch.manual_seed(config.seed)
    if config.stretch:
        stretch_text_model(model.text_model, config.keep, config.ratio, inplace=True)
        model.config.text_config.max_position_embeddings = position_count(model.text_model)
    window = position_count(model.text_model)
    tokenizer = stretch_tokenizer(tokenizer, window)

    trainable = _select_trainable(model, config)
    optimizer = _optimizer(model, trainable, config)
    table = text_embeddings(model.text_model).position_embedding.weight
    order = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(config.steps), desc="Long-CLIP", disable=not config.progress, dynamic_ncols=True):
        batch = [pairs[int(i)] for i in torch.randperm(len(pairs), generator=order)[: config.batch_size]]
        images = torch.stack([item["image"] for item in batch]).to(model.device, model.dtype)
        with torch.set_grad_enabled(config.train_vision):
            image_features = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
        long_text = _text_features(model, tokenizer, [item["long_caption"] for item in batch], window)
        short_text = _text_features(model, tokenizer, [item["short_caption"] for item in batch], window)
        scale = model.logit_scale.exp()
        loss = contrastive_loss(image_features, long_text, scale, config.label_smoothing) + contrastive_loss(
            primary_components(image_features, config.components), short_text, scale, config.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        table.grad[: config.keep] = 0  # CLIP's well-trained first rows stay as they are
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    model.requires_grad_(False)
    return LongCLIPTrainingResult(model, tokenizer, losses)


def _select_trainable(model: CLIPModel, config: LongCLIPTrainingConfig) -> list[nn.Parameter]:
    model.requires_grad_(False)
    towers: list[nn.Module] = [model.text_model, model.text_projection]
    if config.train_vision:
        towers += [model.vision_model, model.visual_projection]
    for tower in towers:
        tower.requires_grad_(True)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def _optimizer(model: CLIPModel, trainable: list[nn.Parameter], config: LongCLIPTrainingConfig) -> torch.optim.Optimizer:
    table = text_embeddings(model.text_model).position_embedding.weight
    rest = [parameter for parameter in trainable if parameter is not table]
    groups = [{"params": rest, "weight_decay": config.weight_decay}, {"params": [table], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _text_features(model: CLIPModel, tokenizer: Any, captions: list[str], window: int) -> torch.Tensor:
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    if tokens.input_ids.shape[1] > window:
        too_long = int((tokens.attention_mask.sum(dim=1) > window).sum())
        warnings.warn(f"{too_long} caption(s) longer than {window} tokens were truncated to {window}", stacklevel=3)
        tokens = tokenizer(captions, padding="longest", truncation=True, max_length=window, return_tensors="pt")
    pooled = model.text_model(input_ids=tokens.input_ids.to(model.device)).pooler_output
    return model.text_projection(pooled)


def save_long_clip_text_encoder(model: CLIPModel, tokenizer: Any, folder: str | Path) -> Path:
    """Write text_encoder/ (CLIPTextModelWithProjection, prefixed layout) and tokenizer/, the folder layout
    `LongCLIPConditioner.from_pipeline(pipe, folder)` and `convert_longclip_checkpoint` share."""
    folder = Path(folder)
    config = copy.deepcopy(model.config.text_config)
    config.projection_dim = model.text_projection.out_features
    text_encoder = CLIPTextModelWithProjection(config)
    text_encoder.text_model.load_state_dict(model.text_model.state_dict())
    text_encoder.text_projection.load_state_dict(model.text_projection.state_dict())
    save_with_prefix(text_encoder.to(model.dtype), folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def shapes_world_pairs(count: int, seed: int = 0, resolution: int = 64) -> list[dict[str, Any]]:
    """Shapes-world scenes, each with a long caption and a short compositional one, images in [-1, 1]."""
    from condkit.shapes_world.captions import describe
    from condkit.shapes_world.dataset import objects_for_style
    from condkit.shapes_world.scenes import render, sample_scene

    pairs = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng, objects_for_style("long", rng))
        pixels = np.asarray(render(scene, resolution).convert("RGB"), dtype=np.float32)
        pairs.append(
            {
                "image": torch.from_numpy(pixels).permute(2, 0, 1).div(127.5).sub(1.0),
                "long_caption": describe(scene, "long", rng).text,
                "short_caption": describe(scene, "compositional", rng).text,
            }
        )
    return pairs
