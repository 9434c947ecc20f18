"""Rewinding part of an experiment, or all of it to where it started.

`solver rollback <xp> --to epoch:N --only <prefix>[,<prefix>...]` returns the entries the
prefixes name (`checkpointing.partial`: parameters and buffers, their optimizer, EMA and
best-state entries) to the end of epoch N and keeps everything else at the newest checkpoint.
The merged state becomes the experiment's newest checkpoint (`checkpoint.th`, through the
verified writer) after the file it replaces is linked into `<xp>/rolled_back/<time>/` beside a
note: nothing is lost, and the next `dora run` goes on from the merged state. The newest epoch
of the history records it (`partial_rollback`), and `<xp>/load_report.json` lists the entries
taken. `StandardSolver.rollback_partial` does the same inside a running solver.

`solver rollback <xp> --to start` returns an experiment started by `continue_from` to the state
it started from (`lineage`'s `start.th`, checked against the digest `lineage.json` recorded):
written as `checkpoint_0.th`, then a full rollback to epoch 0 moves the rest aside.
"""

from __future__ import annotations

import os
import shutil
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from . import edit, experiment, lineage
from .checkpointing import envelope, lock, naming, partial, recovery, sharded, store
from .checkpointing.faults import CheckpointError
from .checkpointing.fs import fsync_dir
from .experiment import Experiment, ExperimentError
from .logs import write_history


@dataclass
class PartialRollback:
    """What a partial rollback did: the entries taken from `source` (epoch `epoch`) into the
    newest checkpoint `newest`, and where the replaced file went."""

    epoch: int
    source: Path
    newest: Path
    moved_to: Path
    report: partial.LoadReport


def parse_only(only: str | tp.Sequence[str]) -> list[str]:
    """`--only a,b` (or a list) as a list of prefixes, blanks dropped."""
    items = only.split(',') if isinstance(only, str) else list(only)
    return [item.strip() for item in items if item.strip()]


def note(history: list[dict[str, tp.Any]], entry: dict[str, tp.Any]) -> None:
    """Record a partial rollback in the newest epoch of `history` (under `partial_rollback`,
    numbered: one epoch may see several)."""
    if history:
        done = history[-1].setdefault('partial_rollback', {})
        done[str(len(done) + 1)] = entry


def take_from(folder: Path, to: str | int, newest: dict[str, tp.Any], only: tp.Sequence[str],
              names: partial.ParamNames | None, like: tp.Any = None,
              ) -> tuple[dict[str, tp.Any], partial.LoadReport, envelope.Checkpoint]:
    """`newest` with the entries `only` names taken from the point `to` (an epoch, `epoch:N`,
    `best`, or `start`: `read_point`), verified; and that checkpoint."""
    older = read_point(Experiment(folder), to, like)
    merged, report = partial.merge(newest, older.state, only, names, older.meta.get('param_names'), older.path.name)
    return merged, report, older


def read_point(xp: Experiment, to: str | int, like: tp.Any = None) -> envelope.Checkpoint:
    """The verified checkpoint of a point to return to: the end of an epoch (an int, `epoch:N`
    or `best`: the kept file a full rollback would use), or `start` (`start_checkpoint`)."""
    if to == 'start':
        return start_checkpoint(xp, like)
    epoch = to if isinstance(to, int) else edit.epoch_asked(xp, to)
    point = edit.return_point(xp, xp.checkpoints(), epoch)
    try:
        return envelope.read_checkpoint(point.path, like)
    except CheckpointError as err:
        raise ExperimentError(f"Cannot roll back to epoch {epoch}: {err}") from None


