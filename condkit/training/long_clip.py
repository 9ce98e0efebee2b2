"""Long-CLIP fine-tuning: a stretched text tower taught to read long captions without forgetting short ones.

Each step takes images with a long and a short caption of the same picture (Zhang et al., 2024):

- fine-grained alignment: image features ↔ long-caption features (contrastive);
- primary-component matching: the image features reduced to their top `components` principal
  components over the batch (centre, project onto the leading right-singular vectors, add the mean
  back) ↔ short-caption features (contrastive).

Both are symmetric cross-entropy over the batch with label smoothing, at the model's logit scale;
the loss is their sum. As in Long-CLIP, the first `keep` rows of the stretched position table stay
exactly as CLIP learned them (they are put back after every optimizer step), and the rows after
them are trained. The vision tower is frozen unless `train_vision`.

Long-CLIP's released code silently does nothing for the short-caption branch when the batch has no
more than `components` + 1 images (centred features then have rank < `components`, so the
projection is exact); here that configuration is refused.

It runs on the shared training loop as a `LossMethod`, so checkpoints, exact resume, the NaN
guard, gradient accumulation and several processes work as for every other method:

    method = LongCLIPMethod(CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(tokenizer_dir))
    train_long_clip(method, pairs, TrainingConfig("runs/long-clip", max_train_steps=300, train_batch_size=64,
                                                  learning_rate=1e-6))
    save_long_clip_text_encoder(method.model, method.tokenizer, "runs/long-clip")

`pairs` is any indexable of {"image": (3, H, W) in [-1, 1], "long_caption", "short_caption"} items;
`condkit train long-clip` uses the shapes world's (`condkit.shapes_world.dataset.long_caption_pairs`).

With several processes or accumulation micro-batches, each micro-batch is its own contrastive
batch (features are not gathered across processes), so each must hold more than `components` + 1
images.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
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

from .loop import TrainingConfig, TrainingResult, train_with_own_loss
from .method import LossMethod

logger = logging.getLogger(__name__)


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


class LongCLIPMethod(LossMethod):
    """A CLIPModel whose text tower is stretched (unless `stretch=False`: already long) and fine-tuned.

    Dataset items are mappings with "image" (a (3, H, W) float tensor, normalised as the vision
    tower expects), "long_caption" and "short_caption". The text tower and text projection train
    (and the vision tower with its projection if `train_vision`); the first `keep` position rows
    are put back after every optimizer step, so they stay exactly as CLIP learned them.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: Any,
        *,
        components: int = 32,
        label_smoothing: float = 0.1,
        keep: int = LONG_CLIP_KEEP,
        ratio: int = LONG_CLIP_RATIO,
        stretch: bool = True,
        train_vision: bool = False,
    ) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if stretch:
            stretch_text_model(model.text_model, keep, ratio, inplace=True)
            model.config.text_config.max_position_embeddings = position_count(model.text_model)
        self.model = model
        self.window = position_count(model.text_model)
        self.tokenizer = stretch_tokenizer(tokenizer, self.window)
        self.components = components
        self.label_smoothing = label_smoothing
        self.keep, self.ratio, self.stretch, self.train_vision = keep, ratio, stretch, train_vision
        model.requires_grad_(False)
        towers: list[nn.Module] = [model.text_model, model.text_projection]
        if train_vision:
            towers += [model.vision_model, model.visual_projection]
        for tower in towers:
            tower.requires_grad_(True)
        self.register_buffer("kept_rows", self._position_table()[:keep].detach().clone(), persistent=False)

    def settings(self) -> dict[str, Any]:
        return {
            "components": self.components, "label_smoothing": self.label_smoothing, "keep": self.keep,
            "ratio": self.ratio, "stretch": self.stretch, "train_vision": self.train_vision,
        }  # fmt: skip

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size <= self.components + 1:
            raise ValueError(
                f"batch size {batch_size} with components {self.components}: primary-component matching is a "
                f"no-op unless the batch holds more than components + 1 images; expected >= {self.components + 2}"
            )

    def forward(self, items: Sequence[dict[str, Any]]) -> torch.Tensor:  # type: ignore[override]
        self.check_batch_size(len(items))
        model = self.model
        images = torch.stack([item["image"] for item in items]).to(model.device, model.dtype)
        with torch.set_grad_enabled(self.train_vision and torch.is_grad_enabled()):
            image_features = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
        long_text = self._text_features([item["long_caption"] for item in items])
        short_text = self._text_features([item["short_caption"] for item in items])
        scale = model.logit_scale.exp()
        fine_grained = contrastive_loss(image_features, long_text, scale, self.label_smoothing)
        primary = primary_components(image_features, self.components)
        return fine_grained + contrastive_loss(primary, short_text, scale, self.label_smoothing)

    def after_optimizer_step(self, step: int) -> None:
        with torch.no_grad():
            self._position_table()[: self.keep] = self.kept_rows

    def _position_table(self) -> torch.Tensor:
        return text_embeddings(self.model.text_model).position_embedding.weight

    def _text_features(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(captions, padding="longest", return_tensors="pt")
        if tokens.input_ids.shape[1] > self.window:
            too_long = int((tokens.attention_mask.sum(dim=1) > self.window).sum())
            logger.warning(f"{too_long} caption(s) longer than {self.window} tokens were truncated to {self.window}")
            tokens = self.tokenizer(
                captions, padding="longest", truncation=True, max_length=self.window, return_tensors="pt"
            )
        pooled = self.model.text_model(input_ids=tokens.input_ids.to(self.model.device)).pooler_output
        return self.model.text_projection(pooled)


def train_long_clip(method: LongCLIPMethod, pairs: Sequence[dict[str, Any]], config: TrainingConfig, *,
                    accelerator: Any = None) -> TrainingResult:
    """Fine-tune `method.model` in place on `pairs` with the shared loop; it is left in eval mode, frozen.

    `pairs`: the shapes world's `long_caption_pairs`, or your images and captions through
    `condkit.training.long_clip_data.LongCaptionPairs`."""
    method.check_batch_size(config.train_batch_size)
    result = train_with_own_loss(method, pairs, config, accelerator=accelerator)
    method.model.eval().requires_grad_(False)
    return result


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
