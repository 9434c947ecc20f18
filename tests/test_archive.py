"""The archive format (solver/checkpointing/archive.py): what `archive.save` writes is a torch zip archive that
plain `torch.load` reads, `archive.load` reads any torch zip archive the same way, and a failed
write raises instead of taking the process down.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
import xxhash

from solver.checkpointing import archive, digest, envelope


def awkward_state() -> dict:
    """Tensors of every kind a state may hold: views sharing a storage, empty, 0-d, odd dtypes."""
    base = torch.arange(24, dtype=torch.float32)
    return {
        'weight': base.reshape(4, 6),
        'view': base[6:12],                 # shares the storage of 'weight'
        'strided': torch.randn(5, 7).t(),   # not contiguous
        'empty': torch.empty(0, 3),
        'scalar': torch.tensor(2.5, dtype=torch.bfloat16),
        'mask': torch.tensor([True, False, True]),
        'ids': torch.arange(5, dtype=torch.int64),
        'plain': [1, 'two', (3.0, None)],
    }


def save(path: Path, obj: object, complete=None) -> None:
    with open(path, 'wb') as f:
        archive.save(obj, f, complete)




@pytest.mark.parametrize('mmap', [False, True])
def test_plain_torch_load_reads_what_archive_save_writes(tmp_path: Path, mmap: bool, assert_same):
    state = awkward_state()
    save(tmp_path / 'a.th', state)
    loaded = torch.load(tmp_path / 'a.th', weights_only=True, mmap=mmap)
    assert_same(loaded, state)
    assert loaded['view'].untyped_storage().data_ptr() == loaded['weight'].untyped_storage().data_ptr()


def test_the_tensor_records_come_before_the_pickle(tmp_path: Path):
    save(tmp_path / 'a.th', awkward_state())
    names = [info.filename for info in zipfile.ZipFile(tmp_path / 'a.th').infolist()]
    assert names.index('archive/data.pkl') > max(i for i, n in enumerate(names) if '/data/' in n)


def test_complete_adds_what_depends_on_the_bytes(tmp_path: Path):
    state = awkward_state()
    save(tmp_path / 'a.th', {'state': state},
         complete=lambda obj: {**obj, 'digests': envelope.digests(obj['state'])})
    loaded = torch.load(tmp_path / 'a.th', weights_only=True)
    assert loaded['digests'] == envelope.digests(state) == envelope.digests(loaded['state'])


def test_complete_may_not_add_tensors(tmp_path: Path):
    with pytest.raises(ValueError, match='must not add or remove tensors'):
        save(tmp_path / 'a.th', {'a': torch.ones(2)}, complete=lambda obj: {**obj, 'b': torch.ones(3)})


@pytest.mark.parametrize('writer', ['archive.save', 'torch.save'])
def test_archive_load_reads_any_torch_archive_tensor_by_tensor(tmp_path: Path, writer: str, assert_same):
    state = awkward_state()
    if writer == 'torch.save':
        torch.save(state, tmp_path / 'a.th')
    else:
        save(tmp_path / 'a.th', state)
    loaded, reading = archive.load(tmp_path / 'a.th')
    try:
        reading.ready(loaded['weight'].untyped_storage())
        assert torch.equal(loaded['weight'], state['weight'])
        reading.wait()
    finally:
        reading.close()
    assert_same(loaded, state)


def test_archive_load_refuses_arbitrary_pickles(tmp_path: Path):
    torch.save({'not weights': zipfile.ZipInfo('x')}, tmp_path / 'evil.th')
    with pytest.raises(Exception, match='global zipfile.ZipInfo is not allowed'):
        archive.load(tmp_path / 'evil.th')


def test_a_record_past_the_end_of_the_file_is_reported_by_ready(tmp_path: Path):
    (tmp_path / 'short').write_bytes(b'x' * 100)
    buffer = torch.empty(64, dtype=torch.uint8)
    reading = archive.Reading(os.open(tmp_path / 'short', os.O_RDONLY), [(80, buffer)])
    with pytest.raises(EOFError, match='ends inside a tensor record'):
        reading.ready(buffer.untyped_storage())
    reading.close()


def test_a_failed_write_raises_the_os_error_and_the_process_lives_on(tmp_path: Path):
    (tmp_path / 'a.th').write_bytes(b'')
    with open(tmp_path / 'a.th', 'rb') as read_only:  # writing to it fails (EBADF)
        with pytest.raises(OSError):
            archive.save({'a': torch.ones(1000)}, read_only)
    # torch's archive writer finishes the archive in its destructor; a failing write there
    # would abort the process (std::terminate), which this line would not survive.
    save(tmp_path / 'b.th', {'a': torch.ones(3)})
    assert torch.equal(torch.load(tmp_path / 'b.th', weights_only=True)['a'], torch.ones(3))


def test_digests_without_the_gil_equal_xxhash(tmp_path: Path):
    for tensor in awkward_state().values():
        if isinstance(tensor, torch.Tensor):
            flat = tensor.reshape(-1).contiguous()
            data = flat.view(torch.uint8).numpy() if flat.numel() else b''
            assert digest.tensor_digest(tensor) == xxhash.xxh3_64_hexdigest(data)
