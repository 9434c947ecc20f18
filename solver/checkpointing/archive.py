"""The torch zip archive (what `torch.save` writes and `torch.load` reads), at disk speed.

`torch.save` pickles first and writes the tensors' bytes after, computing a CRC32 of every
record (about 1 s per GiB here, longer than the disk takes), and leaves the written pages in the
page cache, where fresh memory costs up to 1.6 s per GiB on this kind of machine. `save` writes
the same archive, which plain `torch.load` reads, differently:

- the tensors' bytes come first and the pickle last, so what is pickled may depend on the
  bytes: `complete` (the checkpoint digests) runs on another thread while they are written;
- no CRC32: the records say 0, which `torch.load` does not check (the checkpoint's xxh3
  digests cover every byte instead; zip tools report "bad CRC", see docs/security.md);
- flush-behind or O_DIRECT (`directio`): the written pages do not stay in the page cache.

`load` reads the pickle (small) first and unpickles it with the restricted C unpickler
(`unpickler`: plain tensors and containers only; anything else goes to torch's own):
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
How the bytes go through aligned buffers, and what a refusing file system gets: `directio`.

All this leans on private torch APIs (`PyTorchFileWriter/Reader`, `_rebuild_tensor_v2`'s
arguments, storage internals). At import a tiny state makes a round trip through `save` and
`load` and plain `torch.load`; if anything fails, `AVAILABLE` is False, one warning says so, and `save`
and `load` fall back to `torch.save` and `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import pickle
import sys
import tempfile
import threading
import typing as tp
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from . import digest, directio, unpickler

PIECE = 1 << 20        # a reading reads and hashes this much at a time: hashed while in the CPU's cache
READERS = 2            # threads reading one archive (2 reads at a time keep a disk's queue busy too)
Ready = tp.Callable[[torch.UntypedStorage], 'str | None']  # waits for a storage's bytes, gives their digest
ALIGNMENT = 64         # torch's storage alignment (`torch.utils.serialization.config.save`)
PROTOCOL = 2           # torch.save's pickle protocol
_DIRECT_IO = os.environ.get('SOLVER_CHECKPOINT_DIRECT_IO', 'writes').lower()
DIRECT_WRITES = _DIRECT_IO in ('writes', 'all')  # the defaults of `save(direct=)` and `load(direct=)`
DIRECT_READS = _DIRECT_IO == 'all'
Pairs = tp.Callable[[tp.Any], tp.Iterable[tuple[torch.Tensor, torch.Tensor]]]  # (loaded, live)


_write_bounces = [directio.Bounce(), directio.Bounce()]  # a direct save fills one while the other is written
_read_bounces = [directio.Bounce() for _ in range(READERS)]  # one per reading thread


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
        direct_fd = directio.open_direct(fd, os.O_WRONLY) if (DIRECT_WRITES if direct is None else direct) else None
        sink: directio.FlushBehind | directio.DirectSink
        if direct_fd is not None:
            sink = directio.DirectSink(fd, direct_fd, [stack.enter_context(bounce) for bounce in _write_bounces])
            stack.callback(sink.close)
        else:
            sink = directio.FlushBehind(fd)
        _write_archive(obj, storages, sink, complete)


def _write_archive(obj: tp.Any, storages: dict[str, torch.UntypedStorage],
                   sink: directio.FlushBehind | directio.DirectSink,
                   complete: tp.Callable[[tp.Any], tp.Any] | None) -> None:
    # Records start at DIRECT_ALIGN for O_DIRECT: aligned staging buffers are then written as they are.
    alignment = directio.DIRECT_ALIGN if isinstance(sink, directio.DirectSink) else ALIGNMENT
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
        if isinstance(sink, directio.DirectSink):
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
    digest, so that a caller checking digests (`envelope.verify`) follows right behind the read.
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

    def _read_records(self, bounce_buffer: directio.Bounce) -> None:
        direct_fd: int | None = None
        try:
            if self._direct and self._fd is not None:
                direct_fd = directio.open_direct(self._fd, os.O_RDONLY)
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
            start = position - position % directio.DIRECT_ALIGN
            length = min(len(memory), -(-(end - start) // directio.DIRECT_ALIGN) * directio.DIRECT_ALIGN)
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
        obj, records, uses = unpickler.unpickle(file)
        live = _redirect(obj, targets, records, uses) if targets is not None else []
        fd = os.dup(file.fileno()) if owns_fd else file.fileno()
        return obj, Reading(fd, list(records.values()), owns_fd=owns_fd, direct=direct, live=live)
    finally:
        if owns_fd:
            file.close()


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
            _write_archive(state, storages, directio.FlushBehind(f.fileno()), None)
            f.seek(0)
            plain = torch.load(f, map_location='cpu', weights_only=True)
            f.seek(0)
            obj, records, uses = unpickler.unpickle(tp.cast(tp.BinaryIO, f))
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
