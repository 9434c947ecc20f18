"""Comparing the states of two checkpoints entry by entry (`solver diff`): equal, differs (by how
much), or present in one alone.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass

import torch

from .experiment import ExperimentError


@dataclass
class Difference:
    """How one entry of two states compares: `status` is equal, differs, mismatch, only_a or only_b.

    For `differs` tensors: the largest absolute difference, and that over the largest magnitude
    of either tensor (a scale-free size of the change).
    """

    name: str
    status: str
    max_abs: float | None = None
    max_rel: float | None = None
    detail: str = ''


def flatten(state: tp.Any, prefix: str = '') -> dict[str, tp.Any]:
    """Leaves of a nested state by dotted name (`model.lstm.weight_ih_l0`, `rng.python.1`)."""
    if isinstance(state, dict):
        items: tp.Iterable[tuple[tp.Any, tp.Any]] = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {prefix[:-1]: state}
    out: dict[str, tp.Any] = {}
    for key, value in items:
        out.update(flatten(value, f'{prefix}{key}.'))
    return out


def _compare(name: str, a: tp.Any, b: tp.Any) -> Difference:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return Difference(name, 'mismatch', detail=f"{type(a).__name__} vs {type(b).__name__}")
        same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
        return Difference(name, 'equal' if same else 'differs', detail='' if same else f"{a!r:.40} vs {b!r:.40}")
    if a.shape != b.shape or a.dtype != b.dtype:
        return Difference(name, 'mismatch', detail=f"{_kind(a)} vs {_kind(b)}")
    if torch.equal(a, b):  # bitwise for floats but NaN: compare the bytes below
        return Difference(name, 'equal')
    if a.numel() and torch.equal(_bytes(a), _bytes(b)):
        return Difference(name, 'equal')
    if a.is_floating_point() or a.is_complex():
        x, y = a.double(), b.double()
    else:
        x, y = a.to(torch.float64), b.to(torch.float64)
    delta = (x - y).abs()
    max_abs = float(delta.max()) if delta.numel() else 0.0
    scale = float(torch.maximum(x.abs(), y.abs()).max()) if delta.numel() else 0.0
    return Difference(name, 'differs', max_abs, max_abs / scale if scale else math.inf)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _kind(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def diff(a: dict[str, tp.Any], b: dict[str, tp.Any], states: list[str] | None = None) -> list[Difference]:
    """Entry-by-entry comparison of two checkpoint states, restricted to `states` if given."""
    if states:
        unknown = [s for s in states if s not in a and s not in b]
        if unknown:
            raise ExperimentError(f"--states {','.join(unknown)}: in neither checkpoint; they hold "
                                  f"{sorted(set(a) | set(b))}.")
        a = {k: v for k, v in a.items() if k in states}
        b = {k: v for k, v in b.items() if k in states}
    flat_a, flat_b = flatten(a), flatten(b)
    out = [_compare(name, value, flat_b[name]) if name in flat_b else Difference(name, 'only_a')
           for name, value in flat_a.items()]
    return out + [Difference(name, 'only_b') for name in flat_b if name not in flat_a]
