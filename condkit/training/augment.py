"""Which pixels of a training image the VAE sees: resize, crop (centre or random), horizontal flip.

    augmentation = Augmentation(resolution=512, center_crop=False, flip=True)
    view = augmentation.view(image.size, (512, 512), rng)      # rng: numpy Generator of the sample
    pixels = augmentation.pixels(image, view)                   # (3, 512, 512) in [-1, 1]

A `View` names one such choice exactly — the size the image is resized to, the crop box and the
flip — so the latent cache can key latents by (image, view): a view met again reuses its latents.
Resizing scales the image so that it covers the target size (the shorter side, for a square
target), as `latent_cache.to_pixels` always did; the centre crop of a square target gives exactly
its pixels. Random crop offsets are whole multiples of `crop_step` (default 8 pixels, one latent
cell of an SD VAE), which bounds how many views an image has: (overhang / 8 + 1) × 2 with flips.

Draws come from the sample's own numpy generator, so they depend only on the seed and the
sample's number in the run (see `sampling`), never on how a step is split between processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Size = tuple[int, int]  # (width, height), PIL's order


@dataclass(frozen=True)
class View:
    """Resize to `resized`, crop `box` = (left, top, right, bottom) of the resized image, then mirror if `flip`."""

    resized: Size
    box: tuple[int, int, int, int]
    flip: bool = False

    @property
    def size(self) -> Size:
        left, top, right, bottom = self.box
        return right - left, bottom - top


@dataclass(frozen=True)
class Augmentation:
    """How training images are sized and varied.

    resolution: side of the square target (buckets give other targets of about its area).
    center_crop: crop the middle (default) or, when False, a random offset per sample.
    flip: mirror each sample left-right with probability 1/2.
    """

    resolution: int | None
    center_crop: bool = True
    flip: bool = False
    crop_step: int = 8

    def __post_init__(self) -> None:
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 1):
            raise ValueError(f"resolution must be a positive integer or None, got {self.resolution!r}")
        if not isinstance(self.crop_step, int) or self.crop_step < 1:
            raise ValueError(f"crop_step must be a positive integer, got {self.crop_step!r}")

    @property
    def is_random(self) -> bool:
        """Whether a sample's view depends on its generator (random crop or flip)."""
        return self.flip or not self.center_crop

    def view(self, image_size: Size, target: Size, rng: np.random.Generator | None = None) -> View:
        """The view of an image of `image_size` at `target`; `rng` is needed when the augmentation is random."""
        if self.is_random and rng is None:
            raise ValueError("a random crop or flip needs the sample's generator")
        width, height = image_size
        target_width, target_height = target
        scale = max(target_width / width, target_height / height)
        resized = (max(target_width, round(width * scale)), max(target_height, round(height * scale)))
        spare_x, spare_y = resized[0] - target_width, resized[1] - target_height
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left = self.crop_step * int(rng.integers(spare_x // self.crop_step + 1))
            top = self.crop_step * int(rng.integers(spare_y // self.crop_step + 1))
        flip = bool(rng.integers(2)) if self.flip else False
        return View(resized, (left, top, left + target_width, top + target_height), flip)

    def pixels(self, image: Image.Image, view: View) -> torch.Tensor:
        """The view of a PIL image as a (3, H, W) float tensor in [-1, 1]."""
        image = image.convert("RGB")
        if image.size != view.resized:
            image = image.resize(view.resized, Image.BILINEAR)
        if view.box != (0, 0, *view.resized):
            image = image.crop(view.box)
        if view.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0 * 2.0 - 1.0
