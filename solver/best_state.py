"""Copies of the best-scoring states, kept apart from the live ones."""

from __future__ import annotations

import typing as tp

import torch
from flashy.state import StateDictSource


def copy_state(state: tp.Any) -> tp.Any:
    """A deep copy of a state dict in which every tensor is cloned (not shared)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: copy_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(copy_state(value) for value in state)
    return state


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
