"""The restricted unpickler that loading a checkpoint's archive rests on, and its hardening.

A checkpoint from elsewhere must never run code. `unpickle` reads the pickle of a torch zip
archive (`data.pkl`) with CPython's C unpickler, restricted to what a state of plain tensors and
containers needs (`RestrictedUnpickler`); anything else raises, and the caller falls back to
torch's own weights-only unpickler, which loads or refuses it. Before any of that:

- `check_records`: no compressed record, none larger than the file (a deflate bomb);
- `check_memo`: no memo index beyond the pickle's length (the C unpickler would allocate twice
  that many entries before checking anything);
- every tensor is a view of one of this archive's storages that lies inside it, and nothing may
  change it after it is built (`Refused`).

`Forbidden` names a global outside the allow-list. `sharded` uses `check_memo` for DCP metadata.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import sys
import typing as tp
import warnings
import zipfile

import torch


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


class RestrictedUnpickler(pickle.Unpickler):
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


def unpickle(file: tp.BinaryIO) -> tuple[tp.Any, dict[str, tuple[int, torch.Tensor]], dict[str, int]]:
    """The archive's object, its records by storage key (offset, fresh untouched buffer) and how
    many tensors refer to each storage."""
    archive: tp.Any = torch._C.PyTorchFileReader(file)  # its stub lacks half its methods
    if archive.has_record('byteorder') and archive.get_record('byteorder') != sys.byteorder.encode():
        raise ValueError(f"{getattr(file, 'name', file)}: written on a machine of another byte order")
    unpickler = RestrictedUnpickler(archive)
    return unpickler.load(), unpickler.records, unpickler.uses
