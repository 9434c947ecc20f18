"""File-system helpers: durable writes (atomic replace: tmp + fsync + rename + folder fsync), and
the one way to open, read or remove a file of a folder that may come from elsewhere (`open_fd`)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path) -> tp.Iterator[tp.BinaryIO]:
    """Open a temporary file beside `path`; on success it replaces `path` durably.

    On any error (full disk, a signal turned exception, a size limit) the temporary file is
    removed and `path` is untouched. A kill -9 leaves at worst a stray `.tmp.<pid>` file, which
    the next save of the same process id overwrites and `clean_stray_files` removes.

    The replaced file is freed in the background: freeing 1 GiB of blocks takes 0.17 s here (the
    filesystem is mounted with discard), a fifth of writing them. It is held open through the
    rename, which then frees nothing, and closed by another thread (or by the kernel at exit).
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp.{os.getpid()}')
    replaced = None
    try:
        with contextlib.suppress(FileNotFoundError):  # a link planted under this name is removed, not followed
            os.unlink(tmp)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644),
                       'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):  # no file yet
            replaced = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if replaced is not None:
            os.close(replaced)
        raise
    fsync_dir(path.parent)
    if replaced is not None:
        _closer.submit(os.close, replaced)


# Closes replaced files, which frees their blocks (see atomic_open) off the saving thread.
_closer = ThreadPoolExecutor(1, thread_name_prefix='checkpoint-free')


def evict(*paths: Path) -> None:
    """Write back, then drop from the page cache, these files (or every file of these folders), so
    that the next read of them is cold: what the benchmarks call a cold load."""
    for path in map(Path, paths):
        for file in ([path] if path.is_file() else [p for p in path.rglob('*') if p.is_file()]):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# Opening and removing files of a folder that may come from elsewhere (issue 22)
#
# An experiment folder, a shard folder, a blob store or a download is input: it may hold
# symbolic links (to another experiment, to /dev/zero, to any file the user can write), FIFOs
# (an `open` that never returns), devices, or files far larger than their format allows. Every
# file the project reads or locks inside such a folder is opened here: `lstat` first (a device
# is never opened), then `O_NOFOLLOW | O_NONBLOCK`, then `fstat` on the descriptor (what is
# used is what was checked), with every folder between `inside` and the file opened with
# `O_NOFOLLOW` as well; a read is bounded by `limit`.

class UnsafeFileError(UserError, OSError):
    """A file that is not a plain regular file where one is expected (a symbolic link, FIFO,
    device, folder), or larger than its format allows: refused, never opened or read."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, 'a symbolic link'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISSOCK, 'a socket'), (stat.S_ISDIR, 'a folder')):
        if test(mode):
            return name
    return 'not a regular file'


def describe(path: Path, mode: int | None = None) -> str:
    """What `path` is (`mode`, else its lstat): 'a symbolic link (to /dev/zero)', 'a FIFO (named pipe)'..."""
    what = _kind(os.lstat(path).st_mode if mode is None else mode)
    if what == 'a symbolic link':
        with contextlib.suppress(OSError):
            what += f' (to {os.readlink(path)})'
    return what


def _refuse(path: Path, mode: int) -> UnsafeFileError:
    what = describe(path, mode)
    return UnsafeFileError(f"{path} is {what}, not a regular file: refused (a folder from elsewhere may "
                           "hold links, pipes or devices; replace it with the real file).")


def _folder_fd(folder: Path, inside: Path | None) -> int:
    """A descriptor of `folder`, each folder below `inside` opened without following a link."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if inside is None:
        return os.open(folder, flags)
    inside = Path(inside)
    try:
        parts = Path(folder).relative_to(inside).parts
    except ValueError:
        raise UnsafeFileError(f"{folder} is not inside {inside}: refused.") from None
    fd = os.open(inside, flags)
    current = inside
    try:
        for part in parts:
            current = current / part
            if part == '..':
                raise UnsafeFileError(f"{current} leaves {inside}: refused.")
            try:
                child = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                kind = os.lstat(part, dir_fd=fd).st_mode if err.errno in (errno.ELOOP, errno.ENOTDIR) else 0
                if kind and not stat.S_ISREG(kind):
                    raise _refuse(current, kind) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_fd(path: Path, flags: int = os.O_RDONLY, *, inside: Path | None = None, mode: int = 0o644,
            limit: int | None = None) -> int:
    """A descriptor of the regular file `path` opened with `flags`, or `UnsafeFileError`.

    Never follows a link at `path` (nor, given `inside`, at any folder between `inside` and it),
    never blocks on a FIFO, never opens a device; refuses a file of more than `limit` bytes.
    `FileNotFoundError` and other `OSError`s pass through.
    """
    path = Path(path)
    parent = _folder_fd(path.parent, inside)
    try:
        with contextlib.suppress(FileNotFoundError):  # (created below, with O_CREAT)
            before = os.lstat(path.name, dir_fd=parent)
            if not stat.S_ISREG(before.st_mode):
                raise _refuse(path, before.st_mode)
        try:
            fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=parent)
        except OSError as err:
            if err.errno == errno.ELOOP:  # became a link since the lstat
                raise _refuse(path, stat.S_IFLNK) from None
            raise
    finally:
        os.close(parent)
    info = os.fstat(fd)
    problem = None if stat.S_ISREG(info.st_mode) else _refuse(path, info.st_mode)
    if problem is None and limit is not None and info.st_size > limit:
        problem = UnsafeFileError(f"{path} holds {info.st_size} bytes, more than the {limit} its format "
                                  "allows: refused.")
    if problem is not None:
        os.close(fd)
        raise problem
    os.set_blocking(fd, True)
    return fd


def open_file(path: Path, *, inside: Path | None = None, limit: int | None = None) -> tp.BinaryIO:
    """`open_fd` for reading, as a binary file object."""
    return os.fdopen(open_fd(path, inside=inside, limit=limit), 'rb')


def read_file(path: Path, limit: int, *, inside: Path | None = None) -> bytes:
    """The bytes of the regular file `path` (see `open_fd`), at most `limit` of them: a longer
    file (or one that grows while read) is refused."""
    with open_file(path, inside=inside, limit=limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{path} holds more than the {limit} bytes its format allows: refused.")
    return data


def unlink(path: Path, *, inside: Path | None = None) -> bool:
    """Remove the file (or link: never what it points to) `path`, each folder below `inside`
    reached without following a link; False if it was not there."""
    path = Path(path)
    parent = _folder_fd(path.parent, inside)
    try:
        os.unlink(path.name, dir_fd=parent)
    except FileNotFoundError:
        return False
    finally:
        os.close(parent)
    return True
