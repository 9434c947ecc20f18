"""RegressionSolver: a StandardSolver in one file (see the package docstring)."""

from __future__ import annotations

import json
import os
import signal
import typing as tp
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from .. import builders, distrib
from ..base import StandardSolver

#: a folder: every rank appends the dataset indices of each training batch it takes to
#: `rank<N>.jsonl` there (for the tests of the data order across world sizes)
RECORD_SAMPLES_ENV = 'SOLVER_RECORD_SAMPLES'


def make_dataset(size: int, dim: int, seed: int) -> TensorDataset:
    """Noisy targets of a fixed random linear map (the same map for every seed)."""
    weight = torch.randn(dim, 1, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, dim, generator=generator)
    y = x @ weight + 0.1 * torch.randn(size, 1, generator=generator)
    return TensorDataset(x, y)


class RegressionSolver(StandardSolver):
    def build_dataloaders(self) -> None:
        data = self.cfg.dataset
        train = make_dataset(data.train_size, data.dim, seed=1)  # + each item's index, recorded
        self.dataloaders['train'] = builders.get_train_loader(
            TensorDataset(*train.tensors, torch.arange(data.train_size)), self.cfg, seed=self.cfg.seed)
        for seed, stage in enumerate(['valid', 'evaluate'], start=2):
            self.dataloaders[stage] = builders.get_eval_loader(
                make_dataset(data.eval_size, data.dim, seed=seed), self.cfg)

    def build_model(self) -> None:
        dim, hidden = self.cfg.dataset.dim, self.cfg.model.hidden_size
        self.model = self.distribute(
            nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(self.device))
        self.optimizer = builders.get_optimizer(self.model.parameters(), self.cfg.optim)
        self.register_stateful('model', 'optimizer')
        self.register_best_state('model')
        self.register_ema('model')

    def run_step(self, idx: int, batch: tp.Any, metrics: dict[str, float]) -> dict[str, float]:
        x, y = (t.to(self.device) for t in batch[:2])
        if self.is_training:
            self.record_samples(batch[2])
            x = self.inject_faults(x)
        loss = F.mse_loss(self.model(x), y)
        if self.is_training:
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return {'loss': loss.item()}

    def record_samples(self, indices: torch.Tensor) -> None:
        """Append this rank's sample indices at this position of the stream ($SOLVER_RECORD_SAMPLES)."""
        folder = os.environ.get(RECORD_SAMPLES_ENV)
        if folder:
            line = {'batch': self.progress['train_batches'], 'rank': distrib.rank(),
                    'world_size': distrib.world_size(), 'samples': indices.tolist()}
            with open(Path(folder) / f'rank{distrib.rank()}.jsonl', 'a') as f:
                f.write(json.dumps(line) + '\n')

    def inject_faults(self, x: torch.Tensor) -> torch.Tensor:
        """The tests' faults (`faults.*`) at this position of the training stream: a NaN batch, or
        a SIGTERM in the middle of the step."""
        position = self.progress['train_batches']
        if position in self.cfg.faults.sigterm_batches:
            os.kill(os.getpid(), signal.SIGTERM)
        if position in self.cfg.faults.nan_batches:
            x = torch.full_like(x, float('nan'))
        return x

    def evaluate(self) -> dict[str, float]:
        losses = [self.run_step(i, batch, {})['loss'] for i, batch in enumerate(self.dataloaders['evaluate'])]
        return distrib.average_metrics({'loss': sum(losses) / len(losses)}, len(losses))

    def generate(self) -> dict[str, float]:
        """Write the predictions on a few fixed inputs as JSON under samples/epoch_<N>/."""
        x = make_dataset(4, self.cfg.dataset.dim, seed=99).tensors[0].to(self.device)
        predictions = self.model(x).squeeze(1).tolist()  # on every rank: a sharded model needs all
        if distrib.is_rank_zero():
            folder = self.folder / 'samples' / f'epoch_{self.epoch}'
            folder.mkdir(parents=True, exist_ok=True)
            (folder / 'predictions.json').write_text(json.dumps(predictions))
        return {}
