"""The epoch checkpoints of a folder as retention and `solver ls` see them: each with its
metadata, read without its tensors and not verified, and the metric it is ranked by.
"""

from __future__ import annotations

import functools
import os
import typing as tp
from pathlib import Path

from . import envelope, policy
from .faults import CheckpointError
from .naming import epoch_checkpoints


def read_meta(path: Path) -> dict[str, tp.Any]:
    """The metadata of a checkpoint file without reading its tensors (mmap), or {} if unreadable.

    Not verified (`read_checkpoint` verifies): for listing, and for ranking by `meta['metric']`.
    """
    try:
        payload = envelope.read_unverified(path)
    except CheckpointError:  # damaged, foreign, unsafe, a link or a pipe: listed without metadata
        return {}
    meta = payload.get('meta', {}) if isinstance(payload, dict) else {}
    return meta if isinstance(meta, dict) else {}



def epoch_files(folder: Path, history: tp.Sequence[float | None] = ()) -> dict[Path, policy.EpochFile]:
    """The epoch checkpoints of a folder (oldest first), each with the metric retention ranks it
    by: the one its metadata holds (`meta['metric']`, recorded by every save), else, for a file
    written before the metric was recorded (or unreadable), its epoch's score in `history`."""
    found = {}
    for epoch, path in epoch_checkpoints(folder):
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # pruned meanwhile
            continue
        recorded, metric = _recorded_metric(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        found[path] = policy.EpochFile(epoch, metric if recorded else history_metric(history, epoch))
    return found



@functools.lru_cache(maxsize=4096)
def _recorded_metric(path: str, *identity: int) -> tuple[bool, float | None]:
    """Whether the file records its metric, and the metric; read once per file (its inode, time
    and size name it: a file saved again is read again), not at every prune of a long run."""
    meta = read_meta(Path(path))
    return 'metric' in meta, _metric(meta.get('metric'))



def history_metric(history: tp.Sequence[float | None], epoch: int) -> float | None:
    """The score of `epoch` (1-based) in a history of scores, None if it has none."""
    return _metric(history[epoch - 1]) if 0 < epoch <= len(history) else None



def _metric(value: tp.Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
