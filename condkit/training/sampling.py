"""Which images each optimizer step sees, and the randomness each of those samples gets.

Every epoch is a fresh permutation of the dataset seeded by (seed, epoch), cut into consecutive
blocks of `samples_per_step` (train_batch_size x processes x accumulation steps); a final partial
block is dropped. Sample number n of the run (counted over the whole run) draws its latent sample,
noise and timestep from its own generator seeded by (seed, n).

So the loop's randomness depends only on the seed and the position in the run, never on how a
step's samples are split between processes and accumulation micro-batches, and resuming needs
nothing but the position (`state_dict`).

With `groups` (aspect-ratio buckets, see `bucketing`) every step is drawn from one group: each
epoch permutes every group's members, cuts each into blocks of `samples_per_step` (dropping each
group's partial block), then shuffles the blocks. A group smaller than one step never trains (a
warning says how many images that leaves out).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)
AUGMENTATION_STREAM = 1


def augmentation_rng(seed: int, sample_number: int) -> np.random.Generator:
    """The random crop and flip of sample `sample_number`: a stream apart from its latent, noise and timestep draws."""
    return np.random.default_rng([seed, sample_number, AUGMENTATION_STREAM])


def sample_generator(seed: int, sample_number: int) -> torch.Generator:
    """A CPU generator that depends only on the run seed and the sample's number in the run."""
    words = np.random.SeedSequence([seed, sample_number]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


class DataOrder:
    """The dataset indices of each optimizer step, in a resumable order."""

    def __init__(self, dataset_size: int, samples_per_step: int, seed: int, groups: Sequence[int] | None = None) -> None:
        if samples_per_step > dataset_size:
            raise ValueError(
                f"the dataset has {dataset_size} images but one optimizer step needs {samples_per_step} "
                "(train_batch_size x processes x gradient_accumulation_steps); use a smaller batch or more images"
            )
        self.dataset_size = dataset_size
        self.samples_per_step = samples_per_step
        self.seed = seed
        self.groups = None
        self.steps_per_epoch = dataset_size // samples_per_step
        if groups is not None:
            if len(groups) != dataset_size:
                raise ValueError(f"{len(groups)} group labels for {dataset_size} images")
            labels = np.asarray(groups, dtype=np.int64)
            self.groups = [np.flatnonzero(labels == label) for label in sorted(set(labels.tolist()))]
            self.steps_per_epoch = sum(len(members) // samples_per_step for members in self.groups)
            unused = sum(len(members) for members in self.groups if len(members) < samples_per_step)
            if self.steps_per_epoch == 0:
                sizes = sorted((len(members) for members in self.groups), reverse=True)
                raise ValueError(
                    f"no aspect-ratio bucket holds the {samples_per_step} images one optimizer step needs (largest "
                    f"buckets: {sizes[:5]}); use a smaller batch, more images or no bucketing"
                )
            if unused:
                logger.warning("%d images are in buckets smaller than one step (%d images) and are not trained on",
                               unused, samples_per_step)
        self.epoch = 0
        self.step_in_epoch = 0
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        """The epoch's indices, step after step (samples_per_step each)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.groups is None:
            return rng.permutation(self.dataset_size)
        blocks = []
        for members in self.groups:
            shuffled = rng.permutation(members)
            usable = len(shuffled) // self.samples_per_step * self.samples_per_step
            blocks += np.split(shuffled[:usable], usable // self.samples_per_step) if usable else []
        return np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])

    def next_step(self) -> tuple[torch.Tensor, int]:
        """The indices of the next step's samples and the run-wide number of the first of them."""
        if self._permutation_epoch != self.epoch:
            self._permutation = self._epoch_order()
            self._permutation_epoch = self.epoch
        start = self.step_in_epoch * self.samples_per_step
        indices = torch.from_numpy(self._permutation[start : start + self.samples_per_step].astype(np.int64))
        first_sample_number = (self.epoch * self.steps_per_epoch + self.step_in_epoch) * self.samples_per_step
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        return indices, first_sample_number

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
