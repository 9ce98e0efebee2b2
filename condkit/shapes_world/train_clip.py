"""Stage "clip": a small CLIPModel trained contrastively on renders and their captions.

Symmetric InfoNCE over each batch, with hard negative captions (NegCLIP: colours, shapes or a
relation swapped; `negatives_per_image` of them, each from a different perturbation) added to the
image-to-text side. Identical captions inside a batch are all counted as positives, so a short
caption such as "a red circle" that fits several images is never pushed away from them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from condkit.conditioning import CLIP_POSITIONS
from condkit.training.loop import LossMethod, train_with_own_loss

from .hard_negatives import PERTURBATIONS, hard_negatives
from .stage_runner import final_loss, model_device, save_final, stage_config
from .world_data import Pool


@dataclass(frozen=True)
class ClipScale:
    width: int
    layers: int
    heads: int
    steps: int
    batch_size: int
    learning_rate: float
    checkpoint_every: int
    negatives_per_image: int = 1


def clip_config(tokenizer: CLIPTokenizer, scale: ClipScale, resolution: int) -> CLIPConfig:
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=scale.width,
        intermediate_size=4 * scale.width,
        num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads,
        max_position_embeddings=CLIP_POSITIONS,
        projection_dim=scale.width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        image_size=resolution,
        patch_size=8,
        hidden_size=scale.width,
        intermediate_size=4 * scale.width,
        num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads,
        projection_dim=scale.width,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=scale.width)


def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    tokens = tokenizer(captions, padding="longest", truncation=True, max_length=CLIP_POSITIONS, return_tensors="pt")
    pooled = model.text_model(input_ids=tokens.input_ids.to(model.device)).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


def image_embeddings(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """Embeddings of images given as (N, 3, H, W) floats in [-1, 1]."""
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def _same_caption_targets(rows: list[str], columns: list[str]) -> torch.Tensor:
    """Row-normalised matrix with 1 where the row's caption equals the column's caption."""
    matches = torch.tensor([[float(r == c) for c in columns] for r in rows])
    return matches / matches.sum(dim=1, keepdim=True)


def contrastive_loss(
    model: CLIPModel, tokenizer: CLIPTokenizer, pixels: torch.Tensor, captions: list[str], negatives: list[str]
) -> torch.Tensor:
    image_emb = image_embeddings(model, pixels)
    text_emb = text_embeddings(model, tokenizer, captions + negatives)
    scale = model.logit_scale.exp().clamp(max=100.0)
    logits = scale * image_emb @ text_emb.T  # (B, B + negatives)
    image_to_text = _same_caption_targets(captions, captions + negatives).to(logits.device)
    text_to_image = _same_caption_targets(captions, captions).to(logits.device)
    loss_i2t = torch.sum(-image_to_text * logits.log_softmax(dim=1), dim=1).mean()
    loss_t2i = torch.sum(-text_to_image * logits[:, : len(captions)].T.log_softmax(dim=1), dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, pool: Pool, group: int = 64) -> dict[str, float]:
    """Top-1 retrieval within groups of `group` held-out pairs, and hard-negative preference.

    The preference is reported per perturbation (colour swapped, shape changed, relation flipped)
    as well as overall: a text encoder that has not learned shapes shows it here first, and the
    UNet trained on it cannot draw what the encoder does not tell apart.
    """
    group = min(group, len(pool))
    model.eval()
    rng = random.Random(0)
    image_hits = text_hits = 0
    wins = {kind: 0 for kind in PERTURBATIONS}
    totals = {kind: 0 for kind in PERTURBATIONS}
    for start in range(0, len(pool) - group + 1, group):
        captions = pool.captions[start : start + group]
        image_emb = image_embeddings(model, pool.float_images(torch.arange(start, start + group)))
        text_emb = text_embeddings(model, tokenizer, captions)
        similarity = image_emb @ text_emb.T
        best_text = similarity.argmax(dim=1).tolist()
        best_image = similarity.argmax(dim=0).tolist()
        image_hits += sum(captions[j] == captions[i] for i, j in enumerate(best_text))
        text_hits += sum(captions[j] == captions[i] for i, j in enumerate(best_image))
        for kind, perturb in PERTURBATIONS.items():
            pairs = [(i, perturb(c, rng)) for i, c in enumerate(captions)]
            pairs = [(i, n) for i, n in pairs if n is not None and n != captions[i]]
            if pairs:
                negative_emb = text_embeddings(model, tokenizer, [n for _, n in pairs])
                rows = torch.tensor([i for i, _ in pairs])
                positive = (image_emb[rows] * text_emb[rows]).sum(-1)
                negative = (image_emb[rows] * negative_emb).sum(-1)
                wins[kind] += int((positive > negative).sum())
                totals[kind] += len(pairs)
    evaluated = (len(pool) // group) * group
    model.train()
    return {
        "image_to_text_top1": image_hits / evaluated,
        "text_to_image_top1": text_hits / evaluated,
        "prefers_caption_over_hard_negative": sum(wins.values()) / max(sum(totals.values()), 1),
        **{f"prefers_caption_over_{kind}_negative": wins[kind] / max(totals[kind], 1) for kind in PERTURBATIONS},
        "retrieval_group_size": group,
        "evaluated_pairs": evaluated,
    }


class ClipStage(LossMethod):
    """The contrastive objective on a batch of pool items, with hard negative captions for each image.

    The hard negatives are drawn from the global generators, which the loop seeds and checkpoints.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, negatives_per_image: int = 1) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.negatives_per_image = negatives_per_image

    def settings(self) -> dict:
        return {"negatives_per_image": self.negatives_per_image}

    def forward(self, items: Sequence[dict]) -> torch.Tensor:  # type: ignore[override]
        captions = [item["caption"] for item in items]
        rng = random.Random(int(torch.randint(2**62, ())))
        negatives = [n for c in captions for n in hard_negatives(c, rng, self.negatives_per_image)]
        pixels = torch.stack([item["image"] for item in items]).to(model_device(self.model)) * 2 - 1
        return contrastive_loss(self.model, self.tokenizer, pixels, captions, negatives)


def train_clip(
    stage_dir: Path, tokenizer: CLIPTokenizer, pool: Pool, held_out: Pool, scale: ClipScale, *, seed: int
) -> dict:
    """Train (or resume) the CLIP stage; the model is saved under stage_dir/final."""
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(tokenizer, scale, pool.images.shape[-1]))
    config = stage_config(
        stage_dir, steps=scale.steps, batch_size=scale.batch_size, learning_rate=scale.learning_rate,
        checkpoint_every=scale.checkpoint_every, warmup_steps=max(1, scale.steps // 20), weight_decay=0.05,
        seed=seed,
    )  # fmt: skip
    result = train_with_own_loss(ClipStage(model, tokenizer, scale.negatives_per_image), pool, config)
    model.cpu()
    report = {"final_loss": final_loss(result), **retrieval_accuracy(model, tokenizer, held_out)}
    save_final(stage_dir, model)
    return report
