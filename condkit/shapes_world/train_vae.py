"""Stage "vae": a small AutoencoderKL, 64x64x3 images to 16x16x4 latents.

Loss: L1 + MSE reconstruction, with pixels on object outlines weighted up (the world's scorer
tells shapes apart by their anti-aliased outlines, which are few pixels of each image) and, with
`small_object_weight`, the pixels of small objects weighted up in proportion to how small they
are (a small cross is a few dozen pixels of 4096, and a plain loss lets the VAE drop it), plus a
KL term as weak as Stable Diffusion's (1e-6 against a per-pixel sum), so the posterior noise
stays small and reconstructions stay sharp. After training, the config's scaling_factor is set
to 1 / std of the latents over a sample of the pool, so the UNet sees unit-variance latents.
The stage report includes the world scorer on reconstructions next to the renders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from condkit.training.loop import LossMethod, train_with_own_loss

from .dataset import ShapesDataset
from .scorer import aggregate, score
from .stage_runner import final_loss, save_final, stage_config
from .world_data import Pool


@dataclass(frozen=True)
class VaeScale:
    channels: tuple[int, int, int]
    steps: int
    batch_size: int
    learning_rate: float
    kl_weight: float
    checkpoint_every: int
    scored_images: int
    small_object_weight: float = 0.0
    latent_channels: int = 4


EDGE_WEIGHT = 4.0
# An object of this many pixels (at 64x64: a small triangle, the world's smallest) gets the full
# small-object weight; larger objects get it in proportion (area ratio), the background none.
SMALLEST_OBJECT_AREA = 72.0
# A pixel belongs to an object when it differs from the image's border colour by more than this ([0, 1] units).
FOREGROUND_THRESHOLD = 0.1


def build_vae(scale: VaeScale, resolution: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=scale.channels,
        layers_per_block=1,
        latent_channels=scale.latent_channels,
        norm_num_groups=min(8, scale.channels[0]),
        sample_size=resolution,
        mid_block_add_attention=False,
    )


def outline_weights(images: torch.Tensor) -> torch.Tensor:
    """1 on flat areas, 1 + EDGE_WEIGHT where a 3x3 neighbourhood changes colour; (N, 1, H, W)."""
    spread = F.max_pool2d(images, 3, stride=1, padding=1) + F.max_pool2d(-images, 3, stride=1, padding=1)
    return 1.0 + EDGE_WEIGHT * (spread.amax(dim=1, keepdim=True) > 0.05).float()


def object_areas(images: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """Per pixel, the area (pixels) of the object it belongs to, 0 on the background; images (N, 3, H, W) in [-1, 1].

    Objects are the 8-connected regions that differ from the image's median border colour, labelled
    by propagating the largest pixel index through each region (max-pooling inside the mask).
    """
    n, _, height, width = images.shape
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    mask = ((images - background).abs().amax(dim=1, keepdim=True) > 2 * FOREGROUND_THRESHOLD).float()
    index = torch.arange(1, height * width + 1, dtype=images.dtype, device=images.device).reshape(1, 1, height, width)
    labels = mask * index
    for _ in range(iterations):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.reshape(n, -1).long()
    counts = torch.zeros(n, height * width + 1, dtype=images.dtype, device=images.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=images.dtype))
    areas = torch.gather(counts, 1, flat) * (flat > 0)
    return areas.reshape(n, 1, height, width)


def small_object_weights(images: torch.Tensor, weight: float) -> torch.Tensor:
    """1 + weight · (smallest object area / the pixel's object area) on objects and one pixel around them, 1 elsewhere."""
    areas = object_areas(images)
    scale = images.shape[-1] * images.shape[-2] / 64**2
    smallness = torch.where(areas > 0, (SMALLEST_OBJECT_AREA * scale / areas.clamp(min=1.0)).clamp(max=1.0), 0.0)
    return 1.0 + weight * F.max_pool2d(smallness, 3, stride=1, padding=1)


def pool_pixels(items: Sequence[dict], device: torch.device) -> torch.Tensor:
    """The images of pool items as one (N, 3, H, W) batch in [-1, 1], as diffusers' VAE expects."""
    return torch.stack([item["image"] for item in items]).to(device) * 2 - 1


def outline_weighted_error(reconstruction: torch.Tensor, images: torch.Tensor, small_object_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE per pixel, pixels on outlines (and of small objects) weighted up, normalised by the mean weight."""
    error = reconstruction - images
    weights = outline_weights(images)
    if small_object_weight:
        weights = weights * small_object_weights(images, small_object_weight)
    return ((error.abs() + error.square()) * weights).mean() / weights.mean()


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, small_object_weight: float = 0.0) -> torch.Tensor:
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    error = outline_weighted_error(reconstruction, images, small_object_weight)
    return error + kl_weight * posterior.kl().mean() / images[0].numel()


@torch.no_grad()
def latent_std(vae: AutoencoderKL, pool: Pool, count: int = 512) -> float:
    latents = vae.encode(pool.float_images(torch.arange(min(count, len(pool))))).latent_dist.mean
    return float(latents.std())


@torch.no_grad()
def posterior_std(vae: AutoencoderKL, pool: Pool, count: int = 256) -> float:
    """Mean std of the encoder's posterior: the noise the UNet's training latents carry."""
    return float(vae.encode(pool.float_images(torch.arange(min(count, len(pool))))).latent_dist.std.mean())


@torch.no_grad()
def reconstruction_quality(vae: AutoencoderKL, held_out: Pool, count: int = 256) -> dict[str, float]:
    """PSNR and mean absolute error (0-255 scale) of mean-latent reconstructions."""
    images = held_out.float_images(torch.arange(min(count, len(held_out))))
    reconstruction = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((reconstruction + 1) / 2, (images + 1) / 2, reduction="none").flatten(1).mean(1)
    psnr = (10 * torch.log10(1 / mse.clamp(min=1e-10))).mean()
    mae = (reconstruction - images).abs().mean() * 127.5
    return {"psnr_db": float(psnr), "mean_abs_error_0_255": float(mae)}


RoundTrip = Callable[[torch.Tensor], torch.Tensor]


def mean_latent_round_trip(vae: AutoencoderKL) -> RoundTrip:
    """Images in [-1, 1] (N, 3, H, W) encoded to the posterior mean and decoded."""
    return lambda images: vae.decode(vae.encode(images).latent_dist.mean).sample


@torch.no_grad()
def round_trip_renders(round_trip: RoundTrip, renders: np.ndarray) -> np.ndarray:
    """uint8 renders (N, H, W, 3) through a round trip on [-1, 1] images, back to uint8."""
    images = torch.from_numpy(renders.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    decoded = round_trip(images).clamp(-1, 1)
    return ((decoded.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def scorer_on_reconstructions(vae: AutoencoderKL, count: int, seed: int) -> dict[str, dict[str, float]]:
    """The world scorer's metrics on renders and on their mean-latent reconstructions."""
    dataset = ShapesDataset(count, seed=seed)
    round_trip = mean_latent_round_trip(vae)
    on_renders, on_reconstructions = [], []
    for index in range(count):
        item = dataset[index]
        reconstruction = round_trip_renders(round_trip, np.asarray(item["image"])[None])[0]
        on_renders.append(score(item["image"], item["spec"]))
        on_reconstructions.append(score(reconstruction, item["spec"]))
    return {"renders": aggregate(on_renders), "reconstructions": aggregate(on_reconstructions)}


class VaeStage(LossMethod):
    """The reconstruction loss of a batch of pool items; the posterior sample uses the loop's global generators."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float, small_object_weight: float = 0.0) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.small_object_weight = small_object_weight

    def settings(self) -> dict:
        return {"kl_weight": self.kl_weight, "small_object_weight": self.small_object_weight}

    def forward(self, items: Sequence[dict]) -> torch.Tensor:  # type: ignore[override]
        return vae_loss(self.vae, pool_pixels(items, self.vae.device), self.kl_weight, self.small_object_weight)


def train_vae(stage_dir: Path, pool: Pool, held_out: Pool, scale: VaeScale, *, seed: int) -> dict:
    """Train (or resume) the VAE stage; the model is saved under stage_dir/final."""
    torch.manual_seed(seed)
    vae = build_vae(scale, pool.images.shape[-1])
    config = stage_config(
        stage_dir, steps=scale.steps, batch_size=scale.batch_size, learning_rate=scale.learning_rate,
        checkpoint_every=scale.checkpoint_every, warmup_steps=0, weight_decay=0.0, seed=seed,
    )  # fmt: skip
    result = train_with_own_loss(VaeStage(vae, scale.kl_weight, scale.small_object_weight), pool, config)
    vae.cpu().eval()
    std = latent_std(vae, pool)
    vae.register_to_config(scaling_factor=1.0 / std)
    report = {
        "final_loss": final_loss(result),
        "latent_std": std,
        "mean_posterior_std": posterior_std(vae, pool),
        **reconstruction_quality(vae, held_out),
        "scorer": scorer_on_reconstructions(vae, scale.scored_images, seed=seed + 2),
    }
    save_final(stage_dir, vae)
    return report
