"""Part of a state: the entries a prefix names, merging them from another checkpoint, and the
report of what a load took and what it skipped (and why).

A prefix is `<module state>[.<key prefix>]`: `model.layers.2`, `model.output`, or `model` for a
whole module. It matches whole dotted components (`model.layers.2` names `layers.2.weight`, not
`layers.20.weight`), as `optim.freeze` and `checkpoint.ignore_state_keys` do. In a solver's
state it names, for the module state `model`:
- the module's own entries, parameters and buffers: `state['model'][key]`;
- their copies in the best state and the EMA (`MODULE_COPIES`): `state['best_state']['states']
  ['model'][key]`, `state['ema']['state']['model'][key]`;
- the per-parameter state of every optimizer holding those parameters (Adam's moments and step):
  `state[<optimizer>]['state'][i]`, where `i` is the index torch's `Optimizer.state_dict` gives
  the parameter (its position in the concatenated `params` of the param groups). Indices are not
  names: each checkpoint records the state name of each index (`meta['param_names']`, made by
  `param_names` from the live objects), and an entry is matched between two checkpoints by that
  name, so a parameter keeps its moments even where the two files number it differently.
Everything else (other entries, optimizer hyperparameters, RNG, progress, history) is not named.
"""

from __future__ import annotations

import hashlib
import json
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SolverError
from .digest import tensor_digest
from .fs import atomic_open

#: where StandardSolver's state holds copies of a module's entries: BestState, ModuleDictEMA
MODULE_COPIES: tuple[tuple[str, ...], ...] = (('best_state', 'states'), ('ema', 'state'))
REPORT = 'load_report.json'
ParamNames = dict[str, list[tp.Optional[str]]]  # optimizer state name -> state name of each index


class PartialError(SolverError):
    """A prefix or a source that cannot be taken: the message names it and says why."""


def matches(key: str, prefix: str) -> bool:
    """Whether the dotted `key` is `prefix` or lies under it (whole components only)."""
    return key == prefix or key.startswith(prefix + '.')


def param_names(objects: tp.Mapping[str, tp.Any]) -> ParamNames:
    """For each optimizer among `objects` (registered name -> live object), the state name of each
    parameter index of its state dict (`'model.layers.2.weight'`; None for a parameter of no
    registered module). Recorded in every checkpoint's metadata (`meta['param_names']`)."""
    by_id: dict[int, str] = {}
    for name, obj in objects.items():
        if isinstance(obj, nn.Module):
            for key, value in obj.state_dict(keep_vars=True).items():
                by_id.setdefault(id(value), f'{name}.{key}')
    return {name: [by_id.get(id(p)) for group in obj.param_groups for p in group['params']]
            for name, obj in objects.items() if isinstance(obj, torch.optim.Optimizer)}


# ---------------------------------------------------------------------------------------------
# The report

@dataclass
class LoadReport:
    """What a load took from `source`: entries `loaded`, entries `skipped` (place -> why), and
    the count of entries `kept` as they were (a partial rollback: at the newest point)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kept: int = 0
    cast: dict[str, str] = field(default_factory=dict)  # loaded, converted between floating dtypes

    def problems(self, allowed: tp.Callable[[str], bool] = lambda why: False) -> dict[str, str]:
        """The skipped entries whose reason `allowed` does not accept."""
        return {place: why for place, why in self.skipped.items() if not allowed(why)}

    def summary(self) -> str:
        """One line: counts of loaded and skipped entries, by reason."""
        reasons: dict[str, int] = {}
        for why in self.skipped.values():
            kind = why.split(':', 1)[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        skipped = ', '.join(f"{n} {kind}" for kind, n in reasons.items())
        kept = f", {self.kept} kept as they were" if self.kept else ''
        cast = f" ({len(self.cast)} cast to this model's dtype)" if self.cast else ''
        return (f"{len(self.loaded)} entries loaded from {self.source}{cast}, {len(self.skipped)} skipped"
                f"{f' ({skipped})' if skipped else ''}{kept}")

    def digest(self, state: tp.Mapping[str, tp.Any]) -> str:
        """A digest of the loaded entries as they are in `state` (a solver state, by place):
        what lineage records of a continue_from, and checks before returning to it."""
        lines = [f"{place}:{tensor_digest(_whole(value)) if isinstance(value, torch.Tensor) else repr(value)}"
                 for place in sorted(self.loaded) if (value := lookup(state, place)) is not None]
        return hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:32]

    def write(self, path: Path, **extra: tp.Any) -> None:
        """The listing, as JSON, atomically (`<xp>/load_report.json`)."""
        data = {'summary': self.summary(), **extra, 'source': self.source, 'loaded': sorted(self.loaded),
                'skipped': self.skipped, 'kept': self.kept, 'cast': self.cast}
        with atomic_open(Path(path)) as f:
            f.write(json.dumps(data, indent=2).encode())


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank digests the same places in the same
    order), else the tensor."""
    full = getattr(tensor, 'full_tensor', None)
    return full() if callable(full) else tensor