def start_checkpoint(xp: Experiment, like: tp.Any = None) -> envelope.Checkpoint:
    """`<xp>/start.th`, verified, and its taken entries checked against the digest that
    `lineage.json` recorded when the run started from `continue_from`; else a one-line error."""
    entry = lineage.read(xp.folder)
    if entry is None:
        raise ExperimentError(f"{xp.sig} was not started by continue_from (no readable {lineage.LINEAGE}): "
                              "there is no start to return to; use --to epoch:N or --to best.")
    try:
        start = envelope.read_checkpoint(xp.folder / lineage.START, like)
    except CheckpointError as err:
        raise ExperimentError(f"Cannot return {xp.sig} to its start: {err}") from None
    found = partial.LoadReport(str(start.path), loaded=list(entry.get('entries') or [])).digest(start.state)
    if start.meta.get('sig') != xp.sig or found != entry.get('digest'):
        raise ExperimentError(
            f"{start.path} does not hold the start {lineage.LINEAGE} records (digest {found}, recorded "
            f"{entry.get('digest')}; signature {start.meta.get('sig')}): it was replaced or altered. "
            f"Nothing was changed; restart the fine-tune with continue_from={entry.get('continue_from')} instead.")
    return start


def rollback_partial(xp: Experiment, to: str, only: str | tp.Sequence[str]) -> PartialRollback:
    """`solver rollback <xp> --to <to> --only <only>` (see the module docstring). Refused while
    the experiment runs, and, naming the reason, when a prefix matches nothing or an entry's
    shape differs between the two points."""
    prefixes = parse_only(only)
    # the blob store's lock shared: no collection of the Dora folder lists files while one is moved aside
    with lock.ExperimentLock(xp.folder), store.IncrementalStore(xp.folder).referencing():
        newest = recovery.load_newest_intact(xp.folder)
        if newest is None:
            raise ExperimentError(f"{xp.folder} holds no checkpoint: nothing to roll back.")
        merged, report, older = take_from(xp.folder, to, newest.state, prefixes, newest.meta.get('param_names'))
        epoch, source = int(older.meta.get('epoch') or 0), older.path
        entry = {'only': prefixes, 'epoch': epoch, 'from': source.name, 'others_from': newest.path.name,
                 'others_epoch': newest.meta.get('epoch'), 'time': time.strftime('%Y-%m-%d %H:%M:%S')}
        history = [dict(stages) for stages in merged.get('history') or []]
        note(history, entry)
        merged['history'] = history
        latest = xp.folder / naming.LATEST
        dest = _aside(xp.folder, [newest.path, latest],
                      f"solver rollback {xp.sig} --to {to} --only {','.join(prefixes)}, {entry['time']}: "
                      f"{', '.join(prefixes)} returned to the end of epoch {epoch} ({source.name}), everything "
                      f"else kept from {newest.path.name} (epoch {entry['others_epoch']}); the result replaced "
                      f"{latest.name}. Here is a copy of {newest.path.name} (and of the {latest.name} it replaced) "
                      "as it was.\n")
        envelope.write_checkpoint(latest, merged, {**newest.meta, 'partial_rollback': entry})
        sharded.remove_superseded(latest)  # the merged file is whole: a shard folder of the old one is its copy's now
        report.write(xp.folder / partial.REPORT, partial_rollback=entry)
        write_history(xp.folder / 'history.json', history)
    return PartialRollback(epoch, source, latest, dest, report)


def _aside(folder: Path, paths: tp.Sequence[Path], text: str) -> Path:
    """Hard links (copies where links fail) of `paths` that exist in a new
    `<folder>/rolled_back/<time>/`, with a note; durable before the originals are replaced."""
    dest = experiment.rolled_back_folder(folder)
    dest.mkdir(parents=True)
    for path in dict.fromkeys(paths):
        if path.is_file() and not path.is_symlink():
            _link_or_copy(path, dest / path.name)
            for shards in experiment.shard_folders(path):  # a sharded checkpoint's files go with it
                shutil.copytree(shards, dest / shards.name, copy_function=_link_or_copy)
    (dest / 'NOTE.txt').write_text(text)
    fsync_dir(dest)
    return dest


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def rollback_to_start(xp: Experiment) -> edit.Rollback:
    """`solver rollback <xp> --to start`: the state `xp` started from by `continue_from`, as it
    loaded it (`start_checkpoint`), becomes `checkpoint_0.th`; a full rollback to epoch 0 then
    moves everything later aside."""
    with lock.ExperimentLock(xp.folder):
        start = start_checkpoint(xp)
        envelope.write_checkpoint(naming.epoch_checkpoint_path(xp.folder, 0), start.state, start.meta)
    return edit.rollback(xp, 'epoch:0')
