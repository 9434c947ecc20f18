"""The checkpoint writer (solver/writer.py): async saves write what a sync save writes, the loop is
blocked only for the snapshot, one save at a time, errors are never lost, and staging buffers made
by `prepare` are the ones every save reuses.

A slow disk is a patched `envelope.write_checkpoint` that waits on an Event: what these tests
check never depends on how fast this machine is.
"""

from __future__ import annotations

import contextlib
import threading
import typing as tp
from pathlib import Path

import pytest
import torch
from torch import nn

from solver.checkpointing import envelope, faults, tree
from solver.checkpointing.writer import CheckpointWriter, SaveMode

META = {'epoch': 3, 'step': 30, 'config': {'optim': {'lr': 0.1}}}


def live_state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 16)).sum().backward()
    optimizer.step()
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'history': [{'train': {'loss': 1.5}}], 'progress': {'step': 30}}


class SlowDisk:
    """`envelope.write_checkpoint` that holds every write until `release` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, error: Exception | None = None) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls: list[Path] = []
        self.error = error
        self._write = envelope.write_checkpoint
        monkeypatch.setattr(envelope, 'write_checkpoint', self)

    def __call__(self, path: Path, state: dict, meta: dict, **kwargs: tp.Any) -> None:
        self.calls.append(path)
        self.entered.release()
        assert self.release.wait(timeout=60), "the test never released the write"
        if self.error is not None:
            raise self.error
        self._write(path, state, meta, **kwargs)


def test_an_async_save_writes_the_same_checkpoint_as_a_sync_save(tmp_path: Path, assert_same):
    state = live_state()
    for mode in SaveMode:
        with contextlib.closing(CheckpointWriter(mode)) as writer:
            writer.prepare(state)
            writer.save(state, {tmp_path / f'{mode.value}.th': None}, META)
    sync = torch.load(tmp_path / 'sync.th', weights_only=True)
    async_ = torch.load(tmp_path / 'async.th', weights_only=True)
    assert_same(async_, sync)
    assert envelope.read_checkpoint(tmp_path / 'async.th').meta == META


def test_the_loop_is_blocked_for_the_snapshot_only_not_for_the_write(tmp_path: Path, monkeypatch):
    disk = SlowDisk(monkeypatch)
    state = live_state()
    expected = {name: t.clone() for name, t in state['model'].items()}
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(state, {tmp_path / 'checkpoint.th': None}, META)  # returns while the write is held
    assert disk.entered.acquire(timeout=60) and not (tmp_path / 'checkpoint.th').exists()
    with torch.no_grad():  # training goes on: the file must hold the state as it was at save()
        for tensor in state['model'].values():
            tensor.add_(1.0)
    disk.release.set()
    writer.close()
    saved = envelope.read_checkpoint(tmp_path / 'checkpoint.th').state['model']
    assert all(torch.equal(saved[name], expected[name]) for name in expected)


def test_a_save_waits_for_the_one_in_flight(tmp_path: Path, monkeypatch):
    disk = SlowDisk(monkeypatch)
    state = live_state()
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(state, {tmp_path / 'a.th': None}, META)
    assert disk.entered.acquire(timeout=60)
    second = threading.Thread(target=writer.save, args=(state, {tmp_path / 'b.th': None}, META))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() and disk.calls == [tmp_path / 'a.th']  # waiting, not writing
    disk.release.set()
    second.join(timeout=60)
    writer.close()
    assert disk.calls == [tmp_path / 'a.th', tmp_path / 'b.th']
    assert envelope.read_checkpoint(tmp_path / 'b.th').meta == META


@pytest.mark.parametrize('surfaced_by', ['save', 'wait', 'close'])
def test_a_background_error_is_raised_by_the_next_call(tmp_path: Path, monkeypatch, surfaced_by):
    disk = SlowDisk(monkeypatch, error=faults.CheckpointError('Could not write checkpoint: disk on fire'))
    disk.release.set()
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(live_state(), {tmp_path / 'a.th': None}, META)  # the error happens in the background
    with pytest.raises(faults.CheckpointError, match='disk on fire'):
        if surfaced_by == 'save':
            writer.save(live_state(), {tmp_path / 'b.th': None}, META)
        elif surfaced_by == 'wait':
            writer.wait()
        else:
            writer.close()
    if surfaced_by != 'close':
        writer.close()  # raised once: nothing left pending


def test_the_first_save_after_prepare_reuses_the_prepared_buffers(tmp_path: Path):
    state = live_state()
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.prepare(state)
    prepared = list(writer.staging.buffers)
    pointers = [b.data_ptr() for b in prepared]
    assert writer.staging.nbytes == sum(t.numel() * t.element_size() for t in tensors_of(state))
    for name in ('a.th', 'b.th'):
        writer.save(state, {tmp_path / name: None}, META)
        writer.wait()
        assert [id(b) for b in writer.staging.buffers] == [id(b) for b in prepared]
        assert [b.data_ptr() for b in writer.staging.buffers] == pointers
    writer.close()


def test_a_sync_writer_stages_nothing(tmp_path: Path):
    writer = CheckpointWriter(SaveMode.SYNC)
    writer.prepare(live_state())
    writer.save(live_state(), {tmp_path / 'a.th': None}, META)
    writer.close()
    assert writer.staging.buffers == []


# -- helpers --------------------------------------------------------------------------------------

def tensors_of(state: dict) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree.skeleton(state, found)
    return found




def test_raise_if_failed_does_not_wait_for_a_save_in_flight(tmp_path: Path, monkeypatch):
    disk = SlowDisk(monkeypatch)
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(live_state(), {tmp_path / 'a.th': None}, META)
    assert disk.entered.acquire(timeout=60)
    writer.raise_if_failed()  # the write is held: returns at once, raises nothing
    disk.release.set()
    writer.close()
    envelope.read_checkpoint(tmp_path / 'a.th')


_FSIZE_SCRIPT = '''
import resource, signal, sys, time, torch
from pathlib import Path
from solver.checkpointing.writer import CheckpointWriter, SaveMode
from solver.checkpointing.faults import CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
target = Path(sys.argv[1])
writer = CheckpointWriter(SaveMode.ASYNC)
called = []
writer.listeners.append(called.append)
writer.save({'w': torch.zeros(1 << 16)}, {target: None}, {'epoch': 1})
for step in range(100000):
    try:
        writer.raise_if_failed()
    except CheckpointError as err:
        print('raised:', err)
        break
    time.sleep(0.001)
writer.close()  # raised once: nothing left
print('listeners called:', called, 'file exists:', target.exists())
'''


def test_a_save_past_a_real_file_size_limit_is_raised_by_raise_if_failed_and_not_recorded(tmp_path: Path):
    import subprocess
    import sys
    target = tmp_path / 'checkpoint.th'
    proc = subprocess.run([sys.executable, '-c', _FSIZE_SCRIPT, str(target)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert f"raised: Could not write checkpoint {target}: File too large" in proc.stdout
    assert 'listeners called: [] file exists: False' in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on a lent one)")
def test_gpu_tensors_are_staged_into_pinned_memory_after_the_work_queued_before_the_save(tmp_path: Path):
    model = nn.Linear(512, 512).cuda()
    state = {'model': model.state_dict(), 'step': torch.tensor(3)}
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.prepare(state)
    with torch.no_grad():
        for _ in range(50):  # queued, likely not done when the save starts: the copy must wait for it
            model.weight.mul_(1.01)
    expected = model.weight.detach().cpu()
    writer.save(state, {tmp_path / 'a.th': None}, META)
    with torch.no_grad():
        model.weight.zero_()  # after the save returned: not in the checkpoint
    writer.close()
    gpu_buffers = [b for b in writer.staging.buffers if b.shape == model.weight.shape]
    assert gpu_buffers and all(b.is_pinned() for b in gpu_buffers)
    assert not writer.staging.buffers[-1].is_pinned()  # the CPU step count: page-aligned, not pinned
    loaded = envelope.read_checkpoint(tmp_path / 'a.th')
    assert torch.equal(loaded.state['model']['weight'], expected)
