"""Across world sizes, with real ranks (CPU, gloo): the exact stream of training samples when a
run checkpointed mid-epoch at 2 ranks resumes at 1 or 4 (DDP and FSDP), a world size that does
not divide the global batch, FSDP at 8 ranks, a worker SIGKILLed (or hung) inside a sharded save
of a two-node torchrun job; and the writer's staging bound (`checkpoint.staging_max_mb`).

Every rank of the test solver (`faulty_solver.py`) appends the dataset indices of each training batch it takes
to `$SOLVER_RECORD_SAMPLES/rank<N>.jsonl`; the global batch is rebuilt from the ranks' slices
(rank r holds items r, r + N, r + 2N... of it, `ResumableBatchSampler`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing as tp
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import DORA, FAULTY, free_port

from solver.checkpointing import envelope, recovery
from solver.checkpointing.writer import CheckpointWriter, SaveMode

RUN = (*FAULTY, 'optim.epochs=2')                       # 2 epochs of 16 global batches of 32
STOPPED = (*RUN, '+faults.sigterm_batches=[20]')         # SIGTERM in step 5 of epoch 2: saved, left
FSDP = ('fsdp.use=true',)


def dora_run(dora_tools: tp.Any, dora_dir: Path, records: Path, overrides: tp.Sequence[str],
             ranks: int = 1) -> tuple[int, str]:
    """`dora run` on `ranks` processes, recording the samples of every rank under `records`."""
    records.mkdir(parents=True, exist_ok=True)
    workers = ('-d', '--ddp_workers', str(ranks)) if ranks > 1 else ()
    proc = subprocess.run([*DORA, 'run', *workers, *overrides], cwd=dora_tools.root,
                          env={**dora_tools.env(dora_dir), 'SOLVER_RECORD_SAMPLES': str(records)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return proc.returncode, proc.stdout


def global_stream(records: Path) -> list[list[int]]:
    """The global batches of a run, in order, rebuilt from every rank's record; fails if a rank
    saw a position of the stream twice or a position misses a rank's slice."""
    positions: dict[int, dict[int, list[int]]] = {}
    sizes: dict[int, int] = {}
    for file in records.glob('rank*.jsonl'):
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            ranks = positions.setdefault(entry['batch'], {})
            assert entry['rank'] not in ranks, f"rank {entry['rank']} took batch {entry['batch']} twice"
            ranks[entry['rank']] = entry['samples']
            assert sizes.setdefault(entry['batch'], entry['world_size']) == entry['world_size']
    assert sorted(positions) == list(range(len(positions))), 'a position of the stream was skipped'
    stream = []
    for batch in range(len(positions)):
        slices = positions[batch]
        assert sorted(slices) == list(range(sizes[batch])), f"batch {batch}: ranks {sorted(slices)}"
        merged = [0] * sum(len(s) for s in slices.values())
        for rank, samples in slices.items():
            merged[rank::sizes[batch]] = samples
        stream.append(merged)
    return stream


def world_sizes(records: Path) -> set[int]:
    return {json.loads(line)['world_size'] for f in records.glob('rank*.jsonl') for line in f.read_text().splitlines()}


def losses(folder: Path) -> list[float]:
    entries = json.loads((folder / 'history.json').read_text())
    return [entry[stage]['loss'] for entry in entries for stage in ('train', 'valid')]


@pytest.fixture(scope='module')
def reference(dora_tools, tmp_path_factory) -> SimpleNamespace:
    """One uninterrupted single-process run."""
    root = tmp_path_factory.mktemp('reference')
    code, output = dora_run(dora_tools, root / 'dora', root / 'records', RUN)
    assert code == 0, output
    stream = global_stream(root / 'records')
    assert len(stream) == 32 and all(len(batch) == 32 for batch in stream)
    assert sorted(sum(stream[:16], [])) == list(range(512))  # an epoch is one pass over the data
    return SimpleNamespace(stream=stream, folder=dora_tools.folder(root / 'dora', *RUN))


