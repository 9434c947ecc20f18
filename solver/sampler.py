"""A batch sampler whose position is part of the training state, for exact resume.

Batches are a pure function of (seed, batch index): pass k over the data uses the permutation
drawn from a generator seeded with (seed, k), cut into global batches of `batch_size`; each rank
takes its own slice of every global batch. The stream is endless, so an epoch of
`updates_per_epoch` batches may cross pass boundaries, and resuming is setting `position` to the
number of batches the training loop consumed: no RNG state to replay, and DataLoader workers'
prefetching does not matter because the position is counted by the consumer.

A dataset smaller than one batch still gives full batches: the passes' permutations are read
one after another and each batch takes the next `batch_size` items, so an item appears in a
batch as often as whole passes fit in it (and once more for some). A dataset of at least one
batch keeps one pass per run of batches, its incomplete last batch dropped.
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
        if dataset_size < 1 or batch_size < 1:
            raise ValueError(f"The training set has {dataset_size} items and dataset.batch_size is "
                             f"{batch_size}: both must be at least 1.")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # global batches consumed so far; set by the solver on resume
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        """Batches in one pass over the data (the last incomplete batch is dropped); at least 1."""
        return max(1, self.dataset_size // self.batch_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) > 64:  # passes are read in order: old ones are done with
                self._permutations.clear()
            if not self.shuffle:
                permutation = torch.arange(self.dataset_size)
            else:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                permutation = torch.randperm(self.dataset_size, generator=generator)
            self._permutations[epoch] = permutation
        return self._permutations[epoch]

    def global_batch(self, index: int) -> list[int]:
        """The dataset indices of global batch `index` (all ranks' shares), a function of seed and index."""
        size, batch = self.dataset_size, self.batch_size
        if size >= batch:
            epoch, offset = divmod(index, len(self))
            return self._permutation(epoch)[offset * batch:(offset + 1) * batch].tolist()
        items: list[int] = []
        while len(items) < batch:  # the passes read back to back, from item index * batch on
            epoch, offset = divmod(index * batch + len(items), size)
            items.extend(self._permutation(epoch)[offset:offset + batch - len(items)].tolist())
        return items

    def __iter__(self) -> tp.Iterator[list[int]]:
        index = self.position
        while True:
            yield self.global_batch(index)[self.rank::self.world_size]
            index += 1
