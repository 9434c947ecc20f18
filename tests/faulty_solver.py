"""A test-only solver: the regression solver with faults injected where the tests ask.

`dora run solver=regression solver_class=faulty_solver.FaultySolver +faults.<key>=...` runs it
(the tests put this folder on PYTHONPATH: see `helpers.dora_env`). Keys, all optional:

- `nan_batches`: positions in the training batch stream (0-based) whose inputs are NaN, so the
  loss of that step is NaN (see `checkpoint.rollback`);
- `sigterm_batches`: positions during whose step the process sends itself SIGTERM (a preemption
  that lands exactly there);
- `partial_rollback`: `{epoch: E, to: N, only: [prefix, ...]}`: at the start of epoch E's train
  stage, `rollback_partial(only, N)`, as a task rolling a sub-model back in process would;
- `slow_stage`, `slow_seconds`, `slow_epochs`: sleep that long per batch of that stage (valid,
  evaluate or generate) in those epochs (default: all), and log `Slow <stage> batch <i>`: a
  stage long enough to be signalled in.

With `$SOLVER_RECORD_SAMPLES` set to a folder, every rank appends the dataset indices of each
training batch it takes to `rank<N>.jsonl` there (the data-order tests across world sizes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import typing as tp
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from solver import builders, distrib
from solver.regression import RegressionSolver
from solver.regression.solver import make_dataset

logger = logging.getLogger(__name__)


RECORD_SAMPLES_ENV = 'SOLVER_RECORD_SAMPLES'


class FaultySolver(RegressionSolver):
    def build_dataloaders(self) -> None:
        """The regression loaders, with each training item's index carried beside it."""
        super().build_dataloaders()
        data = self.cfg.dataset
        train = make_dataset(data.train_size, data.dim, seed=1)
        self.dataloaders['train'] = builders.get_train_loader(
            TensorDataset(*train.tensors, torch.arange(data.train_size)), self.cfg, seed=self.cfg.seed)

    def record_samples(self, indices: torch.Tensor) -> None:
        """Append this rank's sample indices at this position of the stream."""
        folder = os.environ.get(RECORD_SAMPLES_ENV)
        if folder:
            line = {'batch': self.progress.train_batches, 'rank': distrib.rank(),
                    'world_size': distrib.world_size(), 'samples': indices.tolist()}
            with open(Path(folder) / f'rank{distrib.rank()}.jsonl', 'a') as f:
                f.write(json.dumps(line) + '\n')

    def fault(self, key: str, default: tp.Any = None) -> tp.Any:
        return (self.cfg.get('faults') or {}).get(key, default)

    def train(self) -> dict[str, float]:
        asked = self.fault('partial_rollback')
        if asked and self.epoch == asked['epoch'] and not self.progress.epoch_step:
            self.rollback_partial([str(prefix) for prefix in asked['only']], int(asked['to']))
        return super().train()

    def run_step(self, idx: int, batch: tp.Any, metrics: dict[str, float]) -> dict[str, float]:
        if self.is_training:
            x, y, indices = batch
            self.record_samples(indices)
            batch = (x, y)
            position = self.progress.train_batches
            if position in self.fault('sigterm_batches', []):
                os.kill(os.getpid(), signal.SIGTERM)
            if position in self.fault('nan_batches', []):
                x, y = batch
                batch = (torch.full_like(x, float('nan')), y)
        else:
            self.slow(self._current_stage, idx)
        return super().run_step(idx, batch, metrics)

    def slow(self, stage: str | None, idx: int) -> None:
        epochs = self.fault('slow_epochs')
        if stage == self.fault('slow_stage') and (epochs is None or self.epoch in epochs):
            logger.info("Slow %s batch %d", stage, idx)
            time.sleep(float(self.fault('slow_seconds', 1.0)))

    def generate(self) -> dict[str, float]:
        for idx in range(4 if self.fault('slow_stage') == 'generate' else 0):
            self.check_stop()
            self.slow('generate', idx)
        return super().generate()


class NoOptimizerSolver(RegressionSolver):
    """The regression solver with its optimizer under another name (`self.adam`): a task the
    framework cannot build `schedule.lr_scheduler` for."""

    def build_model(self) -> None:
        super().build_model()
        self.adam = self.optimizer
        del self.optimizer
