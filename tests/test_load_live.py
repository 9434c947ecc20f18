"""Loading into the live state (issue 16): `read_checkpoint(into=...)` reads tensor bytes straight
into the registered tensors, verifies them before returning, and never leaves a live state made
of two checkpoints; O_DIRECT writes and reads give the same bytes; a torch whose private APIs do
not work falls back to torch.save / torch.load.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import damage_a_tensor
from torch import nn

from solver.best_state import BestState
from solver.checkpointing import archive, directio, envelope, faults, naming, recovery, tree

ROOT = Path(__file__).resolve().parents[1]
META = {'epoch': 1}


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model and its Adam optimizer after one step (moments exist)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict()}


def addresses(state: dict) -> list[int]:
    found: list[torch.Tensor] = []
    tree.skeleton(state, found)
    return [t.data_ptr() for t in found]



def test_a_load_into_the_live_state_reads_into_the_live_tensors(tmp_path: Path, assert_same):
    saved = state_of(*trained(0))
    envelope.write_checkpoint(tmp_path / 'a.th', saved, META)
    model, optimizer = trained(1)
    live = state_of(model, optimizer)
    before = addresses(live)
    ckpt = envelope.read_checkpoint(tmp_path / 'a.th', into=live)
    assert addresses(ckpt.state) == before  # the loaded tensors are the live memory
    assert len(ckpt.live) == len(before)
    assert_same(ckpt.state, saved)
    model.load_state_dict(ckpt.state['model'])
    optimizer.load_state_dict(ckpt.state['optimizer'])
    assert addresses(state_of(model, optimizer)) == before  # loading moved nothing
    assert_same(state_of(model, optimizer), saved)


def test_tensors_that_do_not_fit_are_loaded_apart_and_the_live_ones_keep_their_values(tmp_path: Path):
    envelope.write_checkpoint(tmp_path / 'a.th', {'w': torch.ones(3, 4), 'b': torch.ones(4)}, META)
    live = {'w': torch.zeros(4, 3), 'b': torch.zeros(4, dtype=torch.float64)}
    ckpt = envelope.read_checkpoint(tmp_path / 'a.th', into=live)
    assert ckpt.live == []
    assert torch.equal(ckpt.state['w'], torch.ones(3, 4)) and torch.equal(live['w'], torch.zeros(4, 3))
    assert torch.equal(live['b'], torch.zeros(4, dtype=torch.float64))


def test_views_sharing_a_storage_are_never_read_into_the_live_state(tmp_path: Path):
    base = torch.arange(12.0)
    envelope.write_checkpoint(tmp_path / 'a.th', {'all': base, 'half': base[:6]}, META)
    live = {'all': torch.zeros(12), 'half': torch.zeros(6)}
    ckpt = envelope.read_checkpoint(tmp_path / 'a.th', into=live)
    assert ckpt.live == [] and torch.equal(ckpt.state['half'], torch.arange(6.0))


def test_a_damaged_tensor_read_into_the_live_state_raises_naming_the_live_tensors(tmp_path: Path):
    envelope.write_checkpoint(tmp_path / 'a.th', state_of(*trained(0)), META)
    damage_a_tensor(tmp_path / 'a.th')
    live = state_of(*trained(1))
    with pytest.raises(faults.DamagedIntoLiveError, match='do not match their digests') as caught:
        envelope.read_checkpoint(tmp_path / 'a.th', into=live)
    assert {t.data_ptr() for t in caught.value.live} == set(addresses(live))


def test_a_damaged_latest_is_replaced_by_an_epoch_file_that_covers_every_live_tensor(tmp_path: Path, assert_same):
    epoch = state_of(*trained(0))
    envelope.write_checkpoint(naming.epoch_checkpoint_path(tmp_path, 1), epoch, META)
    envelope.write_checkpoint(tmp_path / naming.LATEST, state_of(*trained(2)), META)
    damage_a_tensor(tmp_path / naming.LATEST)
    live = state_of(*trained(1))
    found = recovery.load_newest_intact(tmp_path, into=live)
    assert found is not None and found.path.name == 'checkpoint_1.th'
    assert_same(live, epoch)


def test_a_damaged_latest_whose_fallback_leaves_live_tensors_stale_stops_the_run(tmp_path: Path):
    model, optimizer = trained(0)
    envelope.write_checkpoint(naming.epoch_checkpoint_path(tmp_path, 1), {'model': model.state_dict()}, META)
    envelope.write_checkpoint(tmp_path / naming.LATEST, state_of(model, optimizer), META)
    damage_a_tensor(tmp_path / naming.LATEST)
    with pytest.raises(faults.CheckpointError, match='stopping rather than training on a mixed state'):
        recovery.load_newest_intact(tmp_path, into=state_of(*trained(1)))


def test_a_best_state_load_copies_into_the_tensors_it_holds():
    model = nn.Linear(3, 2)
    best = BestState()
    best.register('model', model)
    held = best.states['model']['weight']
    best.load_state_dict({'metric': 1.0, 'states': {'model': {'weight': torch.ones(2, 3), 'bias': torch.ones(2)}}})
    assert best.states['model']['weight'] is held and torch.equal(held, torch.ones(2, 3))


@pytest.mark.parametrize('size', [0, 1, 4095, 4096, 3 * 4096 + 17, 50_000, (1 << 20) + 5])
def test_direct_io_writes_and_reads_what_buffered_io_does(tmp_path: Path, monkeypatch, size: int):
    # A bounce buffer of 3 blocks: every chunking boundary is crossed by small tensors. The
    # page-aligned tensor (as the async writer's staging buffers are) is written without a copy.
    monkeypatch.setattr(archive, '_write_bounces', [directio.Bounce(3 * directio.DIRECT_ALIGN) for _ in range(2)])
    monkeypatch.setattr(archive, '_read_bounces', [directio.Bounce(3 * directio.DIRECT_ALIGN) for _ in range(2)])
    aligned = directio.aligned_empty((size // 4, 2), torch.int16)
    aligned.copy_(torch.randint(-999, 999, aligned.shape, dtype=torch.int16))
    state = {'a': torch.randint(0, 255, (size,), dtype=torch.uint8), 'b': torch.randn(7, 3), 'c': [1, 'x'],
             'aligned': aligned}
    for direct in (True, False):
        with open(tmp_path / f'{direct}.th', 'wb') as f:
            archive.save(state, f, direct=direct)
    live = {'a': torch.zeros(size, dtype=torch.uint8), 'b': torch.zeros(7, 3)}
    loaded, reading = archive.load(tmp_path / 'True.th', lambda obj: envelope._live_pairs(obj, live),
                                   direct=True)
    reading.wait()
    reading.close()
    buffered = torch.load(tmp_path / 'False.th', weights_only=True)
    for other in (loaded, torch.load(tmp_path / 'True.th', weights_only=True), buffered):
        assert all(torch.equal(other[k], state[k]) for k in ('a', 'b', 'aligned')) and other['c'] == [1, 'x']
    assert torch.equal(live['b'], state['b']) and loaded['b'].data_ptr() == live['b'].data_ptr()


def test_archive_load_reads_from_an_open_file_and_leaves_it_open(tmp_path: Path):
    with open(tmp_path / 'a.th', 'wb') as f:
        archive.save({'a': torch.arange(5)}, f)
    with open(tmp_path / 'a.th', 'rb') as f:
        loaded, reading = archive.load(f)
        reading.wait()
        reading.close()
        assert not f.closed and torch.equal(loaded['a'], torch.arange(5))


def test_the_private_torch_apis_pass_the_round_trip_on_this_torch():
    assert archive.check() is None and archive.AVAILABLE


def test_a_broken_private_api_is_reported_by_the_round_trip(monkeypatch):
    def broken(*args: object) -> None:
        raise TypeError("PyTorchFileWriter() takes no such arguments")
    monkeypatch.setattr(torch._C, 'PyTorchFileWriter', broken)
    assert 'PyTorchFileWriter' in str(archive.check())


@pytest.mark.integration
def test_a_torch_without_the_private_apis_warns_once_and_checkpoints_with_torch_save(tmp_path: Path):
    script = (
        "import torch, warnings\n"
        "del torch._C.PyTorchFileReader.get_record_offset\n"  # what a future torch might do
        "from solver.checkpointing import archive, envelope\n"
        "assert not archive.AVAILABLE\n"
        f"path = {str(tmp_path / 'a.th')!r}\n"
        "envelope.write_checkpoint(path, {'w': torch.arange(4.0)}, {'epoch': 1})\n"
        "live = {'w': torch.zeros(4)}\n"
        "ckpt = envelope.read_checkpoint(path, into=live)\n"
        "assert torch.equal(ckpt.state['w'], torch.arange(4.0)) and ckpt.live == []\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'ok'
    warnings = [line for line in proc.stderr.splitlines() if 'RuntimeWarning' in line]
    assert len(warnings) == 1 and 'torch.save' in warnings[0] and 'get_record_offset' in warnings[0]


@pytest.mark.integration
def test_a_resumed_dora_run_reads_every_tensor_into_the_live_state(dora, dora_dir: Path):
    from solver.train import main
    overrides = ('solver=regression', 'optim.epochs=2', 'checkpoint.save_every=1')
    code, output = dora('run', *overrides)
    assert code == 0, output
    folder = dora_dir / 'xps' / main.get_xp(list(overrides)).sig
    shutil.copyfile(folder / 'checkpoint_1.th', folder / 'checkpoint.th')  # back to the end of epoch 1
    (folder / 'checkpoint_2.th').unlink()
    state = envelope.read_checkpoint(folder / 'checkpoint.th').state
    tensors: list[torch.Tensor] = []
    tree.skeleton({k: v for k, v in state.items() if k != 'optimizer'}, tensors)
    code, output = dora('run', *overrides)
    assert code == 0, output
    found = re.search(r'Resumed from .*\(epoch 1, .*\)\. (\d+) tensors read straight into the live state', output)
    assert found, output
    # Parameters, best state... are read in place; a fresh process has no Adam moments yet (they
    # are made by the read, and taken by the optimizer without a copy); the RNG states are made
    # anew by each state_dict() call, and count or not.
    assert len(tensors) - 3 <= int(found.group(1)) <= len(tensors)


def _direct_pwrite_failing(monkeypatch, errno_code: int, after: int) -> list[int]:
    """os.pwrite as archive calls it, failing with `errno_code` on O_DIRECT descriptors once
    `after` direct writes went through; the count of direct writes tried."""
    real, tried = os.pwrite, [0]

    def pwrite(fd: int, data, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            tried[0] += 1
            if tried[0] > after:
                raise OSError(errno_code, os.strerror(errno_code))
        return real(fd, data, offset)
    monkeypatch.setattr(archive.os, 'pwrite', pwrite)
    return tried


@pytest.mark.parametrize('after', [0, 1, 3])
def test_a_direct_write_refused_midway_goes_on_buffered_and_the_file_is_whole(tmp_path: Path, monkeypatch,
                                                                               after: int):
    monkeypatch.setattr(archive, '_write_bounces', [directio.Bounce(2 * directio.DIRECT_ALIGN) for _ in range(2)])
    tried = _direct_pwrite_failing(monkeypatch, errno.EINVAL, after)
    aligned = directio.aligned_empty((5000,), torch.float32)
    aligned.copy_(torch.randn(5000))
    state = {'a': torch.randn(10_000), 'aligned': aligned, 'b': torch.arange(3)}
    with open(tmp_path / 'a.th', 'wb') as f:
        archive.save(state, f, direct=True)
    loaded = torch.load(tmp_path / 'a.th', weights_only=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state) and tried[0] == after + 1


def test_a_failing_direct_write_on_the_writing_thread_raises_and_leaves_no_thread(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(archive, '_write_bounces', [directio.Bounce(2 * directio.DIRECT_ALIGN) for _ in range(2)])
    _direct_pwrite_failing(monkeypatch, errno.ENOSPC, 2)
    threads = threading.active_count()
    with open(tmp_path / 'a.th', 'wb') as f, pytest.raises(OSError, match='No space'):
        archive.save({'a': torch.randn(50_000)}, f, direct=True)
    assert threading.active_count() == threads
    # the bounce buffers are free again: the next save goes through
    monkeypatch.undo()
    with open(tmp_path / 'b.th', 'wb') as f:
        archive.save({'a': torch.ones(3)}, f, direct=True)
    assert torch.equal(torch.load(tmp_path / 'b.th', weights_only=True)['a'], torch.ones(3))
