"""The torch zip archive (what `torch.save` writes and `torch.load` reads), at disk speed.

`torch.save` pickles first and writes the tensors' bytes after, computing a CRC32 of every
record (about 1 s per GiB here, longer than the disk takes), and leaves the written pages in the
page cache, where fresh memory costs up to 1.6 s per GiB on this kind of machine. `save` writes
the same archive, which plain `torch.load` reads, differently:

- the tensors' bytes come first and the pickle last, so what is pickled may depend on the
  bytes: `complete` (the checkpoint digests) runs on another thread while they are written;
- no CRC32: the records say 0, which `torch.load` does not check (the checkpoint's xxh3
  digests cover every byte instead; zip tools report "bad CRC", see docs/security.md);
- flush-behind: the write-back of each 16 MiB chunk starts as soon as it is written, and chunks
  already on disk leave the page cache, so the final fsync has little left to do and the
  kernel recycles the same pages instead of touching new ones.

`load` reads the pickle (small) first and unpickles it with a restricted C unpickler
(`_Unpickler`: plain tensors and containers only; anything else goes to torch's own):
tensors come back at once, their bytes arriving from background threads that read the records
in file order and hash them as they read; `Reading.ready(storage)` waits for one storage's bytes
and gives their digest, so that digests are checked right behind the read, not after all of it.
Given `targets`, the bytes of a tensor that matches a live one (same shape and dtype) are read
straight into the live tensor's memory, and the loaded tensor becomes a view of it: no second
copy, no fresh memory to touch.

O_DIRECT moves the bytes past the page cache: writes by default (`DIRECT_WRITES`), reads when
asked (`DIRECT_READS`); SOLVER_CHECKPOINT_DIRECT_IO=writes|all|off sets both, and `direct=`
overrides them per call. The default is what `scripts/bench_checkpoint.py` measured here: a
direct save is faster than a buffered one and leaves nothing in the page cache, while a direct
read is no faster cold and loses the cached case (a rollback re-reading a file it just read).
Torch's tensors are only 64-byte aligned and file systems want 512 or 4096, so bytes go through
two reused page-aligned buffers in turn (a copy without the GIL, overlapping the write of the
other one), except from page-aligned memory (the async writer's staging buffers,
`aligned_empty`), which is written as it is. Where the file system refuses O_DIRECT, the
buffered path is used.

All this leans on private torch APIs (`PyTorchFileWriter/Reader`, `_rebuild_tensor_v2`'s
arguments, storage internals). At import a tiny state makes a round trip through `save` and
`load` and plain `torch.load`; if anything fails, `AVAILABLE` is False, one warning says so, and `save`
and `load` fall back to `torch.save` and `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import io
import math
import mmap
import os
import pickle
import pickletools
import sys
import tempfile
import threading
import typing as tp
import warnings
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from . import digest

CHUNK = 16 << 20       # flush-behind granularity, and the size of one read
LAG = 2                # chunks written back but still cached: the disk queue never runs dry
PIECE = 1 << 20        # a reading reads and hashes this much at a time: hashed while in the CPU's cache
READERS = 2            # threads reading one archive (2 reads at a time keep a disk's queue busy too)
Ready = tp.Callable[[torch.UntypedStorage], 'str | None']  # waits for a storage's bytes, gives their digest
ALIGNMENT = 64         # torch's storage alignment (`torch.utils.serialization.config.save`)
PROTOCOL = 2           # torch.save's pickle protocol
DIRECT_ALIGN = 4096    # O_DIRECT offsets, lengths and addresses (512 is enough on most disks)
_DIRECT_IO = os.environ.get('SOLVER_CHECKPOINT_DIRECT_IO', 'writes').lower()
DIRECT_WRITES = _DIRECT_IO in ('writes', 'all')  # the defaults of `save(direct=)` and `load(direct=)`
DIRECT_READS = _DIRECT_IO == 'all'
Pairs = tp.Callable[[tp.Any], tp.Iterable[tuple[torch.Tensor, torch.Tensor]]]  # (loaded, live)

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


class _FlushBehind:
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


class _Bounce:
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


_write_bounces = [_Bounce(), _Bounce()]  # a direct save fills one while the other is written
_read_bounces = [_Bounce() for _ in range(READERS)]  # one per reading thread


def aligned_empty(shape: tp.Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory starts at a page: large ones (1 MiB or more) are
    mapped memory of exactly their size, which an O_DIRECT save writes without copying it."""
    count = math.prod(shape)
    nbytes = count * torch._utils._element_size(dtype)
    if nbytes < (1 << 20):
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=count).view(tuple(shape))


