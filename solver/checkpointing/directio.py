"""Direct and flush-behind file I/O for the archive writer and reader: the bytes' way to disk.

- `FlushBehind`: a buffered sink whose write-back starts per `CHUNK` as soon as it is written,
  and whose chunks already on disk leave the page cache (sync_file_range, fadvise), so the final
  fsync has little left to do and the kernel recycles pages instead of touching new ones.
- `DirectSink`: O_DIRECT writes past the page cache. Torch's tensors are only 64-byte aligned
  and file systems want 512 or 4096, so bytes go through two reused page-aligned `Bounce`
  buffers in turn (a copy without the GIL, overlapping the write of the other one), except from
  page-aligned memory (`aligned_empty`), which is written as it is. Where the file system
  refuses O_DIRECT, the rest is written buffered.

Only an optimisation of the kernel's work: what makes a file durable is the caller's fsync.
Which transfers use O_DIRECT by default is `archive`'s decision (`DIRECT_WRITES`, `DIRECT_READS`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import threading
import typing as tp
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

CHUNK = 16 << 20       # flush-behind granularity, and the size of one read
LAG = 2                # chunks written back but still cached: the disk queue never runs dry
DIRECT_ALIGN = 4096    # O_DIRECT offsets, lengths and addresses (512 is enough on most disks)
_SYNC_WRITE, _SYNC_WAIT = 2, 1 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WAIT_AFTER


def _sync_file_range() -> tp.Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range through ctypes (it releases the GIL); None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_range = _sync_file_range()


class FlushBehind:
    """The file object torch's archive writer writes to: `os.write` on the file's descriptor,
    with write-back started per chunk and the chunks before the last `LAG` dropped from the cache.

    Only an optimisation of the kernel's work: failures of sync_file_range or fadvise are
    ignored, and the caller's fsync is what makes the file durable.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = self.started = self.dropped = os.lseek(fd, 0, os.SEEK_CUR)
        self.discard = False  # set once the file is abandoned: writes then do nothing

    def write(self, data: tp.Any) -> int:
        if self.discard:
            return len(data)
        view = memoryview(data).cast('B')
        while view:
            done = os.write(self.fd, view[:CHUNK])
            view = view[done:]
            self.written += done
            if self.written - self.started >= CHUNK:
                self._write_back()
        return len(data)

    def _write_back(self) -> None:
        if _sync_range is None:
            return
        _sync_range(self.fd, self.started, self.written - self.started, _SYNC_WRITE)
        self.started = self.written
        end = self.started - LAG * CHUNK
        if end > self.dropped:
            _sync_range(self.fd, self.dropped, end - self.dropped, _SYNC_WAIT)
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(self.fd, self.dropped, end - self.dropped, os.POSIX_FADV_DONTNEED)
            self.dropped = end

    def flush(self) -> None:
        pass


