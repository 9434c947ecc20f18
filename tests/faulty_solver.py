"""A test-only solver: the regression solver with faults injected where the tests ask.

`dora run solver=regression solver_class=faulty_solver.FaultySolver +faults.<key>=...` runs it
(the tests put this folder on PYTHONPATH: see `helpers.dora_env`). Keys, all optional:

- `nan_batches`: positions in the training batch stream (0-based) whose inputs are NaN, so the
  loss of that step is NaN (see `checkpoint.rollback`);
- `sigterm_batches`: positions during whose step the process sends itself SIGTERM (a preemption
  that lands exactly there);
- `slow_stage`, `slow_seconds`: sleep that long per batch of that stage (valid, evaluate or
  generate), and log `Slow <stage> batch <i>`: a stage long enough to be signalled in.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import typing as tp

import torch

from solver.regression import RegressionSolver

logger = logging.getLogger(__name__)


class FaultySolver(RegressionSolver):
    def fault(self, key: str, default: tp.Any = None) -> tp.Any:
        return (self.cfg.get('faults') or {}).get(key, default)

    def run_step(self, idx: int, batch: tp.Any, metrics: dict[str, float]) -> dict[str, float]:
        if self.is_training:
            position = self.progress['train_batches']
            if position in self.fault('sigterm_batches', []):
                os.kill(os.getpid(), signal.SIGTERM)
            if position in self.fault('nan_batches', []):
                x, y = batch
                batch = (torch.full_like(x, float('nan')), y)
        else:
            self.slow(self._current_stage, idx)
        return super().run_step(idx, batch, metrics)

    def slow(self, stage: str | None, idx: int) -> None:
        if stage == self.fault('slow_stage'):
            logger.info("Slow %s batch %d", stage, idx)
            time.sleep(float(self.fault('slow_seconds', 1.0)))

    def generate(self) -> dict[str, float]:
        for idx in range(4 if self.fault('slow_stage') == 'generate' else 0):
            self.check_stop()
            self.slow('generate', idx)
        return super().generate()
