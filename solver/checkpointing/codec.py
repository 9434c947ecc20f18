"""Lossless compression of a checkpoint's tensors (`checkpoint.compress=zstd`): encoding and the
bounded decoding a reader of files from elsewhere needs.

`encode` replaces each tensor of a state by a uint8 tensor holding one zstd frame (level 1) of
its bytes; a float tensor's bytes are shuffled first (the k-th byte of every element together,
plane by plane), which is what lets zstd find their repeats. The table beside the state
(`'compressed': {'refs': [...]}`, one entry per tensor: encoding, dtype, shape, bytes) says
what each frame decodes to. The frames are ordinary tensors of an ordinary archive, read by the
same hardened reader as any other (zip records stored, never deflated; the restricted
unpickler), and the digests cover the decoded state, checked after `decode`.

`decode` checks every entry before it decompresses anything: the declared size is the dtype's
size times the shape's elements, no more than a zstd frame of that length can hold
(`MAX_RATIO`), and all of them together no more than the memory available; the frame must
declare the same content size in its header, and decompression is capped at it.
A decoded tensor is contiguous: a view comes back as a tensor of its own (same values, same
digest), and tensors sharing a storage are each stored whole.
"""

from __future__ import annotations

import math
import os
import typing as tp
from pathlib import Path

import numpy as np
import torch
import zstandard

from . import archive, tree
from .faults import CorruptCheckpointError

ENCODINGS = ('zstd',)      # the values of `checkpoint.compress`
LEVEL = 1                  # zstd's fastest standard level: more costs save time for little (README)
MAX_RATIO = 1 << 15        # a zstd block (3-byte header, 1 RLE byte) yields at most 128 KiB: 32768x


def is_compressed(payload: tp.Any) -> bool:
    """Whether a loaded checkpoint payload holds its state's tensors as zstd frames."""
    return isinstance(payload, dict) and isinstance(payload.get('compressed'), dict)


def _shuffled(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize > 1


def _encode_tensor(tensor: torch.Tensor, compressor: zstandard.ZstdCompressor) -> tuple[torch.Tensor, tuple]:
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    if _shuffled(tensor.dtype):
        flat = flat.view(-1, tensor.dtype.itemsize).t().contiguous().reshape(-1)
    frame = compressor.compress(flat.numpy().data)
    encoding = 'zstd+shuffle' if _shuffled(tensor.dtype) else 'zstd'
    ref = (encoding, str(tensor.dtype), tuple(tensor.shape), flat.numel())
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else torch.empty(0, dtype=torch.uint8), ref


def encode(state: dict[str, tp.Any]) -> tuple[dict[str, tp.Any], dict[str, tp.Any]]:
    """`state` with each tensor a zstd frame of its bytes, and the table (`'compressed'`) that
    `decode` reads them back by."""
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    refs: list[tuple] = []

    def frame(tensor: torch.Tensor) -> torch.Tensor:
        data, ref = _encode_tensor(tensor, compressor)
        refs.append(ref)
        return data
    return tree.map_tensors(state, frame), {'refs': refs}


def _checked(ref: tp.Any, frame: torch.Tensor) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    """The entry `ref` of frame `frame`, checked against what the frame could hold; raises
    ValueError saying what is wrong."""
    if not (isinstance(ref, tuple) and len(ref) == 4):
        raise ValueError("not an (encoding, dtype, shape, bytes) entry")
    encoding, dtype_name, shape, nbytes = ref
    dtype = getattr(torch, str(dtype_name).rpartition('.')[2], None)
    if encoding not in ('zstd', 'zstd+shuffle') or not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown encoding {encoding!r:.40} or dtype {dtype_name!r:.40}")
    if (encoding == 'zstd+shuffle') != _shuffled(dtype):
        raise ValueError(f"encoding {encoding} does not go with {dtype}")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape) and type(nbytes) is int):
        raise ValueError("shape or size is not made of integers >= 0")
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise ValueError(f"declares {nbytes} bytes for a {dtype} tensor of shape {shape}")
    if frame.dtype != torch.uint8 or frame.dim() != 1 or not archive.whole_storage(frame):
        raise ValueError("its frame is not a plain byte record")
    if nbytes > frame.numel() * MAX_RATIO:
        raise ValueError(f"declares {nbytes} bytes, more than a frame of {frame.numel()} bytes can hold")
    return encoding, dtype, shape, nbytes


def _decode_tensor(frame: torch.Tensor, encoding: str, dtype: torch.dtype, shape: tuple[int, ...],
                   nbytes: int) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    data = frame.numpy().data
    declared = zstandard.frame_content_size(data)  # from the frame header alone
    if declared != nbytes:
        raise ValueError(f"its frame declares {'no size' if declared < 0 else f'{declared} bytes'}, "
                         f"its entry {nbytes}")
    # With the content size in the header, the output is allocated at that size (checked above)
    # and libzstd stops with an error where the data would go beyond it.
    raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=nbytes)
    if len(raw) != nbytes:
        raise ValueError(f"its frame decodes to {len(raw)} bytes, its entry says {nbytes}")
    planes = np.frombuffer(raw, dtype=np.uint8)  # one copy below: unshuffled, or made writable
    flat = planes.reshape(dtype.itemsize, -1).T.copy() if encoding == 'zstd+shuffle' else planes.copy()
    return torch.from_numpy(flat).reshape(-1).view(dtype).reshape(shape)


def physical_memory() -> int:
    """This machine's physical memory in bytes: what all decoded tensors together may take."""
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def decode(path: Path, payload: dict[str, tp.Any], limit: int | None = None) -> dict[str, tp.Any]:
    """The payload of a compressed checkpoint file with its state's tensors decoded; each entry
    is checked before anything is decompressed, and all of them together must fit in `memory`
    bytes (`limit`, default `physical_memory()`). Raises `CorruptCheckpointError` naming the file
    and the entry."""
    limit = physical_memory() if limit is None else limit
    refs = payload['compressed'].get('refs')
    frames: list[torch.Tensor] = []
    tree.skeleton(payload.get('state'), frames)
    if not isinstance(refs, list) or len(refs) != len(frames):
        raise CorruptCheckpointError(f"{path} is damaged: its compression table does not match its state.")
    checked = []
    for index, (ref, frame) in enumerate(zip(refs, frames)):
        try:
            checked.append(_checked(ref, frame))
        except ValueError as err:
            raise CorruptCheckpointError(f"{path} is damaged: compressed tensor {index}: {err}.") from None
    total = sum(entry[3] for entry in checked)
    if total > limit:
        raise CorruptCheckpointError(
            f"{path} is damaged or too large: its tensors decompress to {total} bytes, more than the "
            f"{limit} bytes of this machine's memory; load it on a larger machine.")
    decoded = iter(zip(range(len(frames)), frames, checked))

    def fill(_: torch.Tensor) -> torch.Tensor:
        index, frame, entry = next(decoded)
        try:
            return _decode_tensor(frame, *entry)
        except (ValueError, zstandard.ZstdError) as err:
            raise CorruptCheckpointError(f"{path} is damaged: compressed tensor {index}: {err}.") from None
    return {**payload, 'state': tree.map_tensors(payload['state'], fill)}
