"""One running process per experiment folder, with a lock the OS releases when the process dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import types
from pathlib import Path

from .checkpointing.fs import UnsafeFileError, describe, open_fd
from .errors import UserError

_LOCK_BYTES = 4096  # a pid and a newline: a larger `.lock` was not made here


class ExperimentLockedError(UserError, RuntimeError):
    """Another live process holds the experiment."""


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


class ExperimentLock:
    """An exclusive `flock` on `<xp>/.lock`, holding the owner's pid for the error message.

    flock locks belong to the open file, so a process killed with SIGKILL releases its lock with
    its file descriptors: no stale lock ever blocks the next run.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / '.lock'
        self._fd: int | None = None

    def __enter__(self) -> ExperimentLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link or into a FIFO: a copied-in `.lock` could name any file
            fd = open_fd(self.path, os.O_RDWR | os.O_CREAT, limit=_LOCK_BYTES)
        except UnsafeFileError as err:
            raise ExperimentLockedError(f"Cannot lock experiment {self.path.parent}: {err} Remove it; "
                                        "the lock file is created anew.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise ExperimentLockedError(
                f"Experiment {self.path.parent} is in use by another process (pid {owner}). "
                "Wait for it to finish or stop it; two runs on one experiment would overwrite "
                "each other's checkpoints.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | types.TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def holder(folder: Path) -> int | None:
    """The pid of the live process holding the lock of experiment `folder`, or None when free.

    Probes with a non-blocking lock released at once: the OS, not the pid file, says whether
    the holder is alive (a killed run leaves its pid in the file but no lock).
    """
    path = Path(folder) / '.lock'
    try:
        fd = open_fd(path, limit=_LOCK_BYTES)
    except FileNotFoundError:
        return None
    except UnsafeFileError:  # not a lock this framework made: nobody holds it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors='replace').strip()
        return int(owner) if owner.isdigit() else -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
