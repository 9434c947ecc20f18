"""Confidence intervals for metrics computed from summed counts, by a Poisson bootstrap over windows.

A held-out split of a few dozen windows gives accuracies whose second decimal may be noise. Each
bootstrap replicate weighs every window by an independent Poisson(1) count (the classic
bootstrap's multinomial counts, made independent per window), sums the weighted counts and
recomputes the metrics from them; the 2.5th and 97.5th percentiles of the replicates bound the
95% interval. Independent weights need no view of the whole split: each rank weighs its own
windows and the replicate sums add up over ranks like any count.
"""

from __future__ import annotations

import typing as tp

import numpy as np
import torch

from .. import distrib

REPLICATES = 1000


def replicate_sums(rows: torch.Tensor, keys: tp.Sequence[str], seed: int,
                   replicates: int = REPLICATES) -> list[dict[str, float]]:
    """Weighted sums of `rows` (`[windows, len(keys)]`, this rank's per-window counts) for each
    replicate, added up over ranks: one dict of summed counts per replicate."""
    generator = torch.Generator().manual_seed(seed * 7919 + distrib.rank())
    weights = torch.poisson(torch.ones(replicates, len(rows), dtype=torch.float64), generator=generator)
    sums = (weights @ rows.double().cpu()).numpy()
    flat = distrib.sum_metrics({f'{key}@{r}': float(sums[r, k]) for r in range(replicates)
                                for k, key in enumerate(keys)})
    return [{key: flat[f'{key}@{r}'] for key in keys} for r in range(replicates)]


def intervals(replicates: list[dict[str, float]], metrics: tp.Callable[[dict[str, float]], dict[str, float]],
              names: tp.Iterable[str], level: float = 0.95) -> dict[str, float]:
    """`<name>_ci_low` and `<name>_ci_high`: the percentile interval of each metric over the
    replicates (`metrics` turns one replicate's sums into metrics; NaN replicates are left out)."""
    values = [metrics(sums) for sums in replicates]
    tail = (1 - level) / 2 * 100
    out = {}
    for name in names:
        sample = np.array([v[name] for v in values], dtype=float)
        sample = sample[np.isfinite(sample)]
        low, high = np.percentile(sample, [tail, 100 - tail]) if len(sample) else (np.nan, np.nan)
        out[f'{name}_ci_low'], out[f'{name}_ci_high'] = float(low), float(high)
    return out
