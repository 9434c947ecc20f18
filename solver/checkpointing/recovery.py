"""Recovery after a crash or damage: temporary files of a killed save removed, and the newest
checkpoint of a folder that verifies found, each damaged one reported on the way.
"""

from __future__ import annotations

import contextlib
import logging
import typing as tp
from pathlib import Path

from . import blobs, sharded
from .envelope import Checkpoint, read_checkpoint
from .faults import CheckpointError, CorruptCheckpointError
from .naming import LATEST, candidates
from .ranks import DEFAULT_RANKS, Ranks

logger = logging.getLogger(__name__)

def clean_stray_files(folder: Path) -> None:
    """Remove temporary files left by a process killed in the middle of a save."""
    for tmp in Path(folder).glob('.checkpoint*.tmp.*'):
        if tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
    sharded.clean(folder)
    blobs.clean_stray_blobs(folder)  # [incremental]



def load_newest_intact(folder: Path, resumable: bool = True, like: tp.Any = None,
                       into: tp.Any = None, ranks: Ranks = DEFAULT_RANKS) -> Checkpoint | None:
    """The newest checkpoint of `folder` that verifies, reporting each damaged one on the way.

    `like`, `into` and `ranks` as in `read_checkpoint`. A file passed over after its bytes went into the
    live state must be replaced entirely by the one used, else this raises: the live state is
    never half of one checkpoint and half of another. With `resumable`, epoch files that hold only some states
    (`checkpoint.keep_every_states`, or weights only: `checkpoint.keep_dtype`) are passed over: they
    cannot resume a run. Returns None
    when the folder has no checkpoint at all. Raises when checkpoints exist but none is usable:
    a damaged experiment never silently restarts from scratch.
    """
    tried = candidates(folder)
    errors = []
    dirty: dict[int, Path] = {}  # live tensors (by address) holding bytes of a file passed over
    for path in tried:
        try:
            found = read_checkpoint(path, like, into, ranks)
        except CheckpointError as err:  # damaged, unsafe, or gone since it was listed (pruned)
            logger.error("Skipping %s checkpoint: %s",
                         'damaged' if isinstance(err, CorruptCheckpointError) else 'unusable', err)
            errors.append(str(err))
            dirty.update({t.data_ptr(): path for t in getattr(err, 'live', [])})
            continue
        if resumable and found.meta.get('partial'):
            holds = (f"is weights only (its best state in {found.meta['weights_only']}, checkpoint.keep_dtype)"
                     if found.meta.get('weights_only') else
                     f"holds only {found.meta['partial']} (checkpoint.keep_every_states)")
            message = f"{path} {holds}: it cannot resume a run."
            logger.warning("Skipping %s", message)
            errors.append(message)
            dirty.update({t.data_ptr(): path for t in found.live})
            continue
        left = set(dirty) - {t.data_ptr() for t in found.live}
        if left:
            raise CheckpointError(
                f"{len(left)} live tensors were read from {sorted(set(dirty.values()))}, which was passed "
                f"over, and {path} does not replace them: stopping rather than training on a mixed "
                f"state. Rerun: a fresh process resumes from {path}.")
        return found
    if tried:
        raise CorruptCheckpointError(
            f"No checkpoint of {folder} can resume the run, refusing to start over silently:\n  "
            + "\n  ".join(errors)
            + "\nIf a run is saving into this folder right now, retry once it is done. Otherwise keep "
            "them for inspection (`python -m solver.checkpointing.examine FILE`) and move them "
            "into a subfolder to train from scratch; delete nothing you have not inspected.")
    return None



def load_source(path: Path) -> Checkpoint:
    """A checkpoint file, or the newest intact checkpoint of an experiment folder."""
    path = Path(path)
    if path.is_dir():
        found = load_newest_intact(path, resumable=False)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint ({LATEST} or checkpoint_<epoch>.th).")
        return found
    return read_checkpoint(path)
