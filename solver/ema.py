"""Exponential moving average of the parameters and buffers of registered modules."""

from __future__ import annotations

import typing as tp

import torch
from torch import nn


class ModuleDictEMA:
    """EMA of a dict of modules, updated every `updates` calls of `step()`.

    Only floating point tensors are averaged; others (step counters) are copied. The averages
    live on the modules' device, so an update costs one fused kernel per tensor.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float = 0.999, updates: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"optim.ema.decay must be in [0, 1), got {decay}.")
        if updates < 1:
            raise ValueError(f"optim.ema.updates must be >= 1, got {updates}.")
        self.modules = modules
        self.decay = decay
        self.updates = updates
        self.count = 0
        self.state: dict[str, dict[str, torch.Tensor]] = {
            name: {key: value.detach().clone() for key, value in module.state_dict().items()}
            for name, module in modules.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.count += 1
        if self.count % self.updates:
            return
        for name, module in self.modules.items():
            averages = self.state[name]
            for key, value in module.state_dict().items():
                if value.is_floating_point():
                    averages[key].lerp_(value.detach(), 1.0 - self.decay)
                else:
                    averages[key].copy_(value)

    def state_dict(self) -> dict[str, tp.Any]:
        return {'count': self.count, 'state': self.state}

    def load_state_dict(self, state: dict[str, tp.Any]) -> None:
        self.count = state['count']
        for name, averages in state['state'].items():
            for key, value in averages.items():
                self.state[name][key].copy_(value)
