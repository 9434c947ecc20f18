"""A groove report: what generated drums play, beside the held-out music they should resemble.

Accuracy and perplexity say how well the model predicts; these statistics say what it writes.
Every statistic is computed over whole 4/4 bars (a trailing partial bar is left out) of a set of
event sequences, the samples or the reference (the evaluate split):

- `<drum>_per_bar`: hits per bar of each drum class; `notes_per_bar`: of all classes together.
- `hit_steps`: the share of steps with any hit.
- `kick_on_1_3`: the share of kick hits on beats 1 and 3 (steps 0 and 8 of 16);
  `snare_on_2_4`: the share of snare hits on the backbeat, beats 2 and 4 (steps 4 and 12);
  `backbeat_bars`: the share of bars with a snare on both 2 and 4.
- `repeat_prev_bar`: the share of bars (from the second of a sequence) that repeat the bar
  before exactly; `repeat_4_bars_back`: the share (from the fifth) that repeat bar k - 4.

A share with nothing to count (no snare hits; sequences shorter than five bars) is NaN.

`distance` is the Jensen-Shannon divergence (base 2: 0 for the same distribution, 1 for disjoint
ones) between where the hits fall in the two sets: the distribution of hits over the 9 x 16 cells
(drum class, step of the bar). It is one number for "which drums play where in the bar", which
is the groove; it is symmetric, bounded and defined when a cell is empty in one set (KL is not),
and it does not grow with the number of samples. The overall density is left to `notes_per_bar`
and `hit_steps`, which the distribution (normalised) does not see.
"""

from __future__ import annotations

import json
import math
import typing as tp
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .encoding import DRUM_NAMES, NUM_CLASSES, STEPS_PER_BAR, events_to_hits

KICK, SNARE = 0, 1
CLASS_KEYS = tuple(name.replace(' ', '_').replace('-', '') for name in DRUM_NAMES)  # closed_hihat, ...
BEATS_1_3 = (0, STEPS_PER_BAR // 2)
BEATS_2_4 = (STEPS_PER_BAR // 4, 3 * STEPS_PER_BAR // 4)


def bars_of(events: np.ndarray) -> np.ndarray:
    """Boolean hits `[bars, 16, 9]` of the whole bars of one sequence."""
    whole = len(events) // STEPS_PER_BAR * STEPS_PER_BAR
    return events_to_hits(np.asarray(events)[:whole]).reshape(-1, STEPS_PER_BAR, NUM_CLASSES)


def _share(count: float, total: float) -> float:
    return count / total if total else math.nan


def grid(sequences: Sequence[np.ndarray]) -> np.ndarray:
    """Hit counts `[16, 9]` per (step of the bar, drum class) over all whole bars."""
    total = np.zeros((STEPS_PER_BAR, NUM_CLASSES))
    for events in sequences:
        total += bars_of(events).sum(axis=0)
    return total


def groove_stats(sequences: Sequence[np.ndarray]) -> dict[str, float]:
    """The statistics of the module docstring for a set of event sequences."""
    per_sequence = [bars_of(events) for events in sequences]
    bars = sum(len(b) for b in per_sequence)
    counts = grid(sequences)
    per_class = counts.sum(axis=0)
    stats = {f'{key}_per_bar': _share(float(per_class[c]), bars) for c, key in enumerate(CLASS_KEYS)}
    stats['notes_per_bar'] = _share(float(per_class.sum()), bars)
    stats['hit_steps'] = _share(sum(float(b.any(axis=2).sum()) for b in per_sequence), bars * STEPS_PER_BAR)
    stats['kick_on_1_3'] = _share(float(counts[list(BEATS_1_3), KICK].sum()), float(per_class[KICK]))
    stats['snare_on_2_4'] = _share(float(counts[list(BEATS_2_4), SNARE].sum()), float(per_class[SNARE]))
    stats['backbeat_bars'] = _share(sum(float(b[:, list(BEATS_2_4), SNARE].all(axis=1).sum())
                                        for b in per_sequence), bars)
    for key, lag in (('repeat_prev_bar', 1), ('repeat_4_bars_back', 4)):
        same = sum(float((b[lag:] == b[:-lag]).all(axis=(1, 2)).sum()) for b in per_sequence)
        stats[key] = _share(same, sum(max(len(b) - lag, 0) for b in per_sequence))
    return stats


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two histograms (normalised here); NaN if one is empty."""
    p, q = np.asarray(p, dtype=float).ravel(), np.asarray(q, dtype=float).ravel()
    if p.sum() <= 0 or q.sum() <= 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nonzero = a > 0
        return float((a[nonzero] * np.log2(a[nonzero] / m[nonzero])).sum())

    return max(0.0, (kl(p) + kl(q)) / 2)


def groove_report(samples: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict:
    """The statistics of the samples and of the reference, their `distance`, and the bars counted."""
    return {
        'samples': groove_stats(samples),
        'reference': groove_stats(reference),
        'distance': js_divergence(grid(samples), grid(reference)),
        'bars': {'samples': sum(len(s) // STEPS_PER_BAR for s in samples),
                 'reference': sum(len(r) // STEPS_PER_BAR for r in reference)},
    }


def report_metrics(report: dict) -> dict[str, float]:
    """The samples' statistics and the distance as flat metrics, `groove_<stat>`."""
    metrics = {f'groove_{key}': value for key, value in report['samples'].items()}
    metrics['groove_distance'] = report['distance']
    return metrics


def write_report(report: dict, path: str | Path) -> None:
    """The report as JSON (NaN, a share with nothing to count, written as null)."""
    def clean(value: tp.Any) -> tp.Any:
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        return None if isinstance(value, float) and math.isnan(value) else value

    Path(path).write_text(json.dumps(clean(report), indent=1, sort_keys=True) + '\n')



def plot_report(report: dict, path: str | Path, title: str = '') -> None:
    """One PNG: hits per bar of each drum class, and the placement and repetition shares, of the
    samples beside the reference."""
    from matplotlib.figure import Figure  # Agg through the object API; not at import time

    samples, reference = report['samples'], report['reference']
    fig = Figure(figsize=(11, 3.6), dpi=100)
    left, right = fig.subplots(1, 2, gridspec_kw={'width_ratios': [3, 2]})
    width = 0.4
    for ax, keys, labels in (
            (left, [f'{k}_per_bar' for k in CLASS_KEYS], DRUM_NAMES),
            (right, ['hit_steps', 'kick_on_1_3', 'snare_on_2_4', 'backbeat_bars', 'repeat_prev_bar',
                     'repeat_4_bars_back'],
             ['any hit', 'kick 1&3', 'snare 2&4', 'backbeat\nbars', 'repeat\nbar k-1', 'repeat\nbar k-4'])):
        x = np.arange(len(keys))
        for offset, (name, stats) in ((-width / 2, ('samples', samples)), (width / 2, ('reference', reference))):
            values = [0.0 if math.isnan(stats[k]) else stats[k] for k in keys]
            ax.bar(x + offset, values, width, label=name)
        ax.set_xticks(x, labels, rotation=45 if ax is left else 0, ha='right' if ax is left else 'center',
                      fontsize=8)
    left.set_ylabel('hits per bar')
    right.set_ylabel('share')
    right.set_ylim(0, 1)
    left.legend(fontsize=8)
    bars = report['bars']
    fig.suptitle(f"{title}  groove distance (JS, bits) {report['distance']:.3f}; "
                 f"{bars['samples']} sample bars, {bars['reference']} reference bars", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), format='png')
