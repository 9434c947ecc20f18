"""The run's position: where training stands, saved in every checkpoint as the stateful 'progress'.

A resume (or a rollback) puts the run back exactly here: the steps made, the batches drawn from
the train loader (steps plus those a rollback skipped), the step within the current epoch and the
running sums of that epoch's metrics, so a save mid-epoch resumes at the very next batch.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Steps, batches drawn, the step within the epoch and its metrics' running sums."""

    step: int = 0                  # optimizer steps made
    train_batches: int = 0         # batches drawn from the train loader: steps + skipped by rollbacks
    epoch_step: int = 0            # steps made in the current epoch
    sums: dict[str, float] = field(default_factory=dict)  # the current epoch's metrics, summed

    def stepped(self, epoch_step: int) -> None:
        """An optimizer step was made; it was the `epoch_step`-th of its epoch."""
        self.step += 1
        self.train_batches += 1
        self.epoch_step = epoch_step

    def skip_to(self, train_batch: int) -> tuple[int, int]:
        """Go on from the train batch after `train_batch` (a rollback skips what led to a
        divergence); return the batches skipped (first, last)."""
        skipped = (self.train_batches, train_batch)
        self.train_batches = train_batch + 1
        return skipped

    def new_epoch(self) -> None:
        self.epoch_step = 0
        self.sums = {}

    def state_dict(self) -> dict[str, tp.Any]:
        """The plain dict checkpoints have always held under 'progress'."""
        return {'step': self.step, 'train_batches': self.train_batches, 'epoch_step': self.epoch_step,
                'sums': self.sums}

    def load_state_dict(self, state: dict[str, tp.Any]) -> None:
        """Load a checkpoint's 'progress' (any checkpoint since it was a dict: the same keys)."""
        self.step = int(state['step'])
        self.train_batches = int(state['train_batches'])
        self.epoch_step = int(state['epoch_step'])
        self.sums = {str(key): float(value) for key, value in dict(state['sums']).items()}