def _open_direct(fd: int, flags: int) -> int | None:
    """The file of `fd` opened again with O_DIRECT (the same inode, through /proc: a rename
    since changes nothing); None where the system or the file system refuses."""
    if not hasattr(os, 'O_DIRECT'):
        return None
    try:
        return os.open(f'/proc/self/fd/{fd}', flags | os.O_DIRECT)
    except OSError:
        return None


class _DirectSink:
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


def _pickle(obj: tp.Any, storages: dict[str, torch.UntypedStorage]) -> bytes:
    """`obj` pickled as torch.save does it; fills `storages` with the storages it refers to, by key."""
    keys: dict[int, str] = {}
    dtypes: dict[int, torch.dtype] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, value: tp.Any) -> tp.Any:
            if not isinstance(value, torch.storage.TypedStorage):
                return None
            storage = value._untyped_storage
            if dtypes.setdefault(storage._cdata, value.dtype) != value.dtype:
                raise TypeError("cannot save tensors that view the same storage as different dtypes")
            key = keys.setdefault(storage._cdata, str(len(keys)))
            storages[key] = storage
            return ('storage', getattr(torch, value._pickle_storage_type()), key,
                    torch.serialization.location_tag(storage), value._size())

    data = io.BytesIO()
    Pickler(data, protocol=PROTOCOL).dump(obj)
    return data.getvalue()


def save(obj: tp.Any, f: tp.BinaryIO, complete: tp.Callable[[tp.Any], tp.Any] | None = None,
         direct: bool | None = None) -> None:
    """Write `obj` to the open file `f` as an archive `torch.load` reads (see the module doc).

    `complete(obj)`, if given, runs on another thread while the tensors' bytes are written and
    returns what is pickled instead of `obj`: it may add entries (digests), but no tensors.
    `direct` (default `DIRECT_WRITES`) writes past the page cache with O_DIRECT where the file
    system allows it. The caller flushes and fsyncs `f`.
    """
    if not AVAILABLE:
        torch.save(complete(obj) if complete is not None else obj, f)
        return
    storages: dict[str, torch.UntypedStorage] = {}
    _pickle(obj, storages)
    with contextlib.ExitStack() as stack:
        fd = f.fileno()
        direct_fd = _open_direct(fd, os.O_WRONLY) if (DIRECT_WRITES if direct is None else direct) else None
        sink: _FlushBehind | _DirectSink
        if direct_fd is not None:
            sink = _DirectSink(fd, direct_fd, [stack.enter_context(bounce) for bounce in _write_bounces])
            stack.callback(sink.close)
        else:
            sink = _FlushBehind(fd)
        _write_archive(obj, storages, sink, complete)