@pytest.fixture(scope='module', params=['ddp', 'fsdp'])
def stopped(request, dora_tools, tmp_path_factory) -> SimpleNamespace:
    """A 2-rank run stopped by SIGTERM in the middle of epoch 2 (it saves at that step, leaves)."""
    overrides = (*STOPPED, *FSDP) if request.param == 'fsdp' else STOPPED
    root = tmp_path_factory.mktemp(f'stopped_{request.param}')
    code, output = dora_run(dora_tools, root / 'dora', root / 'records', overrides, ranks=2)
    assert code != 0 and 'Stopped by SIGTERM after saving' in output, output
    return SimpleNamespace(root=root, overrides=overrides, mode=request.param)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize('ranks', [1, 4])
def test_a_run_stopped_mid_epoch_at_2_ranks_resumes_at_another_world_size_on_the_same_samples(
        stopped, ranks, reference, dora_tools, tmp_path):
    shutil.copytree(stopped.root, tmp_path / 'run', symlinks=True)
    dora_dir, records = tmp_path / 'run' / 'dora', tmp_path / 'run' / 'records'
    code, output = dora_run(dora_tools, dora_dir, records, stopped.overrides, ranks=ranks)
    assert code == 0, output
    assert 'Resuming the train stage at step 5 of 16.' in output
    assert world_sizes(records) == {2, ranks}
    assert global_stream(records) == reference.stream  # no sample repeated, skipped or reordered
    # Same data, same global batch: the same training up to the order of floating-point sums.
    assert losses(dora_tools.folder(dora_dir, *stopped.overrides)) == pytest.approx(losses(reference.folder), rel=1e-4)


@pytest.mark.integration
def test_a_world_size_that_does_not_divide_the_global_batch_is_refused_in_one_line(dora_tools, tmp_path):
    code, output = dora_run(dora_tools, tmp_path / 'dora', tmp_path / 'records', RUN, ranks=3)
    assert code == 1
    assert ('dataset.batch_size (32) must be divisible by the number of ranks (3): it is the global '
            'batch, split across ranks.') in output
    assert 'Traceback' not in output


@pytest.mark.integration
@pytest.mark.slow
def test_fsdp_at_8_ranks_trains_on_the_single_process_stream_and_writes_8_shard_files(
        reference, dora_tools, tmp_path):
    overrides = (*RUN, *FSDP)
    code, output = dora_run(dora_tools, tmp_path / 'dora', tmp_path / 'records', overrides, ranks=8)
    assert code == 0, output
    assert 'Distributed: rank 0 of 8' in output
    assert global_stream(tmp_path / 'records') == reference.stream
    folder = dora_tools.folder(tmp_path / 'dora', *overrides)
    shards = next(folder.glob('checkpoint.th.dcp.*'))
    assert sorted(p.name for p in shards.iterdir()) == ['.metadata', *(f'__{r}_0.distcp' for r in range(8))]
    assert losses(folder) == pytest.approx(losses(reference.folder), rel=1e-4)
    model = envelope.read_checkpoint(folder / 'checkpoint.th').state['model']  # in one process
    assert model['0.weight'].shape == (32, 8) and model['2.weight'].shape == (1, 32)


# -- bounded staging memory ------------------------------------------------------------------------

def test_an_async_save_over_staging_max_mb_is_written_by_the_caller_without_staging(tmp_path, assert_same):
    state = {'model': {f'w{i}': torch.rand(2**18) for i in range(4)}, 'step': 3}  # 4 MB
    with contextlib.closing(CheckpointWriter(SaveMode.ASYNC, staging_max_mb=3)) as writer:
        writer.prepare(state)
        assert writer.staging.nbytes == 0
        writer.save(state, {tmp_path / 'big.th': None}, {'epoch': 1})
        assert writer._pending is None and writer.staging.nbytes == 0  # durable when save returns
        assert_same(envelope.read_checkpoint(tmp_path / 'big.th').state, state)
        small = {'model': {'w0': state['model']['w0']}}  # 1 MB: within the bound, staged
        writer.save(small, {tmp_path / 'small.th': None}, {'epoch': 2})
        assert writer.staging.nbytes == 2**20
    assert_same(envelope.read_checkpoint(tmp_path / 'small.th').state, small)