class Bounce:
    """A page-aligned buffer of one chunk, made (and touched) once and reused by every O_DIRECT
    transfer of one direction; `with` holds it for one transfer at a time."""

    def __init__(self, size: int = CHUNK) -> None:
        assert size % DIRECT_ALIGN == 0
        self.size = size
        self._lock = threading.Lock()
        self._memory: mmap.mmap | None = None

    def __enter__(self) -> tuple[memoryview, int]:
        self._lock.acquire()
        if self._memory is None:
            self._memory = mmap.mmap(-1, self.size)  # anonymous: page-aligned, touched below
            self._memory.write(bytes(self.size))
        return memoryview(self._memory), np.frombuffer(self._memory, dtype=np.uint8).ctypes.data

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def aligned_empty(shape: tp.Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory starts at a page: large ones (1 MiB or more) are
    mapped memory of exactly their size, which an O_DIRECT save writes without copying it."""
    count = math.prod(shape)
    nbytes = count * torch._utils._element_size(dtype)
    if nbytes < (1 << 20):
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=count).view(tuple(shape))


def open_direct(fd: int, flags: int) -> int | None:
    """The file of `fd` opened again with O_DIRECT (the same inode, through /proc: a rename
    since changes nothing); None where the system or the file system refuses."""
    if not hasattr(os, 'O_DIRECT'):
        return None
    try:
        return os.open(f'/proc/self/fd/{fd}', flags | os.O_DIRECT)
    except OSError:
        return None


class DirectSink:
    """The file object torch's archive writer writes to when `direct`: bytes gathered into two
    aligned bounce buffers in turn (a copy without the GIL) and written chunk by chunk with
    O_DIRECT, past the page cache, by a thread of its own: one buffer is written while the other
    fills, so the copy costs no time at disk speed. Page-aligned memory (`aligned_empty`) is
    written as it is. The unaligned tail goes through the buffered descriptor at `finish`. If a
    direct write is refused (EINVAL), the rest is written buffered."""

    def __init__(self, fd: int, direct_fd: int, bounces: list[tuple[memoryview, int]]) -> None:
        self.fd, self.direct_fd = fd, direct_fd
        self._direct_fd_to_close = direct_fd
        self.bounces = bounces
        self.current = 0                                         # the buffer being filled
        self.buffer, self.address = bounces[0]
        self.writing: list[Future | None] = [None] * len(bounces)  # each buffer's write in flight
        self.offset = os.lseek(fd, 0, os.SEEK_CUR)  # of the buffer's first byte; 0 for a new file
        self.filled = 0
        self.discard = False
        self._writer = ThreadPoolExecutor(1, thread_name_prefix='archive-direct-write')

    def write(self, data: tp.Any) -> int:
        if self.discard:
            return len(data)
        source = np.frombuffer(data, dtype=np.uint8)
        address, size, done = source.ctypes.data, source.size, 0
        while done < size:
            if (address + done) % DIRECT_ALIGN == 0 and (self.offset + self.filled) % DIRECT_ALIGN == 0 \
                    and size - done >= DIRECT_ALIGN and self.direct_fd >= 0:
                done += self._write_from(memoryview(data).cast('B')[done:])  # aligned memory (`aligned_empty`)
                continue
            take = min(size - done, len(self.buffer) - self.filled)
            ctypes.memmove(self.address + self.filled, address + done, take)
            self.filled += take
            done += take
            if self.filled == len(self.buffer):
                self._hand_over()
        return size

    def _hand_over(self) -> None:
        """Give the filled buffer's aligned bytes to the writing thread and go on in the other
        buffer, starting with the unaligned rest."""
        length = self.filled
        aligned = length - length % DIRECT_ALIGN if self.offset % DIRECT_ALIGN == 0 else 0
        if aligned:
            self.writing[self.current] = self._writer.submit(self._write, self.buffer[:aligned], self.offset)
        else:
            self._write(self.buffer[:length], self.offset)
            aligned = length
        rest = length - aligned
        previous = self.buffer
        self.current = (self.current + 1) % len(self.bounces)
        self._wait(self.current)
        self.buffer, self.address = self.bounces[self.current]
        if rest:
            self.buffer[:rest] = previous[aligned:length]
        self.offset += aligned
        self.filled = rest

    def _wait(self, index: int) -> None:
        pending, self.writing[index] = self.writing[index], None
        if pending is not None:
            pending.result()

    def _write(self, data: memoryview, offset: int) -> None:
        """Write `data` at `offset`: with O_DIRECT while it is aligned and allowed, else buffered."""
        done = 0
        aligned = len(data) - len(data) % DIRECT_ALIGN if offset % DIRECT_ALIGN == 0 else 0
        while done < aligned and self.direct_fd >= 0:
            try:
                done += os.pwrite(self.direct_fd, data[done:aligned], offset + done)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self.direct_fd = -1  # refused here: buffered from now on (closed by `close`)
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def _write_from(self, source: memoryview) -> int:
        """Write the aligned prefix of `source` straight from its memory: no copy at all."""
        if self.filled:
            self._hand_over()  # aligned (the file position after it is): nothing is left over
        length = len(source) - len(source) % DIRECT_ALIGN
        self._write(source[:length], self.offset)
        self.offset += length
        return length

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        """Write what is left, wait for every write, and leave the descriptor at the end of the file."""
        if self.filled and not self.discard:
            self._write(self.buffer[:self.filled], self.offset)
            self.offset += self.filled
            self.filled = 0
        for index in range(len(self.writing)):
            self._wait(index)
        os.lseek(self.fd, self.offset, os.SEEK_SET)

    def close(self) -> None:
        """Wait for the writing thread (its errors were raised by `finish`, or are moot after a
        failure), then close the direct descriptor."""
        self._writer.shutdown(wait=True)
        if self._direct_fd_to_close >= 0:
            os.close(self._direct_fd_to_close)
            self._direct_fd_to_close = -1
