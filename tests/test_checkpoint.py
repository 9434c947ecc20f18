"""Checkpoint files (checkpointing/envelope.py, naming.py, recovery.py): round trip, integrity, safe loading,
atomic writes, keep policy."""

from __future__ import annotations

import collections
import enum
import logging
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from solver.checkpointing import envelope, faults, fs, manager, naming, policy, recovery
from solver.checkpointing.config import CheckpointConfig
from solver.checkpointing.faults import CorruptCheckpointError, UnsafeCheckpointError


def small_state() -> dict:
    torch.manual_seed(0)
    return {
        'model': nn.Linear(64, 32).state_dict(),  # an OrderedDict, as every module gives
        'optimizer': {'state': {0: {'step': torch.tensor(3.0)}}, 'param_groups': [{'lr': 0.1, 'params': [0]}]},
        'history': [{'train': {'loss': 0.5}}, {'train': {'loss': 0.25}}],
        'rng': (3, (1, 2, 3), None),
        'progress': {'step': 7, 'name': 'x', 'flag': True, 'ids': torch.arange(5)},
    }


def small_meta() -> dict:
    return {'epoch': 2, 'step': 7, 'sig': 'abcdef12', 'config': {'optim': {'lr': 0.1, 'betas': [0.9, 0.99]}}}




def tensor_bytes_offset(path: Path, index: int = 0) -> int:
    """Where the bytes of the `index`-th tensor storage start in a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(f'/data/{index}'))
    data = path.read_bytes()
    name_len, extra_len = struct.unpack('<HH', data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def replace_once(path: Path, old: bytes, new: bytes) -> None:
    """Damage a file in place: replace the only occurrence of `old` by `new` (same length)."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / 'checkpoint.th'
    envelope.write_checkpoint(path, small_state(), small_meta())
    return path


