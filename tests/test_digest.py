"""Digests (solver/checkpointing/digest.py) and the reading threads that hash as they read
(`archive.Reading`): a digest computed piece by piece, by ctypes or by python-xxhash's own API,
is the digest of the whole, and a damaged byte anywhere in a record changes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from solver.checkpointing import archive, digest, envelope, faults, unpickler


@pytest.fixture(params=['ctypes', 'python-xxhash'])
def implementation(request, monkeypatch):
    if request.param == 'python-xxhash':
        monkeypatch.setattr(digest, '_lib', None)
    elif digest._lib is None:
        pytest.skip("python-xxhash's library does not export the C API here")
    return request.param


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_a_stream_of_pieces_gives_the_digest_of_the_whole(data: bytes, cuts: list[int]):
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    for lib in (digest._lib, None):
        saved, digest._lib = digest._lib, lib
        try:
            stream = digest.Stream()
            stream.update(tensor.data_ptr(), 0)
            for start, end in zip(bounds, bounds[1:]):
                stream.update(tensor.data_ptr() + start, end - start)
            assert stream.hexdigest() == xxhash.xxh3_64_hexdigest(data) == digest.tensor_digest(tensor)
            stream.reset()
            assert stream.hexdigest() == xxhash.xxh3_64_hexdigest(b'')
        finally:
            digest._lib = saved


def test_128_bit_keys_and_tensor_digests_agree_with_python_xxhash(implementation):
    tensor = torch.randn(33, 7)
    data = tensor.numpy().tobytes()
    assert digest.xxh3_128(tensor.data_ptr(), len(data)) == xxhash.xxh3_128_hexdigest(data)
    assert digest.tensor_digest(tensor.t()) == xxhash.xxh3_64_hexdigest(tensor.t().contiguous().numpy().tobytes())


def _written(tmp_path: Path, sizes: list[int]) -> tuple[Path, list[torch.Tensor]]:
    tensors = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    with open(tmp_path / 'a.th', 'wb') as f:
        archive.save(tensors, f)
    return tmp_path / 'a.th', tensors


@pytest.mark.parametrize('readers', [1, 2, 5])
@pytest.mark.parametrize('direct', [False, True])
def test_each_record_is_hashed_as_it_is_read(tmp_path: Path, monkeypatch, readers: int, direct: bool):
    monkeypatch.setattr(archive, 'PIECE', 4096 + 64)  # records of several pieces, cut off alignment
    path, tensors = _written(tmp_path, [1, 4096, 3 * 4096 + 5, 100_000, 0, 17])
    with open(path, 'rb') as f:
        _, records, _ = unpickler.unpickle(f)
    by_size = {t.numel(): t for t in tensors}
    reading = archive.Reading(os.open(path, os.O_RDONLY), list(records.values()), direct=direct, readers=readers)
    try:
        assert len(records) == 5  # the empty tensor has no record
        for _, buffer in records.values():
            assert reading.ready(buffer.untyped_storage()) == digest.tensor_digest(by_size[buffer.numel()])
            assert torch.equal(buffer, by_size[buffer.numel()])
        assert reading.ready(torch.ones(3).untyped_storage()) is None  # not one of the archive's
    finally:
        reading.close()


def test_a_flipped_byte_in_any_record_is_caught_by_the_streamed_digests(tmp_path: Path):
    state = {'a': torch.randn(300_000), 'b': torch.randn(5, 5), 'c': torch.arange(7)}
    path = tmp_path / 'c.th'
    envelope.write_checkpoint(path, state, {'epoch': 1})
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt = envelope.read_checkpoint(path, into=live)
    assert all(torch.equal(live[k], state[k]) for k in state) and len(ckpt.live) == 3
    data = bytearray(path.read_bytes())
    needle = state['a'][200_000:200_004].numpy().tobytes()
    data[data.index(needle) + 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(faults.DamagedIntoLiveError, match='1 of 3 tensors'):
        envelope.read_checkpoint(path, into={k: torch.zeros_like(v) for k, v in state.items()})
    with pytest.raises(faults.CorruptCheckpointError, match='1 of 3 tensors'):
        envelope.read_checkpoint(path)
