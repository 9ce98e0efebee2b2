"""Rendered training pools: the world's images as one uint8 tensor plus their captions.

Rendering is cheap but not free on two cores, so each pool is rendered once and cached in the
run folder. A pool is a dataset for condkit's training loop: item i is {"image": (3, H, W) float
in [0, 1], "caption": str}, and the stages train on it in the loop's data order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from condkit.files import load_pickle_safely, write_atomically
from condkit.verbosity import progress_bar

from .dataset import ShapesDataset


@dataclass
class Pool:
    images: torch.Tensor  # (N, 3, H, W) uint8
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        return {"image": self.images[index].float().div(255.0), "caption": self.captions[index]}

    def float_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Images at `indices` scaled to [-1, 1], as diffusers' VAE expects."""
        return self.images[indices].float().div(127.5).sub(1.0)


def render_pool(
    length: int,
    seed: int,
    cache_dir: Path,
    *,
    resolution: int = 64,
    allow_held_out: bool = False,
) -> Pool:
    """Render `length` items of ShapesDataset(seed=seed), or load them from the cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    held = "with-held-out" if allow_held_out else "train"
    path = cache_dir / f"pool-{held}-seed{seed}-n{length}-r{resolution}.pt"
    if path.is_file():
        state = load_pickle_safely(path)
        return Pool(images=state["images"], captions=list(state["captions"]))
    dataset = ShapesDataset(length, seed=seed, resolution=resolution, allow_held_out=allow_held_out)
    images = torch.empty((length, 3, resolution, resolution), dtype=torch.uint8)
    captions: list[str] = []
    for i in progress_bar(range(length), desc=f"render pool (seed {seed})", dynamic_ncols=True):
        item = dataset[i]
        images[i] = torch.from_numpy(np.asarray(item["image"].convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        captions.append(item["caption"])
    write_atomically(path, lambda temporary: torch.save({"images": images, "captions": captions}, temporary))
    return Pool(images=images, captions=captions)
