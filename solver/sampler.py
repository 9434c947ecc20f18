"""A batch sampler whose position is part of the training state, for exact resume.

Batches are a pure function of (seed, batch index): pass k over the data uses the permutation
drawn from a generator seeded with (seed, k), cut into global batches of `batch_size`; each rank
takes its own slice of every global batch. The stream is endless, so an epoch of
`updates_per_epoch` batches may cross pass boundaries, and resuming is setting `position` to the
number of batches the training loop consumed: no RNG state to replay, and DataLoader workers'
prefetching does not matter because the position is counted by the consumer.
"""

from __future__ import annotations

import typing as tp

import torch


class ResumableBatchSampler:
    def __init__(self, dataset_size: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"dataset.batch_size ({batch_size}) must be divisible by the number of "
                             f"ranks ({world_size}): it is the global batch, split across ranks.")
        if dataset_size < batch_size:
            raise ValueError(f"The training set has {dataset_size} items, fewer than one batch "
                             f"(dataset.batch_size={batch_size}): lower the batch size or add data.")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # global batches consumed so far; set by the solver on resume

    def __len__(self) -> int:
        """Batches in one pass over the data (the last incomplete batch is dropped)."""
        return self.dataset_size // self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> tp.Iterator[list[int]]:
        index = self.position
        permutation_epoch, permutation = -1, torch.empty(0, dtype=torch.long)
        while True:
            epoch, offset = divmod(index, len(self))
            if epoch != permutation_epoch:
                permutation_epoch, permutation = epoch, self._permutation(epoch)
            start = offset * self.batch_size
            yield permutation[start:start + self.batch_size][self.rank::self.world_size].tolist()
            index += 1
