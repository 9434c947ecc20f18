"""Checks of an experiment folder before a run writes to it: writable, and nothing opened by name
in it is a link, a FIFO or a device. (The lock itself: `checkpointing.lock`.)"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from .checkpointing.fs import UnsafeFileError, describe
from .errors import UserError


class FolderNotWritableError(UserError, RuntimeError):
    """A folder the run must write to cannot be written (permissions, a full disk, a file)."""


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and write, fsync and remove a small file in it.

    Run at the start, so that a read-only folder or a full disk stops the run in one line
    before it trains, not at its first checkpoint an epoch later.
    """
    folder = Path(folder)
    probe = folder / f'.write_probe.{os.getpid()}'
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as err:
        raise FolderNotWritableError(
            f"Cannot write in {folder}: {err.strerror or err}. Make the folder writable or free disk "
            "space (or point SOLVER_DORA_DIR at another folder), then rerun.") from None


# What Dora, Hydra, logging and this framework open by name in an experiment folder (Slurm
# launches add links of Dora's own, `code` and submitit folders, which are left alone).
_OPENED_BY_NAME = re.compile(r'^(\.argv\.json|history\.json|\.lock|\.hydra|blobs|samples|rolled_back|tensorboard'
                             r'|\.?checkpoint.*|solver\.log.*)$')


def check_entries(folder: Path) -> None:
    """Refuse an experiment folder where something Dora, Hydra or the run opens by name
    (`.argv.json`, `.hydra/*`, `solver.log.*`, checkpoints, `blobs/`...) is a link, a FIFO or a
    device: they write by name, following links, so a folder copied from elsewhere could point
    them at any file the user can write, or hang the run on a pipe. Raises `UnsafeFileError`."""
    folder = Path(folder)
    entries = [e for e in os.scandir(folder) if _OPENED_BY_NAME.match(e.name)] if folder.is_dir() else []
    hydra = folder / '.hydra'
    if hydra.is_dir() and not hydra.is_symlink():
        entries += list(os.scandir(hydra))
    for entry in entries:
        if entry.is_symlink() or not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            raise UnsafeFileError(f"{entry.path} is {describe(Path(entry.path))}, not a regular file or folder: "
                                  "refused (an experiment folder from elsewhere may hold links, pipes or devices). "
                                  "Remove it, then rerun.")