def _write_archive(obj: tp.Any, storages: dict[str, torch.UntypedStorage], sink: _FlushBehind | _DirectSink,
                   complete: tp.Callable[[tp.Any], tp.Any] | None) -> None:
    # Records start at DIRECT_ALIGN for O_DIRECT: aligned staging buffers are then written as they are.
    alignment = DIRECT_ALIGN if isinstance(sink, _DirectSink) else ALIGNMENT
    writer = torch._C.PyTorchFileWriter(tp.cast(tp.IO[bytes], sink), False, alignment)  # no CRC32
    try:
        with ThreadPoolExecutor(1, thread_name_prefix='archive-complete') as pool:
            completed = pool.submit(complete, obj) if complete is not None else None
            for key, storage in storages.items():
                if storage.device.type != 'cpu':
                    storage = storage.cpu()
                writer.write_record(f'data/{key}', storage, storage.nbytes())  # type: ignore[arg-type]
            final = completed.result() if completed is not None else obj
        pickled: dict[str, torch.UntypedStorage] = {}
        data = _pickle(final, pickled)
        if pickled.keys() != storages.keys():
            raise ValueError("archive.save: `complete` must not add or remove tensors")
        for name, record in (('data.pkl', data), ('.format_version', b'1'),
                             ('.storage_alignment', str(alignment).encode()),
                             ('byteorder', sys.byteorder.encode())):
            writer.write_record(name, record, len(record))
        writer.write_end_of_file()
        if isinstance(sink, _DirectSink):
            sink.finish()
    except BaseException:
        # The writer would otherwise finish the archive in its destructor, where a failing write
        # aborts the process: finish it now, writing nothing, since the file is abandoned.
        sink.discard = True
        with contextlib.suppress(RuntimeError):
            writer.write_end_of_file()
        raise


