"""Copies of the best-scoring states, kept apart from the live ones, and what loads them
(`checkpoint.ignore_state_keys` for `continue_from`)."""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import torch
from flashy.state import StateDictSource
from torch import nn

from .checkpointing import partial
from .checkpointing.partial import LoadReport
from .checkpointing.tree import map_leaves
from .errors import SolverError

logger = logging.getLogger(__name__)


def copy_state(state: tp.Any) -> tp.Any:
    """A deep copy of a state dict in which every tensor is cloned (not shared)."""
    return map_leaves(state, lambda value, *_: value.detach().clone() if isinstance(value, torch.Tensor) else value)


def copy_into(current: tp.Any, state: tp.Any) -> tp.Any:
    """`state` copied into the tensors of `current` where they fit (same shape, dtype and device),
    elsewhere cloned: loading a state reuses the memory already there (a copy onto itself, as
    after `read_checkpoint(into=...)`, costs nothing)."""
    if isinstance(state, torch.Tensor):
        if isinstance(current, torch.Tensor) and current.shape == state.shape \
                and current.dtype == state.dtype and current.device == state.device:
            return current.copy_(state)
        return state.detach().clone()
    if isinstance(state, dict):
        current = current if isinstance(current, dict) else {}
        return {key: copy_into(current.get(key), value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(copy_state(value) for value in state)
    return state


class BestState:
    """The best states of registered sources, with the metric value that made them best."""

    def __init__(self, lower_is_better: bool = True) -> None:
        self.lower_is_better = lower_is_better
        self.sources: dict[str, StateDictSource] = {}
        self.states: dict[str, tp.Any] = {}
        self.metric: float | None = None

    def register(self, name: str, source: StateDictSource) -> None:
        self.sources[name] = source
        self.states[name] = copy_state(source.state_dict())

    def is_better(self, value: float) -> bool:
        if self.metric is None:
            return True
        return value < self.metric if self.lower_is_better else value > self.metric

    def update(self, value: float) -> None:
        """Record `value` as the best metric and copy the sources' current states."""
        self.metric = float(value)
        for name, source in self.sources.items():
            self.states[name] = copy_state(source.state_dict())

    def state_dict(self) -> dict[str, tp.Any]:
        return {'metric': self.metric, 'states': self.states}

    def load_state_dict(self, state: dict[str, tp.Any]) -> None:
        self.metric = state['metric']
        unknown = set(state['states']) - set(self.sources)
        if unknown:
            raise KeyError(f"best state has entries {sorted(unknown)} that this solver does not register")
        self.states.update(copy_into(self.states, state['states']))


def best_state_target(best: BestState, sources: tp.Mapping[str, tp.Any], ignored: tp.Any) -> dict[str, tp.Any]:
    """Where `continue_from` reads a source's best state (`read_checkpoint(into=...)`): the live
    states of the sources `best` tracks, without `checkpoint.ignore_state_keys` (those keep their values)."""
    live = {name: sources[name].state_dict() for name in best.sources}
    return {'best_state': {'states': drop_keys(live, list(ignored or []))}}


def drop_keys(states: dict[str, tp.Any], ignored: list[str]) -> dict[str, tp.Any]:
    """States without the entries of `checkpoint.ignore_state_keys`.

    'model' drops a whole state; 'model.head' drops every key of the 'model' state that is
    'head' or starts with 'head.'.
    """
    kept = {name: state for name, state in states.items() if name not in ignored}
    for key in ignored:
        name, _, prefix = key.partition('.')
        if prefix and name in kept and isinstance(kept[name], dict):
            kept[name] = {k: v for k, v in kept[name].items()
                          if not (k == prefix or str(k).startswith(prefix + '.'))}
    return kept


def take_best_state(best: BestState, source_state: dict[str, tp.Any], path: Path, ignored: list[str],
                    registered: tp.Callable[[str], tp.Any], strict: bool = True,
                    report_file: Path | None = None) -> LoadReport:
    """Load the best states of a checkpoint's state (`continue_from`) into the sources `best`
    tracks, and make them the best states; return the report of what was loaded and skipped
    (also written to `report_file`). `ignored` as in `drop_keys`; `registered(name)` gives the
    live object: a module is loaded entry by entry (`partial.fit_module`). With `strict`, any
    entry skipped for another reason than `ignored` refuses the load, naming it; without, what
    fits is loaded and the rest stays as initialised."""
    states = source_state.get('best_state', {}).get('states')
    if not states:
        raise SolverError(f"{path} has no best state to continue from.")
    states = drop_keys(states, ignored)
    unknown = set(states) - set(best.sources)
    if unknown:
        raise SolverError(f"{path}: best state has {sorted(unknown)}, which this solver "
                          f"does not register (it has {sorted(best.sources)}).")
    report = LoadReport(str(path))
    taken = {}
    for name, state in states.items():
        target = registered(name)
        if isinstance(target, nn.Module):
            taken[name] = partial.fit_module(name, target.state_dict(), state, ignored, report)
        else:
            taken[name] = state
            report.loaded.append(name)
    if report_file is not None:
        report.write(report_file)
    problems = report.problems(lambda why: why == partial.IGNORED)
    if strict and problems:
        listed = '; '.join(f"{place}: {why}" for place, why in list(problems.items())[:3])
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ''
        where = f" (all in {report_file})" if report_file is not None else ''
        raise SolverError(f"{path} does not fit this model: {listed}{more}{where}. "
                          "checkpoint.strict=false loads what fits; checkpoint.ignore_state_keys=[...] drops "
                          "entries on purpose.")
    for name, state in taken.items():
        target = registered(name)
        try:
            if isinstance(target, nn.Module):
                target.load_state_dict(state, strict=False)
            else:
                best.sources[name].load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as err:
            raise SolverError(f"{path} does not fit this model: {err}") from err
        best.states[name] = copy_state(best.sources[name].state_dict())
    return report
