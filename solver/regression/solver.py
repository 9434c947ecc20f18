"""RegressionSolver: a StandardSolver in one file (see the package docstring)."""

from __future__ import annotations

import json
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from solver import builders, distrib
from solver.base import StandardSolver


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
        self.dataloaders['train'] = builders.get_train_loader(
            make_dataset(data.train_size, data.dim, seed=1), self.cfg, seed=self.cfg.seed)
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
        x, y = (t.to(self.device) for t in batch)
        loss = F.mse_loss(self.model(x), y)
        if self.is_training:
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return {'loss': loss.item()}

    def evaluate(self) -> dict[str, float]:
        losses = []
        for i, batch in enumerate(self.dataloaders['evaluate']):
            self.check_stop()  # a preemption signal stops the stage here
            losses.append(self.run_step(i, batch, {})['loss'])
        return distrib.average_metrics({'loss': sum(losses) / len(losses)}, len(losses))

    def generate(self) -> dict[str, float]:
        """Write the predictions on a few fixed inputs as JSON under samples/epoch_<N>/."""
        self.check_stop()
        x = make_dataset(4, self.cfg.dataset.dim, seed=99).tensors[0].to(self.device)
        predictions = self.model(x).squeeze(1).tolist()  # on every rank: a sharded model needs all
        if distrib.is_rank_zero():
            folder = self.folder / 'samples' / f'epoch_{self.epoch}'
            folder.mkdir(parents=True, exist_ok=True)
            (folder / 'predictions.json').write_text(json.dumps(predictions))
        return {}
