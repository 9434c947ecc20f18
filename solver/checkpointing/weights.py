"""Weights-only files: a checkpoint's best state alone, its floating-point tensors cast.

Two writers make them: `solver export` (to share, or to fine-tune from), and, with
`checkpoint.keep_dtype`, the run itself for the epoch files it keeps for good. Retention keeps
an epoch file for good when only `keep_every` or `keep_best` keep it (`Retention.for_good`):
once it has left the newest files (`keep_last`), no run goes on from it again, so its
optimizer, EMA and RNG states are dead weight. It is then rewritten in place (atomically,
after its digests were checked) as `{'best_state': {...}}` in the reduced dtype, its metadata
kept and marked:

    meta['weights_only'] = 'bf16'        # what it was reduced to
    meta['partial'] = ['best_state']     # what every resume and rollback passes over

`continue_from`, `execute_only` (through `continue_from`) and `solver export` read the best
state of such a file as of any checkpoint; a bf16 tensor is cast back to the model's dtype on
load (`partial.take`), as an exported bf16 file is.
"""

from __future__ import annotations

import functools
import logging
import os
import typing as tp
from pathlib import Path

import torch

from . import envelope, listing, policy
from .config import KEEP_DTYPES
from .faults import CheckpointError

logger = logging.getLogger(__name__)

DTYPES = {'float32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
STATES = ['best_state']     # what a weights-only file holds (its `meta['partial']`)


def cast(state: tp.Any, dtype: torch.dtype) -> tp.Any:
    """`state` with its floating-point tensors cast to `dtype` (other values as they are)."""
    if isinstance(state, torch.Tensor):
        return state.to(dtype) if state.is_floating_point() else state
    if isinstance(state, dict):
        return {key: cast(value, dtype) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cast(value, dtype) for value in state)
    return state


def check_dtype(name: tp.Any) -> torch.dtype:
    """The torch dtype of a `checkpoint.keep_dtype` value; raises naming the key otherwise."""
    if name not in KEEP_DTYPES:
        raise CheckpointError(f"checkpoint.keep_dtype={name!r}: expected one of {', '.join(KEEP_DTYPES)} "
                              "(or null: epoch files kept for good stay whole).")
    return DTYPES[name]


def reduce_file(path: Path, dtype: str) -> bool:
    """Rewrite the epoch file `path` as its best state alone in `dtype`, marked weights-only;
    False (nothing written) if it already is one, or holds no best state."""
    ckpt = envelope.read_checkpoint(path)  # verified: a damaged file is never made to look intact
    best = ckpt.state.get('best_state')
    if ckpt.meta.get('weights_only') or not isinstance(best, dict) or not best.get('states'):
        return False
    state = {'best_state': {**best, 'states': cast(best['states'], check_dtype(dtype))}}
    envelope.write_checkpoint(path, state, {**ckpt.meta, 'weights_only': dtype, 'partial': STATES})
    return True


def reduce_kept(folder: Path, retention: policy.Retention, dtype: str,
                history: tp.Sequence[float | None] = ()) -> list[Path]:
    """Reduce the epoch files of `folder` that `retention` keeps for good and that are not yet
    weights-only (`reduce_file`); the files rewritten. A file that cannot be read or written is
    reported and left as it is: reducing is never worth losing a kept file."""
    found = listing.epoch_files(folder, history)
    lasting = retention.for_good(policy.KeepContext(sorted(found.values(), key=lambda file: file.epoch)))
    done = []
    for path, file in found.items():
        if file.epoch not in lasting or _is_reduced(path):
            continue
        try:
            if reduce_file(path, dtype):
                done.append(path)
                logger.info("Kept %s for good as weights only (%s best state, no optimizer): "
                            "continue_from, execute_only and export read it; no run resumes from it.",
                            path.name, dtype)
        except (CheckpointError, OSError) as err:
            logger.warning("Could not reduce %s to weights only (checkpoint.keep_dtype=%s), kept whole: %s",
                           path.name, dtype, err)
    return done


def _is_reduced(path: Path) -> bool:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return True  # gone meanwhile: nothing to do
    return _recorded_reduced(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _recorded_reduced(path: str, *identity: int) -> bool:
    """Whether the file's metadata marks it weights-only; read once per file version
    (`identity`), not at every prune."""
    return bool(listing.read_meta(Path(path)).get('weights_only'))