class Reading:
    """The tensor records of an archive, read by background threads, each record hashed as it
    is read.

    `READERS` threads take the records in file order, one at a time, and read each in pieces of
    `PIECE` bytes; each piece is hashed (xxh3-64, `digest.Stream`) right after it is read, while
    it is still in the CPU's cache, so hashing costs no second trip through memory. Reads and
    hashes run without the GIL. `ready(storage)` waits for one storage's bytes and gives their
    digest, so that a caller checking digests (`format.verify`) follows right behind the read.
    `live` lists the live tensors that the records are read into (see `load`): once reading
    starts, their old contents are gone.
    """

    def __init__(self, fd: int | None, records: list[tuple[int, torch.Tensor]], *, owns_fd: bool = True,
                 direct: bool = False, live: list[torch.Tensor] | None = None, readers: int | None = None) -> None:
        self._fd, self._owns_fd, self._direct = fd, owns_fd, direct
        self._records = sorted(records, key=lambda r: r[0])  # (offset in the file, uint8 buffer)
        self._order = {buffer.data_ptr(): i for i, (_, buffer) in enumerate(self._records)}
        self._digests: list[str | None] = [None] * len(self._records)
        self.live = live or []
        self._next = 0          # the next record a reader takes
        self._wanted = -1       # the record `ready` waits for
        self._error: BaseException | None = None
        self._stop = False
        self._changed = threading.Condition()
        count = min(READERS if readers is None else readers, len(self._records))
        self._threads = [threading.Thread(target=self._read_records, args=(_read_bounces[i % len(_read_bounces)],),
                                          name=f'archive-read-{i}', daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _read_records(self, bounce_buffer: _Bounce) -> None:
        direct_fd: int | None = None
        try:
            if self._direct and self._fd is not None:
                direct_fd = _open_direct(self._fd, os.O_RDONLY)
            stream = digest.Stream()
            with bounce_buffer if direct_fd is not None else contextlib.nullcontext() as bounce:
                while True:
                    with self._changed:
                        index = self._next
                        if self._stop or self._error is not None or index >= len(self._records):
                            return
                        self._next += 1
                    offset, buffer = self._records[index]
                    stream.reset()
                    if direct_fd is not None and bounce is not None:
                        direct_fd = self._read_direct(direct_fd, bounce, offset, buffer, stream)
                    if direct_fd is None:
                        self._read_buffered(offset, buffer, stream)
                    if self._stop:  # cut short: no digest of part of a record
                        return
                    with self._changed:
                        self._digests[index] = stream.hexdigest()
                        if index == self._wanted:
                            self._changed.notify_all()
        except BaseException as err:  # raised in the caller's thread, by `ready`
            with self._changed:
                self._error = err
                self._changed.notify_all()
        finally:
            if direct_fd is not None:
                os.close(direct_fd)

    def _read_buffered(self, offset: int, buffer: torch.Tensor, stream: digest.Stream) -> None:
        view, address = buffer.numpy().data.cast('B'), buffer.data_ptr()
        done = 0
        while done < len(view) and not self._stop:
            got = os.preadv(tp.cast(int, self._fd), [view[done:done + PIECE]], offset + done)
            if not got:
                raise EOFError(f"the file ends inside a tensor record (at byte {offset + done})")
            stream.update(address + done, got)
            done += got

    def _read_direct(self, direct_fd: int, bounce: tuple[memoryview, int], offset: int,
                     buffer: torch.Tensor, stream: digest.Stream) -> int | None:
        """Read one record with O_DIRECT through the aligned bounce buffer, copying (without the
        GIL) and hashing it piece by piece; the descriptor, or None if the file system refused
        before anything was read."""
        memory, address = bounce
        position, end, target = offset, offset + buffer.numel(), buffer.data_ptr()
        while position < end and not self._stop:
            start = position - position % DIRECT_ALIGN
            length = min(len(memory), -(-(end - start) // DIRECT_ALIGN) * DIRECT_ALIGN)
            try:
                got = os.preadv(direct_fd, [memory[:length]], start)
            except OSError as err:
                if err.errno != errno.EINVAL or position != offset:
                    raise
                os.close(direct_fd)
                return None
            usable = min(got - (position - start), end - position)
            if usable <= 0:
                raise EOFError(f"the file ends inside a tensor record (at byte {position})")
            for at in range(0, usable, PIECE):
                size = min(PIECE, usable - at)
                ctypes.memmove(target + position - offset + at, address + position - start + at, size)
                stream.update(target + position - offset + at, size)
            position += usable
        return direct_fd

    def ready(self, storage: torch.UntypedStorage) -> str | None:
        """Wait until the bytes of `storage` (if it is one of this archive's) are read, and give
        their xxh3-64 digest (None for a storage that is not); raise the read's error if it
        failed."""
        index = self._order.get(storage.data_ptr())
        if index is None:
            return None
        with self._changed:
            self._wanted = index
            while self._digests[index] is None and self._error is None:
                self._changed.wait()
            if self._digests[index] is None:
                raise tp.cast(BaseException, self._error)
            return self._digests[index]

    def wait(self) -> None:
        """Wait until every record is read."""
        for _, buffer in self._records:
            self.ready(buffer.untyped_storage())

    def close(self) -> None:
        """Stop reading (if not done) and close the file (if this reading owns it)."""
        self._stop = True
        for thread in self._threads:
            thread.join()
        if self._owns_fd and self._fd is not None:
            os.close(self._fd)


def whole_storage(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is all of its storage, in order: its bytes are the storage's (the
    record's, for a loaded tensor, whose digest `Reading.ready` gives)."""
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes())


def _fits(loaded: torch.Tensor, live: tp.Any) -> bool:
    """Whether `loaded`'s bytes can be read straight into `live`: a plain CPU tensor of the same
    shape and dtype, contiguous and at the start of its storage, as `loaded` is all of its own
    (which no other loaded tensor shares), not empty."""
    return (type(live) in (torch.Tensor, torch.nn.Parameter) and live.device.type == 'cpu'
            and live.dtype == loaded.dtype and live.shape == loaded.shape and live.is_contiguous()
            and live.storage_offset() == 0 and not live.is_conj() and not live.is_neg()
            and whole_storage(loaded) and loaded.untyped_storage().nbytes() > 0)


def load(f: os.PathLike | str | tp.BinaryIO, targets: Pairs | None = None,
         direct: bool | None = None) -> tuple[tp.Any, Reading]:
    """Unpickle the archive `f` (a path, or a file open for reading) safely (weights only); its
    tensors' bytes arrive in the background: call `Reading.ready(t.untyped_storage())` before
    using tensor `t` (or `wait()`), then `close()` (which leaves an open `f` open).

    `targets(obj)`, if given, yields (loaded tensor, live tensor) pairs: where they fit
    (`_fits`), the bytes are read into the live tensor and the loaded one becomes a view of it
    (`Reading.live` lists them). `direct` (default `DIRECT_READS`) reads with O_DIRECT.

    Given an open file, everything is read through it (the caller closes it): a file replaced
    meanwhile under the same name is not seen. Raises on anything unusual (another byte order,
    a record of the wrong size, a damaged zip): `torch.load` then gives the precise error.
    """
    direct = DIRECT_READS if direct is None else direct
    owns_fd = not hasattr(f, 'read')
    file = tp.cast(tp.BinaryIO, open(tp.cast(str, f), 'rb') if owns_fd else f)
    try:
        if not AVAILABLE:
            return torch.load(file, map_location='cpu', weights_only=True), Reading(None, [])
        obj, records, uses = _unpickle(file)
        live = _redirect(obj, targets, records, uses) if targets is not None else []
        fd = os.dup(file.fileno()) if owns_fd else file.fileno()
        return obj, Reading(fd, list(records.values()), owns_fd=owns_fd, direct=direct, live=live)
    finally:
        if owns_fd:
            file.close()


class Refused(pickle.UnpicklingError):
    """A pickle that misuses what the restricted unpickler allows (a tensor changed after it was
    built, reaching out of its record, holding more elements than it): forged or damaged. Not
    given to torch's unpickler for a second try."""


class Forbidden(pickle.UnpicklingError):
    """A pickle naming a global outside the allow-list (named in the message)."""


def check_records(f: tp.BinaryIO) -> None:
    """Refuse an archive whose zip directory names a compressed record, or one larger than the
    file: torch writes every record stored, and its reader inflates a compressed one whole into
    memory (a deflate bomb: 1 MiB of file, 1 GiB of `data.pkl`). Read from the central
    directory only; raises `Refused`."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise Refused(f"its zip directory cannot be read ({err})") from err
    finally:
        f.seek(0)
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size > size:
            what = 'compressed' if entry.compress_type != zipfile.ZIP_STORED else 'larger than the file'
            raise Refused(f"its record {entry.filename!r} is {what} ({entry.file_size} bytes): torch writes "
                          "neither (a deflate bomb?)")


def _argument_sizes() -> list[int | None]:
    """By opcode byte: the bytes of its argument (>= 0), or how they are given (pickletools'
    codes: -1 up to a newline, -2/-3/-4/-5 a 1/4/4/8-byte length first; -10 two lines); None for
    a byte that is no opcode."""
    sizes: list[int | None] = [None] * 256
    for op in pickletools.opcodes:
        code = ord(op.code.encode('latin-1'))
        sizes[code] = 0 if op.arg is None else -10 if op.name in ('GLOBAL', 'INST') else op.arg.n
    return sizes


_ARGUMENT_SIZES = _argument_sizes()
_LONG_BINPUT, _PUT, _STOP = ord('r'), ord('p'), ord('.')


def check_memo(data: bytes) -> None:
    """Refuse a pickle that stores into its memo at an index beyond its own length.

    CPython's C unpickler (ours, and the DCP metadata's) grows its memo to twice the largest
    index a PUT or LONG_BINPUT names, and fills it: 4 bytes of a file (LONG_BINPUT 2**27) make
    it touch 2 GiB before anything else is checked. A pickler numbers its memo 0, 1, 2...: no
    index of a real pickle reaches its length. Walks the opcodes (pickletools' table; a few ms
    per 1,000 tensors); raises `Refused`."""
    position, end, largest = 0, len(data), -1
    sizes, from_bytes = _ARGUMENT_SIZES, int.from_bytes
    try:
        while position < end:
            op = data[position]
            position += 1
            size = sizes[op]
            if size is None:
                raise Refused(f"byte {op:#04x} at {position - 1} of its pickle is no opcode")
            if size >= 0:
                if op == _LONG_BINPUT:
                    largest = max(largest, from_bytes(data[position:position + 4], 'little'))
                position += size
            elif size == -1:
                newline = data.index(b'\n', position)
                if op == _PUT:
                    largest = max(largest, int(data[position:newline]))
                position = newline + 1
            elif size == -10:
                position = data.index(b'\n', data.index(b'\n', position) + 1) + 1
            elif size == -2:
                position += 1 + data[position]
            elif size in (-3, -4):
                position += 4 + from_bytes(data[position:position + 4], 'little', signed=size == -3)
            else:
                position += 8 + from_bytes(data[position:position + 8], 'little')
            if op == _STOP:
                break
    except (ValueError, IndexError) as err:
        raise Refused(f"its pickle is cut short or malformed ({err})") from None
    if largest >= len(data):
        raise Refused(f"its pickle stores into memo index {largest}, beyond its {len(data)} bytes (the C unpickler "
                      "would fill a memo of twice that many entries)")


class _StorageType(tuple):
    """A storage class the pickle names (`torch.FloatStorage`...), as `(dtype,)`: immutable and
    not callable, so the pickle can only use it inside a storage's persistent id."""

    __slots__ = ()


class _Storage(tuple):
    """A storage of the archive as the pickle refers to it: `(key, dtype)`, immutable."""

    __slots__ = ()


class _Rebuild(tuple):
    """`torch._utils._rebuild_tensor_v2` as the pickle calls it, for plain CPU tensors only:
    every argument is checked, and the tensor is a view of one of this archive's storages
    (`self[0]`: key -> storage) that lies inside it. Immutable; it records what it builds in
    `self[1]`."""

    __slots__ = ()

    def __call__(self, storage: tp.Any, offset: tp.Any, size: tp.Any, stride: tp.Any,
                 requires_grad: tp.Any = False, hooks: tp.Any = None, metadata: tp.Any = None) -> torch.Tensor:
        storages, built = self
        plain = (type(storage) is _Storage and type(offset) is int and offset >= 0
                 and type(size) is tuple and type(stride) is tuple and len(size) == len(stride)
                 and all(type(n) is int and n >= 0 for n in size + stride)
                 and requires_grad is False and not metadata
                 and (hooks is None or (type(hooks) is collections.OrderedDict and not hooks)))
        if not plain:
            raise pickle.UnpicklingError("a tensor record that is not a plain tensor")
        key, dtype = storage
        data = storages[key]
        element = torch._utils._element_size(dtype)
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
        if extent * element > data.nbytes():
            raise Refused(f"a tensor reaches past the end of its storage {key}")
        if math.prod(size) * element > data.nbytes():  # stride 0 or overlapping: `contiguous()` would grow it
            raise Refused(f"a tensor of storage {key} holds more elements than the storage (stride 0 "
                                         "or overlapping strides)")
        tensor = torch.empty(0, dtype=dtype).set_(data, offset, size, stride)
        # BUILD on a tensor calls `Tensor.__setstate__`, which calls `set_` with values of the file's
        # choosing (a larger size grows the storage past the record): this one is called instead.
        tensor.__setstate__ = _no_setstate  # type: ignore[method-assign]
        built.append((tensor, data.nbytes(), offset, size, stride))
        return tensor


def _no_setstate(state: tp.Any) -> tp.NoReturn:
    raise Refused("BUILD on a tensor (its size, strides or storage changed after it was built)")


def _storage_types() -> dict[str, torch.dtype]:
    """The dtype of each storage class a torch archive's pickle may name, by name (not the
    quantized ones; dtypes newer than these come with `_rebuild_tensor_v3`, which is left to
    torch's unpickler)."""
    found = {'UntypedStorage': torch.uint8}
    with warnings.catch_warnings():  # the legacy classes warn that TypedStorage is deprecated
        warnings.simplefilter('ignore')
        for name in dir(torch):
            if not name.endswith('Storage') or name == 'Storage' or name.startswith('Q'):
                continue
            value = getattr(torch, name)
            if isinstance(value, type) and issubclass(value, torch.storage.TypedStorage) \
                    and isinstance(getattr(value, 'dtype', None), torch.dtype):
                found[name] = value.dtype
    return found


_STORAGE_TYPES = _storage_types()


class _Unpickler(pickle.Unpickler):
    """The C unpickler, restricted to what a state of plain tensors and containers needs.

    The pickle may name three kinds of global, nothing else: `collections.OrderedDict`, the
    storage classes (as inert markers, `_StorageType`) and `torch._utils._rebuild_tensor_v2` (as
    `_Rebuild`, which checks its arguments). Anything else, a tensor that is not plain (needs
    grad, hooks, conj/neg bits) or a malformed storage reference raises UnpicklingError, and the
    caller falls back to torch's own weights-only unpickler, which loads or refuses it. Every
    object the pickle can reach is a container, an inert marker or a tensor over this archive's
    bytes: no code of the file's choosing runs. It does what torch's pure-Python weights-only
    unpickler does for such states, 2 to 3x faster (about 15 ms less per 300 tensors).
    """

    def __init__(self, archive: tp.Any) -> None:
        pickled = archive.get_record('data.pkl')
        check_memo(pickled)
        super().__init__(io.BytesIO(pickled), encoding='utf-8')
        self._archive = archive
        self.storages: dict[str, torch.UntypedStorage] = {}          # by key: fresh, untouched buffers
        self.records: dict[str, tuple[int, torch.Tensor]] = {}       # by key: (offset in the file, buffer)
        self.uses: dict[str, int] = {}                               # by key: how many tensors refer to it
        self.built: list[tuple[torch.Tensor, int, int, tuple[int, ...], tuple[int, ...]]] = []  # as built
        self._rebuild = _Rebuild((self.storages, self.built))

    def find_class(self, module: str, name: str) -> tp.Any:
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return self._rebuild
        if module == 'torch' and name in _STORAGE_TYPES:
            return _StorageType((_STORAGE_TYPES[name],))
        raise Forbidden(f"global {module}.{name} is not allowed here")

    def persistent_load(self, pid: tp.Any) -> _Storage:
        """A storage reference: its record is checked against the size named, and gets a buffer
        (untouched unless read into) the first time."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == 'storage' and type(pid[1]) is _StorageType
                and type(pid[2]) is str and type(pid[3]) is str and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError("a malformed storage reference")
        (dtype,), key, numel = pid[1], pid[2], pid[4]
        self.uses[key] = self.uses.get(key, 0) + 1
        size = numel * torch._utils._element_size(dtype)
        if key not in self.storages:
            name = f'data/{key}'
            if self._archive.get_record_size(name) != size:
                raise ValueError(f"record {name} holds {self._archive.get_record_size(name)} bytes, not {size}")
            buffer = torch.empty(size, dtype=torch.uint8)
            self.storages[key] = buffer.untyped_storage()
            if size:
                self.records[key] = (self._archive.get_record_offset(name), buffer)
        elif self.storages[key].nbytes() != size:
            raise ValueError(f"storage {key} is named with two sizes")
        return _Storage((key, dtype))

    def load(self) -> tp.Any:
        try:
            obj = super().load()
        finally:
            for tensor, *_ in self.built:
                vars(tensor).pop('__setstate__', None)
        for tensor, nbytes, offset, size, stride in self.built:  # nothing changed any tensor after it was made
            if tensor.requires_grad or tensor._backward_hooks or type(tensor) is not torch.Tensor \
                    or tensor.untyped_storage().nbytes() != nbytes or tensor.storage_offset() != offset \
                    or tensor.shape != size or tensor.stride() != stride:
                raise Refused("a tensor was changed after it was built")
        return obj


def _unpickle(file: tp.BinaryIO) -> tuple[tp.Any, dict[str, tuple[int, torch.Tensor]], dict[str, int]]:
    """The archive's object, its records by storage key (offset, fresh untouched buffer) and how
    many tensors refer to each storage."""
    archive: tp.Any = torch._C.PyTorchFileReader(file)  # its stub lacks half its methods
    if archive.has_record('byteorder') and archive.get_record('byteorder') != sys.byteorder.encode():
        raise ValueError(f"{getattr(file, 'name', file)}: written on a machine of another byte order")
    unpickler = _Unpickler(archive)
    return unpickler.load(), unpickler.records, unpickler.uses


def _redirect(obj: tp.Any, targets: Pairs, records: dict[str, tuple[int, torch.Tensor]],
              uses: dict[str, int]) -> list[torch.Tensor]:
    """Point the records of the loaded tensors that fit their live pair at the live tensors'
    memory, and make the loaded tensors views of it; the live tensors so targeted."""
    keys = {buffer.data_ptr(): key for key, (_, buffer) in records.items()}
    live_tensors: list[torch.Tensor] = []
    taken: set[int] = set()
    with torch.no_grad():
        for loaded, live in targets(obj):
            storage = loaded.untyped_storage()
            key = keys.get(storage.data_ptr())
            if key is None or uses[key] != 1 or not _fits(loaded, live) \
                    or live.data_ptr() in taken:
                continue
            records[key] = (records[key][0], live.detach().reshape(-1).view(torch.uint8))
            loaded.set_(live.untyped_storage(), 0, live.shape, live.stride())
            taken.add(live.data_ptr())
            live_tensors.append(live)
    return live_tensors


def check() -> str | None:
    """Why the private torch APIs this module uses do not work with this torch, or None when a
    tiny state survives a round trip: `save`, then plain `torch.load` and `load` into a live
    tensor."""
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {'a': a, 'b': [torch.tensor([True]), 1, 'x']}
    live = torch.zeros(2, 3)
    try:
        with tempfile.TemporaryFile() as f:
            storages: dict[str, torch.UntypedStorage] = {}
            _pickle(state, storages)
            _write_archive(state, storages, _FlushBehind(f.fileno()), None)
            f.seek(0)
            plain = torch.load(f, map_location='cpu', weights_only=True)
            f.seek(0)
            obj, records, uses = _unpickle(tp.cast(tp.BinaryIO, f))
            found = _redirect(obj, lambda obj: [(obj['a'], live)], records, uses)
            reading = Reading(f.fileno(), list(records.values()), owns_fd=False)
            reading.wait()
            reading.close()
        good = [torch.equal(plain['a'], a), plain['b'][1:] == [1, 'x'],
                torch.equal(obj['a'], a), torch.equal(live, a), len(found) == 1,
                obj['a'].data_ptr() == live.data_ptr(), bool(obj['b'][0].item()), obj['b'][1:] == [1, 'x']]
    except Exception as err:  # any failure of a private API means: do not use it
        return f"{type(err).__name__}: {err}"
    return None if all(good) else f"the round trip of a tiny state came back wrong ({good})"


AVAILABLE = True
_reason = check()
if _reason is not None:
    AVAILABLE = False
    warnings.warn(f"solver.checkpointing.archive does not work with torch {torch.__version__} ({_reason}); "
                  "checkpoints are written with torch.save and read with torch.load(weights_only=True) "
                  "instead: correct, slower, and not read into the live tensors.", RuntimeWarning, stacklevel=1)
