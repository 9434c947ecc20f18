"""Evaluate's confidence intervals: per-window counts that add up to the split's, and a Poisson
bootstrap over them whose interval holds the estimate and narrows with more windows."""

from __future__ import annotations

import pytest
import torch

from solver.drums.bootstrap import intervals, replicate_sums
from solver.drums.model import IGNORE_INDEX, NUM_EVENTS, WINDOW_KEYS, sequence_metrics, window_counts
from solver.drums.solver import split_summary


def test_window_counts_add_up_to_the_batch_counts():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 12, NUM_EVENTS), torch.randint(0, 4, (5, 12))
    labels[3, 8:] = IGNORE_INDEX  # a padded window
    later = (torch.arange(12) >= 6)[None].expand(5, 12)
    rows = window_counts(logits, labels, later)
    whole, after = sequence_metrics(logits, labels), sequence_metrics(logits, labels, mask=later)
    expected = {**{k: float(v) for k, v in whole.items()}, 'later_correct': float(after['correct']),
                'later_count': float(after['count'])}
    assert dict(zip(WINDOW_KEYS, rows.sum(0).tolist())) == pytest.approx(expected)
    assert rows[3, WINDOW_KEYS.index('count')] == 8


def windows(n: int, accuracy: float) -> torch.Tensor:
    """n windows of 16 labels, alternating above and below `accuracy` (mean exactly `accuracy`)."""
    correct = torch.tensor([16 * accuracy + (2 if i % 2 else -2) for i in range(n)], dtype=torch.float64)
    count = torch.full((n,), 16.0, dtype=torch.float64)
    columns = {'loss_sum': count * 0.5, 'count': count, 'correct': correct, 'event_count': count,
               'event_correct': correct, 'no_event_count': count, 'no_event_correct': correct,
               'later_correct': correct, 'later_count': count}
    return torch.stack([columns[k] for k in WINDOW_KEYS], dim=1)


def test_the_interval_holds_the_estimate_and_narrows_with_more_windows():
    width = {}
    for n in (10, 160):
        ci = intervals(replicate_sums(windows(n, 0.5), WINDOW_KEYS, seed=1), split_summary, ['accuracy', 'loss'])
        assert ci['accuracy_ci_low'] < 0.5 < ci['accuracy_ci_high']
        assert ci['loss_ci_low'] == ci['loss_ci_high'] == pytest.approx(0.5)  # the same loss in every window
        width[n] = ci['accuracy_ci_high'] - ci['accuracy_ci_low']
    assert width[160] < width[10] / 3  # about sqrt(16) = 4 times narrower
