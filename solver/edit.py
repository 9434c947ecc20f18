"""Edits of an experiment folder at rest (`solver rollback`, `solver prune`): both hold the
experiment's lock, so they are refused while it runs, and never delete what a user could want
back: a rollback moves the abandoned branch aside; prune asks the run's retention. A rollback
moves its files under the blob store's lock held shared, so that no collection of the Dora
folder's store lists the files meanwhile; prune collects the store once its files are deleted.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpointing import blobs, envelope, faults, lock, manager, naming, policy, remote, store
from .checkpointing.config import CheckpointConfig
from .checkpointing.fs import atomic_open, fsync_dir
from .experiment import CheckpointFile, Experiment, ExperimentError, rolled_back_folder, shard_folders

COLLECT_WAIT = 60.0  # seconds prune waits for the saves and rollbacks of other experiments to let it collect


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
    move to `<xp>/rolled_back/<time>/` with a note, never deleted. With `checkpoint.remote`, their
    names are recorded first for the mirror, whose next sync deletes them remotely
    (`remote.record_abandoned`). Refused while the experiment runs, or when no kept, intact, full
    checkpoint holds the point asked for.
    """
    epoch = epoch_asked(xp, to)
    with lock.ExperimentLock(xp.folder), store.IncrementalStore(xp.folder).referencing():
        files = xp.checkpoints()
        chosen = return_point(xp, files, epoch)
        try:
            source = envelope.read_checkpoint(chosen.path)
        except faults.CheckpointError as err:
            raise ExperimentError(f"Cannot roll back to epoch {epoch}: {err}") from None
        history = xp.history
        dest = rolled_back_folder(xp.folder)
        moved: list[Path] = []
        abandoned = [c.path for c in reversed(files) if c.path != chosen.path and _after(c, epoch)]
        if (xp.config.get('checkpoint') or {}).get('remote'):  # before the moves: a kill between leaves
            remote.record_abandoned(xp.folder, [path.name for path in abandoned])  # the remote to delete
        # Newest first: interrupted anywhere, the folder resumes from a point at or after `epoch`,
        # and a resume rewrites history.json from its checkpoint.
        for path in abandoned:
            moved += [_move(shards, dest) for shards in shard_folders(path)] + [_move(path, dest)]
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


def epoch_asked(xp: Experiment, to: str) -> int:
    """The epoch that `--to epoch:N | best` names."""
    if to == 'best':
        best = xp.best()
        if best is None:
            raise ExperimentError(f"{xp.folder}: no valid metric in history.json, so no best epoch to return to.")
        return best[0]
    if to.startswith('epoch:') and to[len('epoch:'):].isdigit():
        return int(to[len('epoch:'):])
    raise ExperimentError(f"--to {to}: expected epoch:N (e.g. epoch:3) or best.")


def return_point(xp: Experiment, files: list[CheckpointFile], epoch: int) -> CheckpointFile:
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
        incremental = store.IncrementalStore(xp.folder)
        if apply and (incremental.blobs.is_dir() or (xp.folder / blobs.BLOBS).is_dir()):
            incremental.collect(wait=COLLECT_WAIT)  # [incremental] blobs no checkpoint references now
    return pruned.removed, pruned.kept