# -- a rank killed inside a sharded save of a two-node torchrun job -----------------------------------

# ~34 MB of FSDP state, one update per epoch and a save after each: saves long enough to be killed in.
BIG_FSDP = ('solver=regression', 'fsdp.use=true', 'model.hidden_size=2048', 'dataset.dim=1024',
            'optim.updates_per_epoch=1', 'dataset.eval_size=32', 'optim.epochs=20',
            'distributed.timeout_minutes=0.5')



def workers_of(agent: int) -> list[int]:
    """The worker processes a torchrun agent started."""
    return [int(pid) for task in Path(f'/proc/{agent}/task').iterdir()
            for pid in (task / 'children').read_text().split()]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.connect(('127.0.0.1', port))
            return
        assert proc.poll() is None and time.monotonic() < deadline, 'the first node never opened its store'
        time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize('killed', ['store host', 'other node', 'other node hangs'])
def test_a_node_killed_inside_a_sharded_save_stops_the_other_and_leaves_the_previous_checkpoint(
        killed, dora_tools, tmp_path):
    """Two torchrun agents rendezvous over c10d on loopback, one worker each; node 0 starts first
    and so hosts the rendezvous store. A worker is SIGKILLed (or, 'hangs', SIGSTOPped: its sockets
    stay open, so only the collective timeout can stop the other) while its shards are written."""
    dora_dir = tmp_path / 'dora'
    dora_dir.mkdir()
    folder = dora_tools.folder(dora_dir, *BIG_FSDP)
    port = free_port()
    command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
               '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', 'two-nodes',
               '--max-restarts', '0', '-m', 'dora', 'run', *BIG_FSDP]
    logs = [tmp_path / f'node{n}.log' for n in range(2)]
    nodes: list[subprocess.Popen] = []
    try:
        for log in logs:
            with open(log, 'w') as out:
                nodes.append(subprocess.Popen(command, cwd=dora_tools.root, env=dora_tools.env(dora_dir),
                                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            if len(nodes) == 1:
                wait_for_port(port, nodes[0])
        deadline = time.monotonic() + 240
        while not ((folder / 'checkpoint.th').exists() and list(folder.glob('.checkpoint.th.dcp.tmp.*'))):
            assert all(n.poll() is None for n in nodes), '\n'.join(log.read_text() for log in logs)
            assert time.monotonic() < deadline, '\n'.join(log.read_text() for log in logs)
            time.sleep(0.002)
        in_flight = {p.name.rsplit('.', 1)[1] for p in folder.glob('.checkpoint.th.dcp.tmp.*')}
        victim = 0 if killed == 'store host' else 1
        [worker] = workers_of(nodes[victim].pid)
        os.kill(worker, signal.SIGSTOP if killed.endswith('hangs') else signal.SIGKILL)
        killed_at = time.monotonic()
        survivor = nodes[1 - victim]
        code = survivor.wait(timeout=180)
        stopped_after = time.monotonic() - killed_at
        if not killed.endswith('hangs'):
            nodes[victim].wait(timeout=60)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    output = logs[1 - victim].read_text()
    print(f"\n{killed}: the other node stopped {stopped_after:.1f}s later, exit code {code}")  # shown by -s
    assert code != 0, output
    assert stopped_after < 60 * 0.5 + 30, output  # distributed.timeout_minutes, plus slack for a busy machine
    named = ('Connection closed by peer', 'Connection reset by peer', 'connection to the C10d store has failed',
             'Timed out')
    assert any(text in output for text in named), output
    # The save in flight never became a checkpoint; the previous one is complete and verified.
    recovery.clean_stray_files(folder)
    latest = recovery.load_newest_intact(folder)
    assert latest is not None and latest.path == folder / 'checkpoint.th'
    assert latest.meta['epoch'] >= 1 and latest.state['model']['0.weight'].shape == (2048, 1024)
    [shards] = folder.glob('checkpoint.th.dcp.*')
    assert shards.name.rsplit('.', 1)[1] not in in_flight