def lookup(state: tp.Mapping[str, tp.Any], place: str) -> tp.Any:
    """The entry of a module state named by `place` (`model.layers.0.weight`), or None."""
    name, _, key = place.partition('.')
    module = state.get(name)
    return module.get(key) if isinstance(module, dict) else None


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def _misfit(here: tp.Any, there: tp.Any) -> str | None:
    """Why `there` (the source's entry) cannot replace `here`, or None when it fits."""
    if isinstance(here, torch.Tensor) and isinstance(there, torch.Tensor):
        if here.shape != there.shape:
            return f"shape differs: {list(there.shape)} in the source, {list(here.shape)} here"
        if here.dtype != there.dtype:
            return f"dtype differs: {there.dtype} in the source, {here.dtype} here".replace('torch.', '')
        return None
    if isinstance(here, torch.Tensor) or isinstance(there, torch.Tensor):
        return f"type differs: {type(there).__name__} in the source, {type(here).__name__} here"
    return None


# ---------------------------------------------------------------------------------------------
# Loading what fits (continue_from)

IGNORED = 'ignored: checkpoint.ignore_state_keys'


def fit_module(name: str, here: tp.Mapping[str, tp.Any], source: tp.Mapping[str, tp.Any],
               ignored: tp.Sequence[str], report: LoadReport) -> dict[str, tp.Any]:
    """The entries of `source` that fit the live module state `here` (same keys and shapes, and
    dtypes, or both floating point: a bf16 export loads, cast, as `load_state_dict` casts), to
    load with `load_state_dict(strict=False)`; every entry of either side is listed in `report`
    as `<name>.<key>`, loaded or skipped with why. `ignored`: dotted prefixes (`model.head`)
    dropped on purpose."""
    taken = {}
    for key in dict.fromkeys([*here, *source]):
        place = f'{name}.{key}'
        if any(matches(place, prefix) for prefix in ignored):
            report.skipped[place] = IGNORED
        elif key not in source:
            report.skipped[place] = 'missing in the source: left as initialised here'
        elif key not in here:
            report.skipped[place] = f"missing here: {_kind(source[key])} in the source, no such entry in this model"
        elif (why := _misfit(here[key], source[key])) is not None and not _castable(here[key], source[key]):
            report.skipped[place] = why
        else:
            if why is not None:
                report.cast[place] = f"{source[key].dtype} -> {here[key].dtype}".replace('torch.', '')
            taken[key] = source[key]
            report.loaded.append(place)
    return taken


def _castable(here: tp.Any, there: tp.Any) -> bool:
    return isinstance(here, torch.Tensor) and isinstance(there, torch.Tensor) and here.shape == there.shape \
        and here.is_floating_point() and there.is_floating_point()


def _kind(value: tp.Any) -> str:
    return _describe(value) if isinstance(value, torch.Tensor) else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Merging part of an older state into a newer one (partial rollback)

def check_prefixes(state: tp.Mapping[str, tp.Any], prefixes: tp.Sequence[str]) -> None:
    """Refuse a prefix that names no module state of `state`, or nothing in it."""
    if not prefixes:
        raise PartialError("--only: give at least one prefix (e.g. model.layers.2 or model).")
    modules = sorted(name for name, value in state.items() if _is_module_state(value))
    for prefix in prefixes:
        name, _, rest = prefix.partition('.')
        if name not in modules:
            raise PartialError(f"--only {prefix}: '{name}' is not a module state of this checkpoint; prefixes "
                               f"start with one of {modules or 'none'} (e.g. {modules[0] if modules else 'model'}).")
        if not any(matches(key, rest) for key in state[name]) and rest:
            keys = ', '.join(sorted({k.rsplit('.', 1)[0] for k in state[name]})[:8])
            raise PartialError(f"--only {prefix}: matches nothing in '{name}' (its entries are under: {keys}).")


def _is_module_state(value: tp.Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) for k in value) \
        and all(isinstance(v, torch.Tensor) for v in value.values())


def _module_places(state: tp.Mapping[str, tp.Any], name: str) -> list[tuple[str, ...]]:
    """Paths in `state` of the dicts holding module `name`'s entries (its own, best, EMA)."""
    paths = [(name,)] + [(*copy, name) for copy in MODULE_COPIES]
    return [path for path in paths if isinstance(_get(state, path), dict)]


