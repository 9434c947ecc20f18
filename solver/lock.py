"""One running process per experiment folder, with a lock the OS releases when the process dies."""

from __future__ import annotations

import fcntl
import os
import types
from pathlib import Path

from .errors import UserError


class ExperimentLockedError(UserError, RuntimeError):
    """Another live process holds the experiment."""


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
