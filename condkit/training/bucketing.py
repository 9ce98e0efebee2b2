"""Aspect-ratio bucketing: train on wide and tall images without cropping them square.

    buckets = bucket_sizes(512, step=64)           # (width, height) pairs of about 512² pixels each
    assigned = assign_buckets(image_sizes, buckets)  # the bucket index of every image

As kohya's sd-scripts: a bucket is a size whose sides are multiples of `step` (the UNet's latent
grid times the VAE's scale factor: 64 for SD) with an area no larger than resolution², sides at
most `max_aspect` (4: kohya's 256–1024 range at 512) times one another. Each image goes to the
bucket nearest its aspect ratio (by log ratio, so 2:1 and 1:2 are equally far from 1:1); it is
then resized to cover the bucket and
cropped (centre or random, see `augment`). The training order (`sampling.DataOrder` with groups)
draws every optimizer step from one bucket, so all of a step's images — every process's and every
micro-batch's — have one size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Size = tuple[int, int]  # (width, height)


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[Size]:
    """Sizes of about resolution² pixels (never more), sides multiples of `step`, sorted by aspect ratio."""
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than the bucket step {step}; expected at least {step}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be at least 1, got {max_aspect}")
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= area // step:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.add((width, height))
        width += step
    square = (resolution // step * step,) * 2
    sizes.add(square)
    return sorted(sizes, key=lambda size: (size[0] / size[1], size[0]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (ties: the larger bucket)."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image size {size} has no pixels")
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio),
                                                   -buckets[i][0] * buckets[i][1]))


def assign_buckets(image_sizes: Sequence[Size], buckets: Sequence[Size]) -> list[int]:
    """The bucket index of each image."""
    return [nearest_bucket(size, buckets) for size in image_sizes]
