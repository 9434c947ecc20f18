"""An experiment folder at rest: what the `solver` command line reads, compares, exports and edits.

An experiment (`<dora dir>/xps/<sig>/`) holds Dora's records (`.argv.json`: the overrides that
make its signature; `history.json`: the metrics per epoch; `.hydra/config.yaml`), our checkpoints
(`checkpoint.th`, `checkpoint_<epoch>.th`, with their shard folders when sharded), the lock of
the process running it (`.lock`) and what its stages wrote (`samples/epoch_<N>/`). Nothing here
runs a solver or needs a process group: sharded checkpoints are read in one process.

Edits (`rollback`, `prune`) hold the experiment's lock, so they are refused while it runs, and
never delete what a user could want back: a rollback moves the abandoned branch aside.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import re
import shutil
import stat
import tempfile
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .checkpointing import (
    blobs,
    envelope,
    faults,
    listing,
    lock,
    manager,
    naming,
    policy,
    recovery,
    remote,
    sharded,
    store,
)
from .checkpointing.config import CheckpointConfig
from .checkpointing.fs import atomic_open, fsync_dir, read_file

ROLLED_BACK = 'rolled_back'
DTYPES = {'float32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
RECORD_BYTES = 64 << 20  # the most read of a JSON or YAML file of Dora or Hydra: a larger one is not theirs


class ExperimentError(faults.CheckpointError):
    """A user asked for something this experiment or file cannot give; the message says why."""


# ---------------------------------------------------------------------------------------------
# Finding experiments

def experiments(dora_dir: Path) -> list[Experiment]:
    """Every experiment folder of a Dora folder, by signature."""
    xps = Path(dora_dir) / 'xps'
    return [Experiment(path) for path in sorted(xps.iterdir()) if path.is_dir()] if xps.is_dir() else []


def resolve(target: str, dora_dir: Path) -> Experiment | Path:
    """An experiment (a folder, or a signature or unique prefix of one in `dora_dir`) or a file
    (a path, or `<sig>/<file>`).

    The names of `checkpointing.naming` (its one grammar). An unknown name raises an error
    listing the signatures that look like it. An fsspec URL
    (`s3://bucket/runs/<sig>` or a checkpoint file's URL) is fetched into a temporary folder
    removed at exit (`remote.fetch_source`), then read as its local form.
    """
    try:
        name = naming.parse(target)
        if name.form is naming.Form.URL:
            cache = Path(tempfile.mkdtemp(prefix='solver-remote-'))
            atexit.register(shutil.rmtree, cache, True)
            local = remote.fetch_source(target, cache)
            return local if local.is_file() else Experiment(local)
        if name.form is naming.Form.PRETRAINED:
            raise naming.NamingError(f"'{target}' names a pretrained model: give the file "
                                     "(pretrained/<NAME>.th) or an experiment.")
        found = naming.locate(name, Path(dora_dir) / 'xps')
    except naming.NamingError as err:
        raise ExperimentError(str(err)) from None
    return found if found.is_file() else Experiment(found)


def as_experiment(target: Experiment | Path) -> Experiment:
    if isinstance(target, Experiment):
        return target
    raise ExperimentError(f"{target} is a file: this command takes an experiment folder or signature.")


# ---------------------------------------------------------------------------------------------
# What an experiment holds

@dataclass
class CheckpointFile:
    """One checkpoint of an experiment, as listed (`meta` read without verifying the tensors)."""

    path: Path
    size: int
    mtime: float
    meta: dict[str, tp.Any] = field(default_factory=dict)
    damage: str | None = None  # set by `verify`

    @property
    def epoch(self) -> int | None:
        return self.meta.get('epoch')

    @property
    def step(self) -> int | None:
        return self.meta.get('step')

    @property
    def resumable_at_epoch_end(self) -> bool:
        """A full state saved at the end of an epoch: a point a run can go on from."""
        return bool(self.meta) and not self.meta.get('partial') and not self.meta.get('epoch_step')


def _shard_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.glob(f'{sharded.folder_prefix(path)}*') if p.is_dir())


def _size(path: Path) -> int:
    """Bytes of the regular files at or under `path`, links not followed."""
    paths = [path] if not path.is_dir() or path.is_symlink() else path.rglob('*')
    return sum(info.st_size for p in paths if stat.S_ISREG((info := p.lstat()).st_mode))


read_meta = listing.read_meta  # listing: metadata without the tensors, {} if unreadable


class Experiment:
    """A view of one experiment folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def sig(self) -> str:
        return self.folder.name

    def _json(self, name: str, default: tp.Any) -> tp.Any:
        try:  # a link, a pipe or a huge file is not read (fs.open_fd)
            return json.loads(read_file(self.folder / name, RECORD_BYTES, inside=self.folder))
        except (OSError, ValueError, RecursionError):
            return default

    @property
    def argv(self) -> list[str]:
        """The overrides of this experiment as Dora records them (`.argv.json`)."""
        return list(self._json('.argv.json', []))

    @property
    def history(self) -> list[dict[str, tp.Any]]:
        """Dora's `history.json`: one dict of stage metrics per finished epoch."""
        return list(self._json('history.json', []))

    @functools.cached_property
    def config(self) -> dict[str, tp.Any]:
        """The composed config Hydra saved, else the one of the newest checkpoint, else {}."""
        path = self.folder / '.hydra' / 'config.yaml'
        if path.is_file():
            try:
                text = read_file(path, RECORD_BYTES, inside=self.folder).decode(errors='replace')
                # Plain YAML as OmegaConf wrote it (floats in full, interpolations as strings), read
                # by libyaml's safe loader: OmegaConf's own costs ~50 ms a file, `solver ls` reads 40.
                container = yaml.load(text, Loader=getattr(yaml, 'CSafeLoader', yaml.SafeLoader))
            except Exception:  # not Hydra's file (a link, a pipe, not YAML): use the checkpoint's
                container = None
            return tp.cast(dict, container) if isinstance(container, dict) else {}
        files = self.checkpoints()
        return dict(files[-1].meta.get('config') or {}) if files else {}

    @property
    def planned_epochs(self) -> int | None:
        return (self.config.get('optim') or {}).get('epochs')

    @property
    def holder(self) -> int | None:
        """The pid of the process running this experiment, or None."""
        return lock.holder(self.folder)

    @property
    def state(self) -> str:
        """running, complete, early-stopped (`early_stop.patience`), stopped (some epochs, fewer than
        planned) or new (none yet)."""
        if self.holder is not None:
            return 'running'
        if self.history and self.history[-1].get('early_stop'):
            return 'early-stopped'
        done, planned = len(self.history), self.planned_epochs
        if planned is not None and done >= planned:
            return 'complete'
        return 'stopped' if done or self.checkpoints() else 'new'

    @property
    def job(self) -> str | None:
        """The id of the newest Slurm job of this experiment (`dora launch`, `dora grid`), or None:
        read from the names submitit gives its logs (`submitit/<id>_<task>_log.out`)."""
        ids = [m.group(1) for p in (self.folder / 'submitit').glob('*_log.out')
               if (m := re.match(r'(\d+(?:_\d+)?)_\d+_log\.out$', p.name))]
        return max(ids, key=lambda i: [int(x) for x in i.split('_')]) if ids else None

    @property
    def size(self) -> int:
        return _size(self.folder)

    @property
    def updated(self) -> float:
        """When anything in the folder last changed (seconds since the epoch)."""
        times = [p.lstat().st_mtime for p in self.folder.iterdir()] + [self.folder.stat().st_mtime]
        return max(times)

    def checkpoints(self) -> list[CheckpointFile]:
        """The checkpoint files, oldest epoch first, the latest file last."""
        paths = list(reversed(naming.candidates(self.folder)))
        found = []
        for path in paths:
            info = path.lstat()
            size = info.st_size + sum(_size(p) for p in _shard_folders(path))
            found.append(CheckpointFile(path, size, info.st_mtime, read_meta(path)))
        return found

    def best_metric(self) -> tuple[str, bool]:
        """The valid metric that picks the best state, and whether lower is better (the solver's)."""
        from . import builders
        try:
            klass = builders.solver_class(self.config.get('solver_class'))
        except builders.ConfigError:
            return 'loss', True
        return getattr(klass, 'best_metric_name', 'loss'), getattr(klass, 'best_metric_lower_is_better', True)

    def best(self) -> tuple[int, float] | None:
        """The epoch (1-based) with the best valid metric, and its value."""
        ranked = self.ranked_epochs()
        return ranked[0] if ranked else None

    def ranked_epochs(self) -> list[tuple[int, float]]:
        """(epoch, valid metric) of the history, best first (`policy.rank`)."""
        return policy.rank(enumerate(self.scores(), 1), self.best_metric()[1])

    def scores(self) -> list[float | None]:
        """The best metric of each epoch of the history (None where an epoch has none)."""
        name = self.best_metric()[0]
        return [stages['valid'].get(name) if isinstance(stages.get('valid'), dict) else None
                for stages in self.history]

    def newest(self) -> envelope.Checkpoint:
        """The newest intact checkpoint (verified), or an error saying there is none."""
        return load(self.folder)


def load(target: Path) -> envelope.Checkpoint:
    """A verified checkpoint: the file, or the newest intact one of an experiment folder."""
    try:
        return recovery.load_source(target)
    except faults.CheckpointError as err:
        raise ExperimentError(str(err)) from None


def verify(target: Experiment | Path) -> list[tuple[Path, str | None]]:
    """Every checkpoint of `target` (or the file) checked against its digests: (path, damage or None)."""
    paths = [target] if isinstance(target, Path) else [c.path for c in target.checkpoints()]
    if not paths:
        raise ExperimentError(f"{tp.cast(Experiment, target).folder} holds no checkpoint "
                              f"({naming.LATEST} or checkpoint_<epoch>.th).")
    results: list[tuple[Path, str | None]] = []
    for path in paths:
        try:
            envelope.read_checkpoint(path)
            results.append((path, None))
        except faults.CheckpointError as err:
            results.append((path, str(err)))
    return results


def overrides(config: dict[str, tp.Any], defaults: dict[str, tp.Any]) -> list[str]:
    """`key=value` for each leaf of `config` that differs from `defaults` (dotted keys)."""
    flat, base = flatten_config(config), flatten_config(defaults)
    return [f"{key}={json.dumps(value)}" for key, value in flat.items()
            if key not in base or base[key] != value]


def flatten_config(config: tp.Any, prefix: str = '') -> dict[str, tp.Any]:
    """The leaves of a config dict by dotted key (`optim.adam.betas`); lists are leaves."""
    if isinstance(config, dict) and config:
        out: dict[str, tp.Any] = {}
        for key, value in config.items():
            out.update(flatten_config(value, f'{prefix}{key}.'))
        return out
    return {prefix[:-1]: config}


# ---------------------------------------------------------------------------------------------
# Comparing two checkpoints

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


# ---------------------------------------------------------------------------------------------
# Export

def export(source: envelope.Checkpoint, target: Path, which: str = 'best', fmt: str = 'th',
           dtype: str = 'float32') -> dict[str, tp.Any]:
    """Write the best (or latest) model states of a checkpoint alone, to share or fine-tune from.

    `th`: a checkpoint of ours holding only `{'best_state': ...}`, what `continue_from` and
    `//pretrained/NAME` read. `safetensors`: a flat `<state>.<key>` -> tensor file any
    `safetensors` reader opens, with the config and provenance as JSON strings in its metadata.
    Floating-point tensors are cast to `dtype`. Returns the provenance written.
    """
    best = source.state.get('best_state')
    if not isinstance(best, dict) or not best.get('states'):
        raise ExperimentError(f"{source.path} has no best state: nothing says which states are the model.")
    names = list(best['states'])
    missing = [name for name in names if name not in source.state]
    if which == 'latest' and missing:
        raise ExperimentError(f"{source.path} does not hold the live {missing} (a partial epoch file?): "
                              "export --best, or --latest from checkpoint.th.")
    states = best['states'] if which == 'best' else {name: source.state[name] for name in names}
    cast = DTYPES[dtype]
    states = {name: _cast(state, cast) for name, state in states.items()}
    meta = {k: v for k, v in source.meta.items() if k != 'config'}
    provenance = {
        'exported_from': str(source.path), 'exported': which, 'dtype': dtype,
        'sig': meta.get('sig'), 'epoch': meta.get('epoch'), 'step': meta.get('step'),
        'git_commit': (meta.get('versions') or {}).get('git'), 'best_metric': best.get('metric'),
    }
    target = Path(target)
    check_export_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == 'th':
        envelope.write_checkpoint(target, {'best_state': {'metric': best.get('metric'), 'states': states}},
                                    {**source.meta, **provenance})
    elif fmt == 'safetensors':
        from safetensors.torch import save
        tensors = {name: value.contiguous().clone() for name, value in flatten(states).items()
                   if isinstance(value, torch.Tensor)}
        metadata = {key: json.dumps(value) for key, value in provenance.items()}
        metadata['config'] = json.dumps(source.meta.get('config'))
        metadata['versions'] = json.dumps(meta.get('versions'))
        with atomic_open(target) as f:
            f.write(save(tensors, metadata))
    else:
        raise ExperimentError(f"--format {fmt}: expected th or safetensors.")
    return provenance


def check_export_target(target: Path) -> None:
    """Refuse to export onto a checkpoint of an experiment (`<xp>/checkpoint.th`, an epoch file,
    through a link or not): the best-state-only file would replace it, without the experiment's
    lock, and the experiment could no longer resume from it."""
    real = Path(target).resolve()
    if real.name != naming.LATEST and naming.epoch_of(real) is None:
        return
    folder = real.parent
    if any((folder / name).exists() for name in ('.argv.json', '.lock', blobs.BLOBS)) or naming.candidates(folder):
        raise ExperimentError(
            f"{target} is a checkpoint name inside the experiment folder {folder}: exporting there would replace "
            "its checkpoint with a best-state-only file, and the experiment could no longer resume. Write the "
            "export elsewhere (e.g. pretrained/NAME.th, then continue_from=//pretrained/NAME).")


def _cast(state: tp.Any, dtype: torch.dtype) -> tp.Any:
    if isinstance(state, torch.Tensor):
        return state.to(dtype) if state.is_floating_point() else state
    if isinstance(state, dict):
        return {key: _cast(value, dtype) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cast(value, dtype) for value in state)
    return state


# ---------------------------------------------------------------------------------------------
# Rollback and prune (both hold the experiment's lock)

@dataclass
class Rollback:
    """What `rollback` did: the point returned to and where the abandoned branch went."""

    epoch: int
    checkpoint: Path
    moved_to: Path | None
    moved: list[Path]


def _move(path: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / path.name
    shutil.move(str(path), str(target))
    return target


def rollback(xp: Experiment, to: str) -> Rollback:
    """Return `xp` to the end of an epoch (`epoch:N` or `best`) so the next run goes on from there.

    The history (Dora's `history.json` too) is cut to that epoch; later checkpoints and samples
    move to `<xp>/rolled_back/<time>/` with a note, never deleted. Refused while the experiment
    runs, or when no kept, intact, full checkpoint holds the point asked for.
    """
    epoch = _epoch_asked(xp, to)
    with lock.ExperimentLock(xp.folder):
        files = xp.checkpoints()
        chosen = _return_point(xp, files, epoch)
        try:
            source = envelope.read_checkpoint(chosen.path)
        except faults.CheckpointError as err:
            raise ExperimentError(f"Cannot roll back to epoch {epoch}: {err}") from None
        history = xp.history
        dest = xp.folder / ROLLED_BACK / time.strftime('%Y%m%d-%H%M%S')
        while dest.exists():
            dest = dest.with_name(dest.name + '+')
        moved: list[Path] = []
        # Newest first: interrupted anywhere, the folder resumes from a point at or after `epoch`,
        # and a resume rewrites history.json from its checkpoint.
        for path in [c.path for c in reversed(files) if c.path != chosen.path and _after(c, epoch)]:
            moved += [_move(shards, dest) for shards in _shard_folders(path)] + [_move(path, dest)]
        for folder in sorted((xp.folder / 'samples').glob('epoch_*')):
            if folder.name[len('epoch_'):].isdigit() and int(folder.name[len('epoch_'):]) > epoch:
                moved.append(_move(folder, dest / 'samples'))
        if moved or len(history) > epoch:
            dest.mkdir(parents=True, exist_ok=True)
            (dest / 'history.json').write_text(json.dumps(history, indent=2))
            (dest / 'NOTE.txt').write_text(
                f"solver rollback {xp.sig} --to {to}, {time.strftime('%Y-%m-%d %H:%M:%S')}: returned to the "
                f"end of epoch {epoch} ({chosen.path.name}). Here is the abandoned branch, epochs "
                f"{epoch + 1}-{len(history)}: its checkpoints, samples, and history.json as it was.\n")
            fsync_dir(dest)
        with atomic_open(xp.folder / 'history.json') as f:
            f.write(json.dumps(source.state.get('history', history[:epoch]), indent=2).encode())
    return Rollback(epoch, chosen.path, dest if dest.exists() else None, moved)


def _epoch_asked(xp: Experiment, to: str) -> int:
    """The epoch that `--to epoch:N | best` names."""
    if to == 'best':
        best = xp.best()
        if best is None:
            raise ExperimentError(f"{xp.folder}: no valid metric in history.json, so no best epoch to return to.")
        return best[0]
    if to.startswith('epoch:') and to[len('epoch:'):].isdigit():
        return int(to[len('epoch:'):])
    raise ExperimentError(f"--to {to}: expected epoch:N (e.g. epoch:3) or best.")


def _return_point(xp: Experiment, files: list[CheckpointFile], epoch: int) -> CheckpointFile:
    """The kept full checkpoint at the end of `epoch` (the epoch file first), or an error listing them."""
    if not files:
        raise ExperimentError(f"{xp.folder} holds no checkpoint: nothing to roll back to.")
    points: dict[int, CheckpointFile] = {}
    for c in files:  # epoch files come first: the latest file only when it alone holds a point
        if c.resumable_at_epoch_end and c.epoch is not None:
            points.setdefault(c.epoch, c)
    if epoch not in points:
        raise ExperimentError(
            f"No kept checkpoint of {xp.sig} holds the end of epoch {epoch}; points to return to: "
            f"{', '.join(f'epoch:{e} ({points[e].path.name})' for e in sorted(points)) or 'none'}.")
    return points[epoch]


def _after(file: CheckpointFile, epoch: int) -> bool:
    """Whether a checkpoint belongs to the branch after the end of `epoch` (or cannot be placed)."""
    if file.path.name == naming.LATEST:
        return not (file.resumable_at_epoch_end and file.epoch == epoch)
    match = naming.epoch_of(file.path)
    return match is None or match > epoch


def prune(xp: Experiment, keep_last: int, apply: bool = False) -> tuple[list[Path], dict[Path, str]]:
    """The epoch checkpoints the run's retention would not keep with `keep_last` in place of its
    own `checkpoint.keep_last` (deleted only with `apply`). Returns (removed, kept with why).

    The same decision as the run's (`policy.retention_from_config`): the newest always, every
    `keep_every`-th, the best `keep_best`, each file ranked by the metric it records (files
    written before the metric was recorded: by history.json).
    """
    if keep_last < 1:
        raise ExperimentError(f"--keep-last {keep_last}: keep at least 1 (the newest is never pruned).")
    config = dataclasses.replace(CheckpointConfig.parse(xp.config.get('checkpoint')), keep_last=keep_last)
    retention = policy.retention_from_config(config, xp.best_metric()[1])
    with lock.ExperimentLock(xp.folder):
        store.IncrementalStore(xp.folder).check_own()  # a blob folder that is a link: refused before any delete
        pruned = manager.prune(xp.folder, retention, xp.scores(), apply=apply)
        if apply and (xp.folder / blobs.BLOBS).is_dir():  # [incremental] blobs no checkpoint references now
            store.IncrementalStore(xp.folder).collect()
    return pruned.removed, pruned.kept
