"""What a run tells its user: progress lines of a stage, model sizes, past epochs, Dora's history."""

from __future__ import annotations

import json
import logging
import time
import typing as tp
from pathlib import Path

from dora.utils import jsonable

from .checkpointing.fs import atomic_open

logger = logging.getLogger(__name__)


class ProgressLog:
    """Logs `Stage | epoch E | done/total | rate | ETA | metrics` every `every` steps and at the end."""

    def __init__(self, stage: str, epoch: int, total: int, every: int, start: int = 0) -> None:
        self.stage, self.epoch, self.total, self.start = stage, epoch, total, start
        self.every = max(1, every)
        self.begin = time.time()

    def update(self, done: int, metrics: dict[str, float]) -> None:
        if done % self.every and done != self.total:
            return
        elapsed = time.time() - self.begin
        rate = (done - self.start) / max(elapsed, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        shown = ' | '.join(f"{k} {v:.4f}" for k, v in metrics.items())
        logger.info("%s | epoch %d | %d/%d | %.2f steps/s | ETA %s | %s", self.stage.capitalize(),
                    self.epoch, done, self.total, rate, duration(eta), shown)


def duration(seconds: float) -> str:
    """`m:ss`."""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def describe_modules(modules: dict[str, tp.Any]) -> None:
    """Log the parameter count and float32 size of each module."""
    for name, module in modules.items():
        size = sum(p.numel() for p in module.parameters())
        logger.info("%s: %s parameters (%.1f MB float32)", name, f"{size:,}", size * 4 / 2**20)


def write_history(path: Path, history: list[dict[str, tp.Any]]) -> None:
    """Write Dora's history.json atomically (a reader sees the old or the new file)."""
    with atomic_open(path) as f:
        f.write(json.dumps(jsonable(history), indent=2).encode())


def replay_history(history: list[dict[str, dict[str, tp.Any]]]) -> None:
    """Log the metrics of past epochs again, as a resumed run's log would lack them."""
    for epoch, stages in enumerate(history, start=1):
        for stage, metrics in stages.items():
            shown = ' | '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            logger.info("[replay] epoch %d %s | %s", epoch, stage, shown)