def _get(state: tp.Any, path: tp.Sequence[tp.Any]) -> tp.Any:
    for part in path:
        if not isinstance(state, dict) or part not in state:
            return None
        state = state[part]
    return state


def _is_optimizer_state(value: tp.Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get('state'), dict) \
        and isinstance(value.get('param_groups'), list)


def merge(newest: tp.Mapping[str, tp.Any], older: tp.Mapping[str, tp.Any], prefixes: tp.Sequence[str],
          names_newest: ParamNames | None, names_older: ParamNames | None,
          source: str) -> tuple[dict[str, tp.Any], LoadReport]:
    """`newest` with the entries `prefixes` name taken from `older` (see the module docstring):
    a new dict sharing the untouched values. Refused (`PartialError`, naming the entry) when an
    entry is missing at the older point, its shape or dtype differs, or an optimizer's entries
    cannot be matched by name (a file written before `meta['param_names']` was recorded)."""
    check_prefixes(newest, prefixes)
    merged = dict(newest)
    report = LoadReport(source)

    def named(place: str) -> bool:
        return any(matches(place, prefix) for prefix in prefixes)

    for name in sorted({prefix.partition('.')[0] for prefix in prefixes}):
        for path in _module_places(newest, name):
            there = _get(older, path)
            if not isinstance(there, dict):
                raise PartialError(f"{source} holds no {'.'.join(path)}: cannot take {name} entries from it.")
            entries = dict(_get(newest, path))
            for key in entries:
                place = f'{name}.{key}'
                if not named(place):
                    report.kept += 1
                    continue
                label = '.'.join((*path[:-1], place))
                if key not in there:
                    raise PartialError(f"{label} is missing in {source}: cannot roll it back.")
                if (why := _misfit(entries[key], there[key])) is not None:
                    raise PartialError(f"{label}: {why.replace('the source', source)} (newest); refused.")
                entries[key] = there[key]
                report.loaded.append(label)
            _put(merged, path, entries)
    for opt, value in newest.items():
        if _is_optimizer_state(value) and value['state']:
            _merge_optimizer(merged, opt, value, older.get(opt), names_newest, names_older, named, source, report)
    return merged, report


def _merge_optimizer(merged: dict[str, tp.Any], opt: str, new: dict[str, tp.Any], old: tp.Any,
                     names_newest: ParamNames | None, names_older: ParamNames | None,
                     named: tp.Callable[[str], bool], source: str, report: LoadReport) -> None:
    """Take the per-parameter states of the named parameters of optimizer `opt` from `old`."""
    new_names = (names_newest or {}).get(opt)
    if new_names is None:
        raise PartialError(f"the newest checkpoint records no parameter names for '{opt}' (meta.param_names, "
                           "recorded since partial rollback exists): its per-parameter entries cannot be matched. "
                           "Train one more epoch to write a checkpoint that records them.")
    chosen = [i for i, place in enumerate(new_names) if place is not None and named(place)]
    report.kept += len(new['state']) - len([i for i in chosen if i in new['state']])
    if not chosen:
        return
    old_names = (names_older or {}).get(opt)
    if old_names is None or not _is_optimizer_state(old):
        raise PartialError(f"{source} records no parameter names for '{opt}' (meta.param_names, recorded since "
                           "partial rollback exists): its entries cannot be matched to the newest ones. Roll back "
                           "to a point saved by this version, or roll back in full (without --only).")
    index = {place: i for i, place in enumerate(old_names) if place is not None}
    states = dict(new['state'])
    for i in chosen:
        place = tp.cast(str, new_names[i])
        label = f"{opt}.state.{i} ({place})"
        j = index.get(place)
        if j is None:
            raise PartialError(f"{label}: no optimizer entry for {place} in {source} (not trained then); refused.")
        entry = old['state'].get(j)
        if entry is None:  # not stepped yet at that point: fresh again
            states.pop(i, None)
        else:
            for key, value in entry.items():
                if (why := _misfit(states.get(i, {}).get(key, value), value)) is not None:
                    raise PartialError(f"{label}.{key}: {why.replace('the source', source)} (newest); refused.")
            states[i] = entry
        report.loaded.append(label)
    merged[opt] = {**new, 'state': states}


def _put(state: dict[str, tp.Any], path: tuple[str, ...], value: tp.Any) -> None:
    """`state` at `path` set to `value`, copying the dicts on the way (the originals are untouched)."""
    if len(path) == 1:
        state[path[0]] = value
        return
    child = dict(state[path[0]])
    _put(child, path[1:], value)
    state[path[0]] = child

