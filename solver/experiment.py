"""An experiment folder at rest, as the `solver` command line finds and reads it.

An experiment (`<dora dir>/xps/<sig>/`) holds Dora's records (`.argv.json`: the overrides that
make its signature; `history.json`: the metrics per epoch; `.hydra/config.yaml`), our checkpoints
(`checkpoint.th`, `checkpoint_<epoch>.th`, with their shard folders when sharded), the lock of
the process running it (`.lock`) and what its stages wrote (`samples/epoch_<N>/`). Nothing here
runs a solver or needs a process group: sharded checkpoints are read in one process.

Comparing two checkpoints: `compare`; exporting one: `export`; rollback and prune: `edit`.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import stat
import tempfile
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpointing import envelope, faults, fetch, listing, lock, naming, policy, recovery, sharded
from .checkpointing.fs import read_file

ROLLED_BACK = 'rolled_back'
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
    removed at exit (`fetch.fetch_source`), then read as its local form.
    """
    try:
        name = naming.parse(target)
        if name.form is naming.Form.URL:
            cache = Path(tempfile.mkdtemp(prefix='solver-remote-'))
            atexit.register(shutil.rmtree, cache, True)
            local = fetch.fetch_source(target, cache)
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

    @property
    def holds(self) -> str:
        """What the file holds, as `solver ls` says it: full, weights only (`checkpoint.keep_dtype`),
        some states (`checkpoint.keep_every_states`), or ? (unreadable)."""
        if not self.meta:
            return '?'
        if self.meta.get('weights_only'):
            return f"weights only ({self.meta['weights_only']}), not resumable"
        partial = self.meta.get('partial')
        return f"only {','.join(map(str, partial))}" if partial else 'full'


def rolled_back_folder(folder: Path) -> Path:
    """A new `<folder>/rolled_back/<time>/` (not made yet) for what a rollback sets aside."""
    dest = folder / ROLLED_BACK / time.strftime('%Y%m%d-%H%M%S')
    while dest.exists():
        dest = dest.with_name(dest.name + '+')
    return dest


def shard_folders(path: Path) -> list[Path]:
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
            size = info.st_size + sum(_size(p) for p in shard_folders(path))
            found.append(CheckpointFile(path, size, info.st_mtime, read_meta(path)))
        return found

    def best_metric(self) -> tuple[str, bool]:
        """The valid metric that picks the best state, and whether lower is better: as the newest
        checkpoint that records them says (`meta['metric_name']`, `meta['lower_is_better']`), so
        that ranking needs no config; for older files, the class the config names says."""
        return self._best_metric

    @functools.cached_property
    def _best_metric(self) -> tuple[str, bool]:  # read once per view: `solver ls` asks several times
        for path in naming.candidates(self.folder):  # the newest readable file: older ones are older still
            meta = read_meta(path)
            name, lower = meta.get('metric_name'), meta.get('lower_is_better')
            if isinstance(name, str) and isinstance(lower, bool):
                return name, lower
            if meta:
                break
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


