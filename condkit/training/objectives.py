"""What the shared loop minimises: the denoising loss, or a method's own loss.

DenoisingObjective serves every diffusion training method (TrainingMethod). For one process's
share of a micro-batch it takes the images' latents from the cache (the VAE encodes each image
once), adds noise at random timesteps (the DDPM forward process of the scheduler's betas), asks
the method for the UNet prediction and regresses it on the target the scheduler's
prediction_type names (epsilon, v_prediction or sample), plus any extra loss term the method
returns; with `snr_gamma`, each sample's error is weighted by Min-SNR-gamma (diffusers'
`compute_snr`, weighted as in its training examples). Every sample's latent draw, noise and
timestep come from its own generator (`sample_generator`), so the loss does not depend on how a
step is split between processes.

Sizes and augmentation: with the defaults every image is resized so its shorter side is the
resolution and centre-cropped square, and latents are cached per image. A random crop, a flip
(`augment.Augmentation`) or aspect-ratio buckets (`bucketing`) make each sample's view — drawn from
its own generator (`sampling.augmentation_rng`) — part of the cache key instead.

OwnLossObjective serves a LossMethod (Long-CLIP's contrastive fine-tuning): the method gets the
micro-batch's dataset items and returns the loss itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import nn

from .augment import Augmentation, View
from .bucketing import assign_buckets, bucket_sizes
from .flow_matching import FlowMatching, is_flow_matching
from .latent_cache import Dataset, LatentCache
from .method import MethodOutput, TrainingBatch
from .sampling import augmentation_rng, sample_generator

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DenoisingObjective:
    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        noise_scheduler: Any,
        dataset: Dataset,
        *,
        seed: int,
        noise_offset: float,
        resolution: int | None,
        snr_gamma: float | None = None,
        vae_batch_size: int,
        device: torch.device,
        conditioner: nn.Module | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        aspect_ratio_bucketing: bool = False,
    ) -> None:
        # SD3 and Flux (a flow-matching scheduler): their forward process and velocity target, see `flow_matching`
        self.flow_matching = FlowMatching(noise_scheduler) if is_flow_matching(noise_scheduler) else None
        if self.flow_matching is not None:
            if snr_gamma is not None:
                raise ValueError(f"snr_gamma (Min-SNR) weights DDPM timesteps; this model's {type(noise_scheduler).__name__} "
                                 "is flow matching: leave snr_gamma unset")
            self.prediction_type = "flow_matching"
            self.num_train_timesteps = self.flow_matching.num_train_timesteps
        else:
            self.prediction_type = noise_scheduler.config.prediction_type
            if self.prediction_type not in PREDICTION_TYPES:
                raise ValueError(
                    f"unsupported prediction_type {self.prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}"
                )
            # Training always uses the DDPM forward process of the pipeline scheduler's betas.
            self.noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config)
            self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.seed = seed
        self.noise_offset = noise_offset
        self.snr_gamma = snr_gamma
        self.device = device
        self.unet = unet.to(device)
        self.conditioner = conditioner
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.requires_grad_(False).eval().to(device)
        self.latents = LatentCache(vae, dataset, resolution=resolution, chunk_size=vae_batch_size, device=device)
        self.augmentation = Augmentation(resolution, center_crop, random_flip, crop_step=self.vae_scale_factor)
        self.resolution = resolution
        self.buckets: list[tuple[int, int]] | None = None
        self.groups: list[int] | None = None  # each image's bucket, for the data order
        if aspect_ratio_bucketing:
            if resolution is None:
                raise ValueError("aspect-ratio bucketing needs a resolution (the area of every bucket)")
            latent_grid = 2 ** (len(getattr(unet.config, "block_out_channels", (0,))) - 1)
            self.buckets = bucket_sizes(resolution, step=self.vae_scale_factor * latent_grid)
            self.groups = assign_buckets([self.latents.image_size(i) for i in range(len(dataset))], self.buckets)
        self.uses_views = self.buckets is not None or self.augmentation.is_random

    def encode_all_then_release_vae(self) -> None:
        """Cache every image's latents now and drop the VAE (see TrainingConfig.release_vae)."""
        if self.uses_views:
            raise ValueError("release_vae needs fixed views: random crops, flips and buckets encode new views while training")
        self.latents.encode_all_then_release_vae()

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint, beyond the loop's own settings."""
        conditioner = None
        if self.conditioner is not None:
            conditioner = {"name": getattr(self.conditioner, "registered_name", None) or type(self.conditioner).__name__,
                           "config": getattr(self.conditioner, "config", {})}
        fingerprint = {"prediction_type": self.prediction_type, "conditioner": conditioner}
        if self.uses_views:  # absent with the defaults, so earlier runs stay resumable
            fingerprint["augmentation"] = {"center_crop": self.augmentation.center_crop, "flip": self.augmentation.flip,
                                           "buckets": None if self.buckets is None else [list(b) for b in self.buckets]}
        return fingerprint

    def view(self, index: int, sample_number: int) -> View:
        """Which pixels of image `index` sample `sample_number` trains on."""
        size = self.latents.image_size(index)
        if self.buckets is not None:
            target = self.buckets[self.groups[index]]
        else:
            target = size if self.resolution is None else (self.resolution, self.resolution)
        rng = augmentation_rng(self.seed, sample_number) if self.augmentation.is_random else None
        return self.augmentation.view(size, target, rng)

    def loss(self, model: nn.Module, step: int, indices: torch.Tensor, sample_numbers: range) -> torch.Tensor:
        generators = [sample_generator(self.seed, number) for number in sample_numbers]
        if self.uses_views:
            views = [self.view(index, number) for index, number in zip(indices.tolist(), sample_numbers)]
            sizes = sorted({view.size for view in views})
            if len(sizes) > 1:
                raise ValueError(f"images {indices.tolist()} of one batch have sizes {sizes}; set a resolution or use bucketing")
            latents, captions = self.latents.sample_views(indices, views, self.augmentation, generators)
            sizes = [self.latents.image_size(index) for index in indices.tolist()]
            original_sizes = [(height, width) for width, height in sizes]
            # the crop's corner in the image the UNet sees: for a mirrored view, in the mirrored image
            crops_top_left = [(view.box[1], view.resized[0] - view.box[2] if view.flip else view.box[0]) for view in views]
        else:
            latents, captions = self.latents.sample(indices, generators)
            original_sizes = crops_top_left = None
        shape = latents.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        timesteps = torch.cat([torch.randint(self.num_train_timesteps, (1,), generator=g) for g in generators])
        if self.noise_offset:
            # Drawn last so that the base noise is the same with and without an offset.
            offsets = torch.stack([torch.randn((shape[0], 1, 1), generator=g) for g in generators])
            noise = noise + self.noise_offset * offsets
        latents, noise, timesteps = latents.to(self.device), noise.to(self.device), timesteps.to(self.device)
        if self.flow_matching is not None:  # the draw is an index into the training schedule: σ and t = σ·1000
            noisy, timesteps = self.flow_matching.noisy(latents, noise, timesteps)
        else:
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        image_size = (shape[-2] * self.vae_scale_factor, shape[-1] * self.vae_scale_factor)
        batch = TrainingBatch(indices=indices, captions=captions, latents=latents, noise=noise, step=step, image_size=image_size,
                              original_sizes=original_sizes, crops_top_left=crops_top_left)
        output = model(self.unet, self.conditioner, batch, noisy, timesteps)
        if not isinstance(output, MethodOutput):
            output = MethodOutput(prediction=output)
        target = self._target(latents, noise, timesteps).float()
        if self.snr_gamma is None:
            loss = F.mse_loss(output.prediction.float(), target)
        else:
            error = F.mse_loss(output.prediction.float(), target, reduction="none")
            loss = (error.mean(dim=tuple(range(1, error.ndim))) * self._min_snr_weights(timesteps)).mean()
        if output.extra_loss is not None:
            loss = loss + output.extra_loss
        return loss

    def _min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, gamma) over what the prediction's error is measured against: SNR (epsilon), SNR + 1 (v), 1 (sample)."""
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return weights / snr
        if self.prediction_type == "v_prediction":
            return weights / (snr + 1)
        return weights

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.flow_matching is not None:
            return self.flow_matching.target(latents, noise)
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return latents


class OwnLossObjective:
    """For a `LossMethod`: the dataset items of the micro-batch go to the method, which returns the loss."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def loss(self, model: nn.Module, step: int, indices: torch.Tensor, sample_numbers: range) -> torch.Tensor:
        return model([self.dataset[index] for index in indices.tolist()])
