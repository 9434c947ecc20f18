"""Early stopping as a policy: a value that decides from the scores of the epochs so far.

`EarlyStop(patience=3).decide(scores)` says whether the epoch of the last score ends the run and
why (the record goes into that epoch's history, so a resume sees the experiment complete). The
count comes from the scores alone, so it survives a resume. Shaped like the save and keep
policies of `checkpointing.policy`: frozen, one method, tested alone.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass


@dataclass(frozen=True)
class Stop:
    """Why the run stops: no improvement by more than `min_delta` for `epochs` epochs."""

    epochs_without_improvement: int
    patience: int
    min_delta: float

    def record(self) -> dict[str, tp.Any]:
        """The history entry's `early_stop` (what `solver ls` and a resume read)."""
        return {'epochs_without_improvement': self.epochs_without_improvement, 'patience': self.patience,
                'min_delta': self.min_delta}


@dataclass(frozen=True)
class EarlyStop:
    """Stop once the score has not improved by more than `min_delta` for `patience` epochs
    (`patience` 0 or None: never)."""

    patience: int | None = None
    min_delta: float = 0.0
    lower_is_better: bool = True

    @classmethod
    def from_config(cls, cfg: tp.Any, lower_is_better: bool = True) -> EarlyStop:
        """From the `early_stop` config section (absent: never stop early)."""
        cfg = cfg or {}
        return cls(cfg.get('patience'), float(cfg.get('min_delta') or 0.0), lower_is_better)

    def decide(self, scores: tp.Sequence[float | None]) -> Stop | None:
        """Whether the epoch of the last of `scores` (the best metric of each epoch in order, None
        where an epoch has none) ends the run, and why; None to go on."""
        if not self.patience:
            return None
        since = epochs_without_improvement(scores, self.lower_is_better, self.min_delta)
        return Stop(since, self.patience, self.min_delta) if since >= self.patience else None


def epochs_without_improvement(scores: tp.Sequence[float | None], lower_is_better: bool = True,
                               min_delta: float = 0.0) -> int:
    """Epochs since the best score last improved by more than `min_delta` (None scores count)."""
    best: float | None = None
    since = 0
    for score in scores:
        since += 1
        if score is None:
            continue
        gain = (best - score if lower_is_better else score - best) if best is not None else math.inf
        if gain > min_delta:
            best, since = score, 0
    return since
