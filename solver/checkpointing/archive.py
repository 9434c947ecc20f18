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

`load` reads the pickle (small) first and unpickles it with torch's weights-only unpickler:
tensors come back at once, their bytes arriving from a background thread that reads the records
in file order; `Reading.ready(storage)` waits for one storage's bytes, so that digests are
checked right behind the read instead of after all of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import pickle
import sys
import threading
import typing as tp
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import _weights_only_unpickler

CHUNK = 16 << 20       # flush-behind granularity, and the size of one read
LAG = 2                # chunks written back but still cached: the disk queue never runs dry
Ready = tp.Callable[[torch.UntypedStorage], None]  # waits until a storage's bytes are there
ALIGNMENT = 64         # torch's storage alignment (`torch.utils.serialization.config.save`)
PROTOCOL = 2           # torch.save's pickle protocol

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


def save(obj: tp.Any, f: tp.BinaryIO, complete: tp.Callable[[tp.Any], tp.Any] | None = None) -> None:
    """Write `obj` to the open file `f` as an archive `torch.load` reads (see the module doc).

    `complete(obj)`, if given, runs on another thread while the tensors' bytes are written and
    returns what is pickled instead of `obj`: it may add entries (digests), but no tensors.
    The caller flushes and fsyncs `f`.
    """
    storages: dict[str, torch.UntypedStorage] = {}
    _pickle(obj, storages)
    sink = _FlushBehind(f.fileno())
    writer = torch._C.PyTorchFileWriter(tp.cast(tp.IO[bytes], sink), False, ALIGNMENT)  # no CRC32
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
                             ('.storage_alignment', str(ALIGNMENT).encode()),
                             ('byteorder', sys.byteorder.encode())):
            writer.write_record(name, record, len(record))
        writer.write_end_of_file()
    except BaseException:
        # The writer would otherwise finish the archive in its destructor, where a failing write
        # aborts the process: finish it now, writing nothing, since the file is abandoned.
        sink.discard = True
        with contextlib.suppress(RuntimeError):
            writer.write_end_of_file()
        raise


class Reading:
    """The tensor records of an archive, read in file order by a background thread.

    The thread holds the GIL only between its reads, and the digests hash without it
    (`checkpoint.tensor_digest`): `ready(storage)` lets the caller hash each tensor as soon as
    it is read, in parallel with reading the next ones.
    """

    def __init__(self, fd: int, records: list[tuple[int, torch.Tensor]], owns_fd: bool = True) -> None:
        self._fd = fd
        self._owns_fd = owns_fd  # else the caller closes it
        self._records = sorted(records, key=lambda r: r[0])  # (offset in the file, uint8 buffer)
        self._order = {buffer.data_ptr(): i for i, (_, buffer) in enumerate(self._records)}
        self._done = 0
        self._error: BaseException | None = None
        self._stop = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read_all, name='archive-read', daemon=True)
        self._thread.start()

    def _read_all(self) -> None:
        try:
            for offset, buffer in self._records:
                view = buffer.numpy().data.cast('B')
                done = 0
                while done < len(view):
                    if self._stop:
                        return
                    got = os.preadv(self._fd, [view[done:done + CHUNK]], offset + done)
                    if not got:
                        raise EOFError(f"the file ends inside a tensor record (at byte {offset + done})")
                    done += got
                with self._changed:
                    self._done += 1
                    self._changed.notify_all()
        except BaseException as err:  # raised in the caller's thread, by `ready`
            with self._changed:
                self._error = err
                self._changed.notify_all()

    def ready(self, storage: torch.UntypedStorage) -> None:
        """Wait until the bytes of `storage` (if it is one of this archive's) are read; raise the
        read's error if it failed."""
        index = self._order.get(storage.data_ptr())
        if index is None:
            return
        with self._changed:
            while self._done <= index and self._error is None:
                self._changed.wait()
            if self._done <= index:
                raise tp.cast(BaseException, self._error)

    def wait(self) -> None:
        """Wait until every record is read."""
        if self._records:
            self.ready(self._records[-1][1].untyped_storage())

    def close(self) -> None:
        """Stop reading (if not done) and close the file (if it is ours)."""
        self._stop = True
        self._thread.join()
        if self._owns_fd:
            os.close(self._fd)


def load(source: os.PathLike | str | tp.BinaryIO) -> tuple[tp.Any, Reading]:
    """Unpickle the archive at `source` (a path, or a file open for reading) safely (weights
    only); its tensors' bytes arrive in the background: call `Reading.ready(t.untyped_storage())`
    before using tensor `t` (or `wait()`), then `close()`.

    Given an open file, everything is read through it (the caller closes it): a file replaced
    meanwhile under the same name is not seen. Raises on anything unusual (another byte order,
    a record of the wrong size, a damaged zip): `torch.load` then gives the precise error.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, 'rb') as f:
            fd = os.dup(f.fileno())  # for the reading thread, which outlives `f`
            try:
                return _load(f, fd, owns_fd=True)
            except BaseException:
                os.close(fd)
                raise
    return _load(source, source.fileno(), owns_fd=False)


def _load(source: tp.BinaryIO, fd: int, owns_fd: bool) -> tuple[tp.Any, Reading]:
    path = getattr(source, 'name', source)
    archive: tp.Any = torch._C.PyTorchFileReader(source)  # its stub lacks half its methods
    if archive.has_record('byteorder') and archive.get_record('byteorder') != sys.byteorder.encode():
        raise ValueError(f"{path}: written on a machine of another byte order")
    records: list[tuple[int, torch.Tensor]] = []
    storages: dict[str, torch.UntypedStorage] = {}

    def persistent_load(pid: tp.Any) -> torch.storage.TypedStorage:
        _, storage_type, key, _, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in storages:
            size = numel * torch._utils._element_size(dtype)
            name = f'data/{key}'
            if archive.get_record_size(name) != size:
                raise ValueError(f"{path}: record {name} holds {archive.get_record_size(name)} bytes, not {size}")
            buffer = torch.empty(size, dtype=torch.uint8)
            storages[key] = buffer.untyped_storage()
            if size:
                records.append((archive.get_record_offset(name), buffer))
        return torch.storage.TypedStorage(wrap_storage=storages[key], dtype=dtype, _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(archive.get_record('data.pkl')), encoding='utf-8')
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    obj = unpickler.load()
    return obj, Reading(fd, records, owns_fd)
