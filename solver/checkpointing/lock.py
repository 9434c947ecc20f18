"""The locks of checkpoint folders; the OS releases each when its process dies.

`ExperimentLock`: one process writes an experiment folder. Taken by a run (`train.py`) and by the
commands that change a folder (`solver rollback`, `solver prune`); the blob store's collection
(`store.collect`) runs only under it (`held_or_taken`).

`StoreLock`: a blob store, shared by the experiments of a Dora folder (`<dora>/.blobs.lock`).
Whatever adds or moves references to blobs (a save, a rollback) holds it shared for that
moment; a collection holds it exclusive, so it never deletes a blob a save is about to reuse,
nor misses a file being moved while it lists them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import types
import typing as tp
from pathlib import Path

from ..errors import UserError
from .fs import UnsafeFileError, open_fd, read_file

_LOCK_BYTES = 4096  # a pid and a newline: a larger `.lock` was not made here


class ExperimentLockedError(UserError, RuntimeError):
    """Another live process holds the experiment."""


class _Flock:
    """A lock held by an open file descriptor: closing it (or the process dying) releases it."""

    _fd: int | None = None

    def __exit__(self, *exc: type[BaseException] | BaseException | types.TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ExperimentLock(_Flock):
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


@contextlib.contextmanager
def held_or_taken(folder: Path) -> tp.Iterator[None]:
    """Hold the experiment lock for the block: already held by this
    process (its pid is in the lock file and the lock is taken), or taken now."""
    lock_path = Path(folder) / '.lock'
    with contextlib.suppress(OSError, ValueError):
        owner = int(read_file(lock_path, _LOCK_BYTES).split()[0])
        if owner == os.getpid() and _locked(lock_path):
            yield
            return
    with ExperimentLock(folder):
        yield


def _locked(lock_path: Path) -> bool:
    fd = open_fd(lock_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases the probe's lock, if it got one)
    return False


class StoreBusyError(RuntimeError):
    """A save or rollback holds the blob store: no collection now."""


class StoreLock(_Flock):
    """A `flock` on `<root>/.blobs.lock` (`root`: the folder holding the store's `blobs/`), shared
    (saves, rollbacks: any number at once) or exclusive (a collection), waiting at most `wait`
    seconds (None: as long as it takes) for the other kind. Never opened through a link.
    """

    def __init__(self, root: Path, exclusive: bool = False, wait: float | None = None) -> None:
        self.path = Path(root) / '.blobs.lock'
        self.exclusive = exclusive
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        # (a link or FIFO planted under its name: `UnsafeFileError`, naming it)
        fd = open_fd(self.path, os.O_RDWR | os.O_CREAT, limit=_LOCK_BYTES)
        kind = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        deadline = None if self.wait is None else time.monotonic() + self.wait
        try:
            while True:
                try:
                    fcntl.flock(fd, kind | (fcntl.LOCK_NB if deadline is not None else 0))
                    break
                except BlockingIOError:
                    if deadline is None or time.monotonic() >= deadline:
                        raise StoreBusyError(f"the blob store of {self.path.parent} is in use (a save or "
                                             "rollback is writing to it)") from None
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