class RunsCode:
    """A pickle whose loading runs a shell command: what a malicious checkpoint looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class Custom:
    pass


class Color(enum.Enum):
    RED = 1


# -- round trip -------------------------------------------------------------------------------

def test_round_trip_gives_back_state_and_metadata(saved: Path, assert_same):
    loaded = envelope.read_checkpoint(saved)
    assert loaded.path == saved
    assert_same(loaded.state, small_state())
    assert loaded.meta == small_meta()


def test_the_file_loads_with_plain_torch_load_weights_only(saved: Path):
    payload = torch.load(saved, weights_only=True)
    assert payload['format'] == envelope.FORMAT and payload['version'] == envelope.VERSION


# -- integrity --------------------------------------------------------------------------------

def test_a_flipped_byte_in_tensor_data_is_detected_by_the_digests(saved: Path):
    data = bytearray(saved.read_bytes())
    data[tensor_bytes_offset(saved) + 17] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match='damaged') as err:
        envelope.read_checkpoint(saved)
    assert str(saved) in str(err.value)


def test_a_flipped_byte_in_the_metadata_is_detected(saved: Path):
    replace_once(saved, b'abcdef12', b'abcdeg12')
    with pytest.raises(CorruptCheckpointError, match='damaged'):
        envelope.read_checkpoint(saved)


def test_a_damaged_state_key_is_reported_as_a_damaged_checkpoint(saved: Path):
    replace_once(saved, b'\x05\x00\x00\x00state', b'\x05\x00\x00\x00stbte')
    with pytest.raises(CorruptCheckpointError, match=str(saved)):
        envelope.read_checkpoint(saved)


@pytest.mark.parametrize('keep', [0.1, 0.5, 0.99, 30], ids=['10%', '50%', '99%', 'header only'])
def test_a_truncated_file_is_reported_as_damaged(saved: Path, keep: float):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError) as err:
        envelope.read_checkpoint(saved)
    assert str(saved) in str(err.value)


def test_an_empty_file_is_reported_as_empty(tmp_path: Path):
    path = tmp_path / 'checkpoint.th'
    path.touch()
    with pytest.raises(CorruptCheckpointError, match='empty') as err:
        envelope.read_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_missing_file_is_a_checkpoint_error_naming_it(tmp_path: Path):
    path = tmp_path / 'nothing.th'
    with pytest.raises(faults.CheckpointError, match=str(path)):
        envelope.read_checkpoint(path)


def test_a_text_file_is_not_taken_for_a_checkpoint(tmp_path: Path):
    path = tmp_path / 'notes.th'
    path.write_text('not a checkpoint at all\n' * 10)
    with pytest.raises(CorruptCheckpointError, match='not a torch zip archive') as err:
        envelope.read_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_safetensors_file_is_not_taken_for_a_checkpoint(tmp_path: Path):
    path = tmp_path / 'model.safetensors'
    save_file({'weight': torch.ones(4, 4)}, str(path))
    with pytest.raises(CorruptCheckpointError, match='not a torch zip archive') as err:
        envelope.read_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_plain_torch_state_dict_is_not_a_solver_checkpoint(tmp_path: Path):
    path = tmp_path / 'weights.th'
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CorruptCheckpointError, match='not a solver checkpoint') as err:
        envelope.read_checkpoint(path)
    assert str(path) in str(err.value)


def test_another_format_version_is_refused_naming_both_versions(tmp_path: Path, saved: Path):
    payload = torch.load(saved, weights_only=True)
    payload['version'] = envelope.VERSION + 1
    torch.save(payload, saved)
    with pytest.raises(CorruptCheckpointError, match=f'version {envelope.VERSION + 1}'):
        envelope.read_checkpoint(saved)


# -- safe loading -----------------------------------------------------------------------------

def test_the_malicious_fixture_really_runs_code_when_loaded_unsafely(tmp_path: Path):
    marker = tmp_path / 'pwned'
    torch.save({'state': RunsCode(marker)}, tmp_path / 'evil.th')
    torch.load(tmp_path / 'evil.th', weights_only=False)
    assert marker.exists()


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path: Path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'checkpoint.th'
    torch.save({'format': envelope.FORMAT, 'version': envelope.VERSION, 'state': RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match='refused: needs arbitrary Python objects') as err:
        envelope.read_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_the_refusal_names_the_code_the_pickle_asked_for(tmp_path: Path):
    path = tmp_path / 'checkpoint.th'
    torch.save({'state': RunsCode(tmp_path / 'pwned')}, path)
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):
        envelope.read_checkpoint(path)


def test_a_damaged_pickle_opcode_is_reported_as_damage_not_as_unsafe(saved: Path):
    replace_once(saved, b'\x80\x02}', b'\x80\x02\xfe')  # the payload dict's opcode -> no such opcode
    with pytest.raises(CorruptCheckpointError, match='damaged'):
        envelope.read_checkpoint(saved)


# -- writing ----------------------------------------------------------------------------------

REFUSED_AT_SAVE = [
    pytest.param({'cfg': OmegaConf.create({'lr': 0.1})}, {}, id='DictConfig in state'),
    pytest.param({'thing': Custom()}, {}, id='custom object in state'),
    pytest.param({'sums': collections.defaultdict(float)}, {}, id='dict subclass in state'),
    pytest.param({'by_color': {Color.RED: 1}}, {}, id='enum as a dict key'),
    pytest.param({}, {'config': OmegaConf.create({'lr': 0.1})}, id='DictConfig in meta'),
]


@pytest.mark.parametrize('state, meta', REFUSED_AT_SAVE)
def test_what_loading_would_refuse_is_refused_at_save_time_leaving_the_old_file(
        saved: Path, state: dict, meta: dict):
    before = saved.read_bytes()
    with pytest.raises(TypeError):
        envelope.write_checkpoint(saved, {**small_state(), **state}, {**small_meta(), **meta})
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_an_error_inside_atomic_open_leaves_the_old_file_and_no_temporary(saved: Path):
    before = saved.read_bytes()
    with pytest.raises(RuntimeError, match='disk on fire'), fs.atomic_open(saved) as f:
        f.write(b'half a checkpoint')
        raise RuntimeError('disk on fire')
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_a_completed_atomic_open_replaces_the_file(saved: Path):
    with fs.atomic_open(saved) as f:
        f.write(b'new')
    assert saved.read_bytes() == b'new'
    assert os.listdir(saved.parent) == [saved.name]


def test_clean_stray_files_removes_only_temporaries_of_saves(tmp_path: Path):
    keep = ['checkpoint.th', 'checkpoint_3.th', '.lock', 'history.json']
    stray = ['.checkpoint.th.tmp.123', '.checkpoint_3.th.tmp.4567']
    for name in keep + stray:
        (tmp_path / name).write_bytes(b'x')
    recovery.clean_stray_files(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


# -- finding the checkpoint to resume from -----------------------------------------------------

def write_epochs(folder: Path, *epochs: int) -> None:
    for epoch in epochs:
        envelope.write_checkpoint(naming.epoch_checkpoint_path(folder, epoch),
                                    {'epoch': torch.tensor(epoch)}, {'epoch': epoch})


def test_load_newest_intact_prefers_the_latest_file(tmp_path: Path):
    write_epochs(tmp_path, 1, 2)
    envelope.write_checkpoint(tmp_path / 'checkpoint.th', {'epoch': torch.tensor(3)}, {'epoch': 3})
    assert recovery.load_newest_intact(tmp_path).path == tmp_path / 'checkpoint.th'


def test_load_newest_intact_falls_back_to_the_newest_intact_epoch_file(tmp_path: Path, caplog):
    write_epochs(tmp_path, 1, 2, 10)
    damaged = tmp_path / 'checkpoint.th'
    damaged.write_bytes(b'\0' * 100)
    with caplog.at_level(logging.ERROR, logger='solver.checkpointing.recovery'):
        found = recovery.load_newest_intact(tmp_path)
    assert found.path == tmp_path / 'checkpoint_10.th' and found.meta['epoch'] == 10
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(damaged) in errors[0]


def test_load_newest_intact_skips_every_damaged_file(tmp_path: Path, caplog):
    write_epochs(tmp_path, 1, 2)
    (tmp_path / 'checkpoint.th').write_bytes(b'')
    (tmp_path / 'checkpoint_2.th').write_bytes(b'garbage')
    with caplog.at_level(logging.ERROR, logger='solver.checkpointing.recovery'):
        assert recovery.load_newest_intact(tmp_path).path == tmp_path / 'checkpoint_1.th'
    logged = '\n'.join(r.getMessage() for r in caplog.records)
    assert 'checkpoint.th' in logged and 'checkpoint_2.th' in logged


def test_load_newest_intact_raises_when_every_checkpoint_is_damaged(tmp_path: Path):
    (tmp_path / 'checkpoint.th').write_bytes(b'')
    (tmp_path / 'checkpoint_1.th').write_bytes(b'garbage')
    with pytest.raises(CorruptCheckpointError, match='refusing to start over') as err:
        recovery.load_newest_intact(tmp_path)
    assert 'checkpoint.th' in str(err.value) and 'checkpoint_1.th' in str(err.value)


def test_load_newest_intact_returns_none_for_a_folder_without_checkpoints(tmp_path: Path):
    (tmp_path / 'history.json').write_text('[]')
    assert recovery.load_newest_intact(tmp_path) is None


# -- retention on files (the one decision: `policy.Retention`, applied by `manager.prune`) --------

def keep_last(n: int | None, save_every: int = 1) -> policy.Retention:
    return policy.retention_from_config(CheckpointConfig(save_every=save_every, keep_last=n))


def test_prune_keeps_the_newest_epochs_by_number_and_deletes_the_rest(tmp_path: Path):
    write_epochs(tmp_path, *range(1, 13))
    removed = manager.prune(tmp_path, keep_last(2)).removed
    assert sorted(p.name for p in removed) == sorted(f'checkpoint_{i}.th' for i in range(1, 11))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint_11.th', 'checkpoint_12.th']


def test_prune_without_keep_last_deletes_nothing(tmp_path: Path):
    write_epochs(tmp_path, 1, 2, 3)
    assert manager.prune(tmp_path, keep_last(None)).removed == []
    assert len(os.listdir(tmp_path)) == 3


def test_prune_leaves_the_latest_checkpoint_alone(tmp_path: Path):
    write_epochs(tmp_path, 1, 2)
    envelope.write_checkpoint(tmp_path / 'checkpoint.th', {}, {})
    manager.prune(tmp_path, keep_last(1))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.th', 'checkpoint_2.th']


def test_a_dry_run_prune_deletes_nothing_and_says_why_each_file_stays(tmp_path: Path):
    write_epochs(tmp_path, 1, 2, 3)
    pruned = manager.prune(tmp_path, keep_last(2), apply=False)
    assert [p.name for p in pruned.removed] == ['checkpoint_1.th'] and len(os.listdir(tmp_path)) == 3
    assert {p.name: why for p, why in pruned.kept.items()} == {'checkpoint_3.th': 'newest',
                                                             'checkpoint_2.th': 'among the newest 2'}
