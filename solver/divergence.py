"""Divergence detection: a non-finite loss, or a spike over its running mean, triggers a rollback."""

from __future__ import annotations

import math

from . import distrib
from .errors import DivergenceError


class LossWatch:
    """Checks each training loss; raises `DivergenceError` on every rank when any rank diverged.

    `spike_factor=k` also catches a loss over k x its running mean (an exponential average).
    """

    def __init__(self, spike_factor: float | None = None) -> None:
        self.spike_factor = spike_factor
        self.mean: float | None = None

    def check(self, metrics: dict[str, float]) -> None:
        if 'loss' not in metrics:
            return
        loss, mean = metrics['loss'], self.mean
        problem = None
        if not math.isfinite(loss):
            problem = f"loss is {loss}"
        elif self.spike_factor and mean is not None and loss > self.spike_factor * mean:
            problem = f"loss {loss:.4g} > {self.spike_factor} x running mean {mean:.4g}"
        if distrib.any_rank(problem is not None)[0]:  # all ranks roll back (or stop) together
            raise DivergenceError(problem or "the loss diverged on another rank")
        self.mean = loss if mean is None else 0.98 * mean + 0.02 * loss

    def reset(self) -> None:
        """Forget the running mean (after a rollback)."""
        self.mean = None
