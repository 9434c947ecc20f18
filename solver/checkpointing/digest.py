"""xxh3 digests of memory, without the GIL: of a tensor, of bytes as they stream in, 128-bit keys.

Checkpoint digests (`envelope`) are xxh3-64 of each tensor's bytes; incremental blob keys (`store`)
are xxh3-128. python-xxhash's own functions hold the GIL while they hash, so hashing beside a
thread that reads or writes a file (or runs training) would hold that thread up for the whole
hash. Its shared library exports the C API, which ctypes calls without the GIL: this module uses
it when the library agrees with the Python API on a probe, and the Python API otherwise.

`Stream` hashes bytes piece by piece as they arrive (`archive.Reading` hashes each piece right
after reading it, while it is still in the CPU's cache) and gives the same digest as hashing the
whole at once.
"""

from __future__ import annotations

import ctypes
import typing as tp

import torch
import xxhash


class _Hash128(ctypes.Structure):
    _fields_ = [('low64', ctypes.c_uint64), ('high64', ctypes.c_uint64)]


def _library() -> tp.Any:
    """python-xxhash's shared library with the prototypes we call, or None where it does not
    export them or disagrees with the Python API."""
    try:
        import xxhash._xxhash
        lib = ctypes.CDLL(xxhash._xxhash.__file__)
        lib.XXH3_64bits.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.XXH3_64bits.restype = ctypes.c_uint64
        lib.XXH3_128bits.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.XXH3_128bits.restype = _Hash128
        lib.XXH3_createState.argtypes = []
        lib.XXH3_createState.restype = ctypes.c_void_p
        lib.XXH3_freeState.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_reset.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.XXH3_64bits_digest.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_digest.restype = ctypes.c_uint64
    except (ImportError, OSError, AttributeError):
        return None
    probe = b'solver checkpoint digest, long enough to cross more than one of the stripes xxh3 ' * 40
    value = lib.XXH3_128bits(probe, len(probe))
    state = lib.XXH3_createState()
    if not state:
        return None
    try:
        lib.XXH3_64bits_reset(state)
        for start in range(0, len(probe), 1000):  # uneven pieces
            piece = probe[start:start + 1000]
            lib.XXH3_64bits_update(state, piece, len(piece))
        streamed = lib.XXH3_64bits_digest(state)
    finally:
        lib.XXH3_freeState(state)
    good = (format(lib.XXH3_64bits(probe, len(probe)), '016x') == xxhash.xxh3_64_hexdigest(probe)
            == format(streamed, '016x')
            and f'{value.high64:016x}{value.low64:016x}' == xxhash.xxh3_128_hexdigest(probe))
    return lib if good else None


_lib = _library()


def _memory(address: int, nbytes: int) -> tp.Any:
    """The `nbytes` bytes at `address`, as a buffer the Python API can hash (fallback only)."""
    return (ctypes.c_char * nbytes).from_address(address) if nbytes else b''


def xxh3_64(address: int, nbytes: int) -> str:
    """xxh3-64 (hex) of the `nbytes` bytes at `address`."""
    if _lib is not None:
        return format(_lib.XXH3_64bits(address, nbytes), '016x')
    return xxhash.xxh3_64_hexdigest(_memory(address, nbytes))


def xxh3_128(address: int, nbytes: int) -> str:
    """xxh3-128 (hex) of the `nbytes` bytes at `address`."""
    if _lib is not None:
        value = _lib.XXH3_128bits(address, nbytes)
        return f'{value.high64:016x}{value.low64:016x}'
    return xxhash.xxh3_128_hexdigest(_memory(address, nbytes))


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements in order, contiguous in CPU memory (itself, flattened, if it is)."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous() or flat.device.type != 'cpu':
        flat = flat.contiguous().cpu()
    return flat


def tensor_digest(tensor: torch.Tensor) -> str:
    """xxh3-64 of a tensor's bytes (about 10 GB/s here: 0.1 s per GiB)."""
    flat = flat_bytes(tensor)
    return xxh3_64(flat.data_ptr(), flat.numel() * flat.element_size())


class Stream:
    """xxh3-64 of bytes given piece by piece (`update(address, nbytes)`), then `hexdigest()`:
    the digest of all the pieces one after the other. `reset()` starts again."""

    def __init__(self) -> None:
        self._state = _lib.XXH3_createState() if _lib is not None else None
        if _lib is not None and not self._state:
            raise MemoryError("XXH3_createState failed")
        self._fallback = xxhash.xxh3_64()
        self.reset()

    def reset(self) -> None:
        if self._state is not None:
            _lib.XXH3_64bits_reset(self._state)
        else:
            self._fallback.reset()

    def update(self, address: int, nbytes: int) -> None:
        if self._state is not None:
            _lib.XXH3_64bits_update(self._state, address, nbytes)
        elif nbytes:
            self._fallback.update(_memory(address, nbytes))

    def hexdigest(self) -> str:
        if self._state is not None:
            return format(_lib.XXH3_64bits_digest(self._state), '016x')
        return self._fallback.hexdigest()

    def __del__(self) -> None:
        if getattr(self, '_state', None) is not None and _lib is not None:
            _lib.XXH3_freeState(self._state)
            self._state = None
