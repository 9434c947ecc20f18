"""A solver's registered states: loading saved ones, swapping them for a while, the full template."""

from __future__ import annotations

import contextlib
import typing as tp
from pathlib import Path

import torch
from flashy.state import StateDictSource

from . import distrib
from .best_state import copy_state
from .errors import SolverError


def load_states(sources: dict[str, StateDictSource], state: dict[str, tp.Any], path: Path) -> None:
    """Load a checkpoint's states (`path` names it in errors) into exactly these sources."""
    state = {name: value for name, value in state.items() if name != 'xp.sig'}
    expected = {name for name in sources if name != 'xp.sig'}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise SolverError(
            f"{path} does not fit this solver: missing states {sorted(missing)}, unexpected "
            f"states {sorted(unexpected)}. Was it written by another solver or config?")
    try:
        for name, value in state.items():
            sources[name].load_state_dict(value)
    except (RuntimeError, KeyError, ValueError) as err:
        raise SolverError(f"{path} does not fit this model: {err}") from err


@contextlib.contextmanager
def swapped(sources: dict[str, StateDictSource], states: dict[str, tp.Any]) -> tp.Iterator[None]:
    """Run the block with `states` loaded into their sources; the live ones come back even on error."""
    saved = {name: copy_state(sources[name].state_dict()) for name in states}
    try:
        for name, state in states.items():
            sources[name].load_state_dict(state)
        yield
    finally:
        for name, state in saved.items():
            sources[name].load_state_dict(state)


def full_state(state_dict: tp.Callable[[], dict[str, tp.Any]], objects: tp.Iterable[tp.Any]) -> dict[str, tp.Any]:
    """`state_dict()` as it is once training has begun (a load template, and what the async
    writer's staging buffers are made for before the first step).

    An optimizer (among `objects`) has per-parameter states only after its first step, so fresh
    ones get theirs made for the template, then forgotten: the optimizer itself stays fresh.
    """
    fresh = [o for o in objects if isinstance(o, torch.optim.Optimizer) and distrib.init_optimizer_state(o)]
    like = state_dict()
    for optimizer in fresh:
        optimizer.state.clear()  # `like` keeps the made states, as templates only
    return like
