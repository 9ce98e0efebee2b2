"""Which images each optimizer step sees, and the randomness each of those samples gets.

Every epoch is a fresh permutation of the dataset seeded by (seed, epoch), cut into consecutive
blocks of `samples_per_step` (train_batch_size x processes x accumulation steps); a final partial
block is dropped. Sample number n of the run (counted over the whole run) draws its latent sample,
noise and timestep from its own generator seeded by (seed, n).

So the loop's randomness depends only on the seed and the position in the run, never on how a
step's samples are split between processes and accumulation micro-batches, and resuming needs
nothing but the position (`state_dict`).
"""

from __future__ import annotations

import numpy as np
import torch


def sample_generator(seed: int, sample_number: int) -> torch.Generator:
    """A CPU generator that depends only on the run seed and the sample's number in the run."""
    words = np.random.SeedSequence([seed, sample_number]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


class DataOrder:
    """The dataset indices of each optimizer step, in a resumable order."""

    def __init__(self, dataset_size: int, samples_per_step: int, seed: int) -> None:
        if samples_per_step > dataset_size:
            raise ValueError(
                f"the dataset has {dataset_size} images but one optimizer step needs {samples_per_step} "
                "(train_batch_size x processes x gradient_accumulation_steps); use a smaller batch or more images"
            )
        self.dataset_size = dataset_size
        self.samples_per_step = samples_per_step
        self.seed = seed
        self.steps_per_epoch = dataset_size // samples_per_step
        self.epoch = 0
        self.step_in_epoch = 0
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def next_step(self) -> tuple[torch.Tensor, int]:
        """The indices of the next step's samples and the run-wide number of the first of them."""
        if self._permutation_epoch != self.epoch:
            self._permutation = np.random.default_rng([self.seed, self.epoch]).permutation(self.dataset_size)
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
