"""VAE latents of a dataset's images, encoded once and reused every epoch.

The cache is keyed by image index and fills lazily, one fixed chunk of indices at a time: asking
for index i encodes the whole chunk i // chunk_size. Fixed chunks make every image's latents
bit-identical however the indices are first asked for (an interrupted and resumed run, another
number of processes), because the VAE always sees the same groups.

What is cached is the latent distribution (mean and std), so each epoch still draws a fresh
latent sample, as training without a cache would. Dataset items are read once, when their chunk
is encoded; the caption read then is the one used for the whole run.

With views (`augment.View`: a random crop, a flip, an aspect-ratio bucket) latents are keyed by
(image index, view) instead: each view is encoded alone the first time a sample draws it, so its
latents are bit-identical whatever else is encoded around it, and reused whenever it is drawn
again. Such data must be PIL images or uint8 (H, W, 3) arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .augment import Augmentation, View

Dataset = Sequence[Any]


def read_item(item: Any, index: int) -> tuple[Any, str]:
    """(image, caption) from an (image, caption) pair or a mapping with "image" and "caption" keys."""
    if isinstance(item, Mapping) and "image" in item and "caption" in item:
        return item["image"], item["caption"]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(
        f"dataset item {index} is a {type(item).__name__}; expected an (image, caption) pair or a mapping with "
        "'image' and 'caption' keys"
    )


def to_pixels(image: Any, resolution: int | None, index: int) -> torch.Tensor:
    """A (3, H, W) float tensor in [-1, 1] from a PIL image, a uint8 HWC array or a float CHW tensor in [0, 1].

    With a resolution, the shorter side is resized to it and the centre cropped to a square.
    """
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if resolution is not None and image.size != (resolution, resolution):
            scale = resolution / min(image.size)
            resized = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(resized, Image.BILINEAR)
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"dataset image {index} is an array of dtype {image.dtype} and shape {image.shape}; "
                "expected uint8 (H, W, 3)"
            )
        image = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        described = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(
            f"dataset image {index} is {described}; expected a PIL image, uint8 (H, W, 3) or float (3, H, W)"
        )
    if resolution is not None and tuple(image.shape[1:]) != (resolution, resolution):
        image = torch.nn.functional.interpolate(image[None].float(), size=(resolution, resolution), mode="bilinear")[0]
    return image.float() * 2.0 - 1.0


def _as_pil(image: Any, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image)
    described = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
    raise ValueError(
        f"dataset image {index} is {described}; random crops, flips and buckets need a PIL image or uint8 (H, W, 3)"
    )


# Images per VAE call are capped so a call holds at most one 512x512 image's activations (≈ 0.5 GB in fp32
# for SD's VAE instead of ≈ 4 GB for a chunk of 8); small images still go through in whole chunks.
PIXELS_PER_ENCODE = 512 * 512


class LatentCache:
    """Latent distributions and captions of dataset images, by index."""

    def __init__(
        self,
        vae: torch.nn.Module,
        dataset: Dataset,
        *,
        resolution: int | None = None,
        chunk_size: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.vae = vae
        self.dataset = dataset
        self.resolution = resolution
        self.chunk_size = chunk_size
        self.device = torch.device(device)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._distributions: dict[int, torch.Tensor] = {}
        self._view_distributions: dict[tuple[int, View], torch.Tensor] = {}
        self._captions: dict[int, str] = {}
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._distributions) + len(self._view_distributions)

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of dataset image `index` (read once)."""
        if index not in self._sizes:
            self._sizes[index] = _as_pil(read_item(self.dataset[index], index)[0], index).size
        return self._sizes[index]

    def sample_views(
        self, indices: torch.Tensor, views: Sequence[View], augmentation: Augmentation,
        generators: Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, list[str]]:
        """As `sample`, for the given view of each image (all of one size)."""
        latents = []
        for index, view, generator in zip(indices.tolist(), views, generators):
            key = (index, view)
            if key not in self._view_distributions:
                self._view_distributions[key] = self._encode_view(index, view, augmentation)
            mean, std = self._view_distributions[key]
            latent = mean + std * torch.randn(mean.shape, generator=generator)
            latents.append((latent - self.shift_factor) * self.scaling_factor)
        return torch.stack(latents), [self._captions[index] for index in indices.tolist()]

    @torch.no_grad()
    def _encode_view(self, index: int, view: View, augmentation: Augmentation) -> torch.Tensor:
        image, caption = read_item(self.dataset[index], index)
        if not isinstance(caption, str):
            raise TypeError(f"dataset item {index} has a caption of type {type(caption).__name__}; expected str")
        self._captions.setdefault(index, caption)
        pixels = augmentation.pixels(_as_pil(image, index), view)[None].to(device=self.device, dtype=self.vae.dtype)
        distribution = self.vae.encode(pixels).latent_dist
        return torch.stack([distribution.mean, distribution.std], dim=1)[0].float().cpu()

    def __contains__(self, index: int) -> bool:
        return index in self._distributions

    def encode_all_then_release_vae(self) -> None:
        """Encode every image (fixed views) and let go of the VAE: its memory is freed if nothing else holds it."""
        for chunk in range(math.ceil(len(self.dataset) / self.chunk_size)):
            if chunk * self.chunk_size not in self._distributions:
                self._encode_chunk(chunk)
        self.vae = None

    def sample(self, indices: torch.Tensor, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, list[str]]:
        """Scaled latents drawn from each image's distribution with its generator, and the captions."""
        for index in indices.tolist():
            if index not in self._distributions:
                self._encode_chunk(index // self.chunk_size)
        latents = []
        for index, generator in zip(indices.tolist(), generators):
            mean, std = self._distributions[index]
            latent = mean + std * torch.randn(mean.shape, generator=generator)
            latents.append((latent - self.shift_factor) * self.scaling_factor)
        return torch.stack(latents), [self._captions[index] for index in indices.tolist()]

    @torch.no_grad()
    def _encode_chunk(self, chunk: int) -> None:
        indices = range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, len(self.dataset)))
        pixels, captions = [], []
        for index in indices:
            image, caption = read_item(self.dataset[index], index)
            if not isinstance(caption, str):
                raise TypeError(f"dataset item {index} has a caption of type {type(caption).__name__}; expected str")
            pixels.append(to_pixels(image, self.resolution, index))
            captions.append(caption)
        sizes = {tuple(p.shape) for p in pixels}
        if len(sizes) > 1:
            first, last = indices.start, indices.stop - 1
            raise ValueError(f"dataset images {first}-{last} have sizes {sorted(sizes)}; set a resolution")
        batch = torch.stack(pixels).to(device=self.device, dtype=self.vae.dtype)
        per_call = max(1, PIXELS_PER_ENCODE // (batch.shape[-1] * batch.shape[-2]))
        distributions = [self.vae.encode(part).latent_dist for part in batch.split(per_call)]
        mean = torch.cat([distribution.mean for distribution in distributions])
        std = torch.cat([distribution.std for distribution in distributions])
        stacked = torch.stack([mean, std], dim=1).float().cpu()
        for index, caption, both in zip(indices, captions, stacked):
            self._distributions[index] = both
            self._captions[index] = caption
