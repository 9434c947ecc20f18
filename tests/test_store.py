"""Incremental checkpoints (solver/checkpointing/store.py): equal bytes stored once, read back
transparently and verified, collected only when unreferenced and under the experiment lock, a
kill -9 at any moment harmless; one store for the experiments of a Dora folder (saves and
rollbacks against collections, two experiments edited at once); and the writer's staged copy,
used by rollbacks from memory.

The runs of the whole solver in this mode are in test_reliability.py (kill -9 loop, damaged files).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import xxhash
from helpers import FAULTY, REGRESSION, SOLVER, run_xp

from solver.checkpointing import blobs, envelope, faults, naming, recovery, store
from solver.checkpointing.lock import ExperimentLock
from solver.checkpointing.store import IncrementalStore
from solver.checkpointing.writer import CheckpointWriter, SaveMode

ROOT = Path(__file__).resolve().parents[1]
META = {'epoch': 1, 'step': 10}


def make_state(seed: int = 0) -> dict:
    """A model (two big tensors, one small), its best state equal to it, an optimizer-like state."""
    generator = torch.Generator().manual_seed(seed)
    model = {'w': torch.randn(64, 64, generator=generator), 'v': torch.randn(32, 32, generator=generator),
             'b': torch.randn(4, generator=generator)}
    return {'model': model, 'best_state': {'states': {'model': {k: t.clone() for k, t in model.items()}}},
            'optimizer': {'exp_avg': torch.randn(64, 64, generator=generator), 'step': 3},
            'history': [{'train': {'loss': 1.0}}]}


def blob_names(folder: Path) -> set[str]:
    """The blobs of the store `<folder>/blobs`."""
    return {p.name for p in (folder / blobs.BLOBS).iterdir() if blobs.KEY.match(p.name)}


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_incremental_checkpoint_reads_back_identical_through_read_checkpoint(tmp_path, assert_same):
    state = make_state()
    IncrementalStore(tmp_path).write(tmp_path / 'checkpoint.th', state, META)
    ckpt = envelope.read_checkpoint(tmp_path / 'checkpoint.th')
    assert_same(ckpt.state, state)
    assert ckpt.meta == META


def test_equal_tensors_are_stored_once_across_states_and_files(tmp_path):
    state, incremental = make_state(), IncrementalStore(tmp_path)
    incremental.write(tmp_path / 'checkpoint.th', state, META)
    first = incremental.last
    incremental.write(tmp_path / 'checkpoint_1.th', state, META)
    second = incremental.last
    big = 64 * 64 * 4
    # w, v and exp_avg once; the best state's copies of w and v, and all of the second file, reused
    assert (first.written, first.reused) == (2 * big + 32 * 32 * 4, big + 32 * 32 * 4)
    assert (second.written, second.reused) == (0, first.written + first.reused)
    assert len(blob_names(tmp_path)) == 3 and incremental.nbytes() == first.written


def test_the_next_save_writes_only_the_tensors_that_changed(tmp_path):
    state, incremental = make_state(), IncrementalStore(tmp_path)
    incremental.write(tmp_path / 'checkpoint.th', state, META)
    state['model']['w'] += 1  # the live model moved on; the best state (and v) did not
    incremental.write(tmp_path / 'checkpoint.th', state, META)
    assert incremental.last.written == 64 * 64 * 4
    assert len(blob_names(tmp_path)) == 4


def test_small_tensors_stay_in_the_checkpoint_file(tmp_path):
    IncrementalStore(tmp_path).write(tmp_path / 'checkpoint.th', make_state(), META)
    sizes = {int(name.rpartition('-')[2]) for name in blob_names(tmp_path)}
    assert min(sizes) >= store.INLINE_BYTES and 4 * 4 not in sizes


def test_the_blob_key_is_the_xxh3_128_of_the_bytes_and_their_length():
    tensor = torch.arange(1000, dtype=torch.float32)
    expected = xxhash.xxh3_128_hexdigest(tensor.numpy().tobytes())
    assert blobs.blob_key(tensor) == f'{expected}-4000'
    assert blobs.blob_key(tensor.reshape(10, 100).t()) != blobs.blob_key(tensor)  # bytes as laid out


def test_a_damaged_blob_is_named_and_the_newest_intact_checkpoint_is_used(tmp_path, caplog):
    incremental = IncrementalStore(tmp_path)
    incremental.write(naming.epoch_checkpoint_path(tmp_path, 1), make_state(1), dict(META, epoch=1))
    before = blob_names(tmp_path)
    incremental.write(tmp_path / naming.LATEST, make_state(2), dict(META, epoch=2))
    damaged = tmp_path / blobs.BLOBS / sorted(blob_names(tmp_path) - before)[0]
    flip_byte(damaged)
    with pytest.raises(faults.CorruptCheckpointError, match=f'blob {damaged} does not match its digest'):
        envelope.read_checkpoint(tmp_path / naming.LATEST)
    found = recovery.load_newest_intact(tmp_path)
    assert found is not None and found.meta['epoch'] == 1
    assert f"Skipping damaged checkpoint: {tmp_path / naming.LATEST}" in caplog.text


def test_a_missing_blob_is_named(tmp_path):
    IncrementalStore(tmp_path).write(tmp_path / 'checkpoint.th', make_state(), META)
    blob = next((tmp_path / blobs.BLOBS).iterdir())
    blob.unlink()
    with pytest.raises(faults.CorruptCheckpointError, match=f'its blob {blob} is missing'):
        envelope.read_checkpoint(tmp_path / 'checkpoint.th')


def test_a_damaged_blob_found_on_disk_is_rewritten_not_reused(tmp_path):
    state = make_state()
    IncrementalStore(tmp_path).write(tmp_path / 'checkpoint_1.th', state, META)
    blob = next((tmp_path / blobs.BLOBS).iterdir())
    flip_byte(blob)
    incremental = IncrementalStore(tmp_path)  # as in a new process
    incremental.write(tmp_path / 'checkpoint.th', state, META)
    assert incremental.last.written == blob.stat().st_size
    envelope.read_checkpoint(tmp_path / 'checkpoint.th')
    envelope.read_checkpoint(tmp_path / 'checkpoint_1.th')  # repaired too


def test_collect_removes_only_blobs_no_checkpoint_references_including_moved_ones(tmp_path):
    incremental = IncrementalStore(tmp_path)
    incremental.write(naming.epoch_checkpoint_path(tmp_path, 1), make_state(1), META)
    incremental.write(naming.epoch_checkpoint_path(tmp_path, 2), make_state(2), META)
    incremental.write(naming.epoch_checkpoint_path(tmp_path, 3), make_state(3), META)
    moved = tmp_path / 'rolled_back' / '20260101-000000'
    moved.mkdir(parents=True)
    os.replace(naming.epoch_checkpoint_path(tmp_path, 2), moved / 'checkpoint_2.th')
    kept = store.referenced(tmp_path)
    naming.epoch_checkpoint_path(tmp_path, 3).unlink()
    with ExperimentLock(tmp_path):
        removed = incremental.collect()
    assert len(removed) == 3 and blob_names(tmp_path) == kept - set(removed)
    envelope.read_checkpoint(naming.epoch_checkpoint_path(tmp_path, 1))
    envelope.read_checkpoint(moved / 'checkpoint_2.th')


def test_collect_collects_nothing_while_a_checkpoint_file_cannot_be_read(tmp_path, caplog):
    incremental = IncrementalStore(tmp_path)
    incremental.write(tmp_path / 'checkpoint_1.th', make_state(1), META)
    incremental.write(tmp_path / 'checkpoint.th', make_state(2), META)
    (tmp_path / 'checkpoint_1.th').write_bytes(b'damaged')
    before = blob_names(tmp_path)
    assert incremental.collect() == []
    assert blob_names(tmp_path) == before
    assert f"{tmp_path / 'checkpoint_1.th'} cannot be read" in caplog.text


@pytest.mark.integration
def test_collect_refuses_while_another_process_holds_the_experiment_lock(tmp_path):
    incremental = IncrementalStore(tmp_path)
    incremental.write(tmp_path / 'checkpoint.th', make_state(1), META)
    (tmp_path / 'checkpoint.th').unlink()
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f"""
        import sys, time
        from solver.checkpointing.lock import ExperimentLock
        with ExperimentLock({str(tmp_path)!r}):
            print('locked', flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == 'locked'
        with pytest.raises(RuntimeError, match=f'pid {holder.pid}'):
            incremental.collect()
        assert len(blob_names(tmp_path)) == 3
    finally:
        holder.kill()
        holder.wait()
    assert len(incremental.collect()) == 3  # once it is free, collecting takes the lock itself


@pytest.mark.parametrize('ref', [('../../secret', 'torch.float32', (4,)),
                                 ('0' * 32 + '-16', 'torch.load', (4,)),
                                 ('0' * 32 + '-16', 'torch.float32', (1 << 40,))],
                         ids=['path outside', 'not a dtype', 'size not the blob size'])
def test_a_crafted_blob_reference_is_refused_before_anything_is_read(tmp_path, ref):
    (tmp_path / 'secret').write_bytes(bytes(16))
    (tmp_path / 'xp' / blobs.BLOBS).mkdir(parents=True)
    state = {'model': {'w': torch.zeros(4)}}
    content = {'meta': META, 'state': {'model': {'w': torch.empty(0)}}, 'blobs': {'refs': [ref]}}
    envelope._write_file(tmp_path / 'xp' / 'checkpoint.th', content,
                           digested=envelope.digests({'meta': META, 'state': state}))
    with pytest.raises(faults.CorruptCheckpointError, match='not a blob key'):
        envelope.read_checkpoint(tmp_path / 'xp' / 'checkpoint.th')


def test_consolidate_writes_a_self_contained_file(tmp_path, assert_same):
    state = make_state()
    IncrementalStore(tmp_path / 'xp').write(tmp_path / 'xp' / 'checkpoint.th', state, META)
    store.consolidate(tmp_path / 'xp' / 'checkpoint.th', tmp_path / 'export' / 'model.th')
    shutil.rmtree(tmp_path / 'xp')
    assert_same(envelope.read_checkpoint(tmp_path / 'export' / 'model.th').state, state)
    plain = torch.load(tmp_path / 'export' / 'model.th', weights_only=True)
    assert torch.equal(plain['state']['model']['w'], state['model']['w'])


def test_an_incremental_checkpoint_copied_without_its_blobs_says_to_consolidate(tmp_path):
    IncrementalStore(tmp_path / 'xp').write(tmp_path / 'xp' / 'checkpoint.th', make_state(), META)
    (tmp_path / 'elsewhere').mkdir()
    shutil.copy(tmp_path / 'xp' / 'checkpoint.th', tmp_path / 'elsewhere' / 'model.th')
    with pytest.raises(faults.CorruptCheckpointError, match='consolidate'):
        envelope.read_checkpoint(tmp_path / 'elsewhere' / 'model.th')


def test_a_sharded_state_is_refused_with_the_key_to_change(tmp_path, monkeypatch):
    monkeypatch.setattr(store.sharded, 'has_dtensors', lambda state: True)
    with pytest.raises(faults.CheckpointError, match='checkpoint.incremental=false'):
        IncrementalStore(tmp_path).write(tmp_path / 'checkpoint.th', make_state(), META)
    assert not (tmp_path / 'checkpoint.th').exists()


# -- kill -9 during saves and collections ---------------------------------------------------------

SAVER = """
import sys, random, torch
from pathlib import Path
from solver.checkpointing import envelope, faults, naming, recovery
from solver.checkpointing import manager, policy
from solver.checkpointing.config import CheckpointConfig
from solver.checkpointing.store import IncrementalStore
from solver.checkpointing.lock import ExperimentLock
folder = Path(sys.argv[1])
retention = policy.retention_from_config(CheckpointConfig(save_every=1, keep_last=2))
rng = random.Random(int(sys.argv[2]))
with ExperimentLock(folder):
    incremental = IncrementalStore(folder)
    frozen = torch.ones(256, 256)
    for epoch in range(1, 10**6):
        state = {'frozen': frozen, 'live': torch.full((256, 256), float(epoch)),
                 'moved': torch.randn(rng.randint(200, 300), 64)}
        incremental.write(folder / 'checkpoint.th', state, {'epoch': epoch})
        incremental.write(naming.epoch_checkpoint_path(folder, epoch), state, {'epoch': epoch})
        manager.prune(folder, retention)
        incremental.collect()
        print(epoch, flush=True)
"""


@pytest.mark.integration
def test_kill_9_at_random_moments_of_saves_and_collections_leaves_every_listed_checkpoint_loadable(tmp_path):
    rng = random.Random(7)
    epochs = []
    for life in range(12):
        proc = subprocess.Popen([sys.executable, '-c', SAVER, str(tmp_path), str(life)], cwd=ROOT,
                                stdout=subprocess.PIPE, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one save and one collection done in this life
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        listed = sorted(tmp_path.glob('checkpoint*.th'))
        assert listed
        for path in listed:
            envelope.read_checkpoint(path)  # raises, naming the file and the damage
        epochs.append(envelope.read_checkpoint(tmp_path / 'checkpoint.th').meta['epoch'])
        recovery.clean_stray_files(tmp_path)
    assert len(set(epochs)) > 1
    with ExperimentLock(tmp_path):
        IncrementalStore(tmp_path).collect()
    assert blob_names(tmp_path) == store.referenced(tmp_path)


# -- the writer's staged copy (rollback from memory) ----------------------------------------------

def test_the_staged_copy_of_the_last_save_is_a_private_copy_of_the_newest_checkpoint(tmp_path, assert_same):
    state = make_state()
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(state, {tmp_path / 'checkpoint.th': None, tmp_path / 'checkpoint_1.th': ['model']}, META)
    writer.wait()
    staged = writer.staged_checkpoint(tmp_path / 'checkpoint.th')
    assert staged is not None and staged.meta == META
    assert_same(staged.state, state)
    staged.state['model']['w'].zero_()  # loading it into live objects must not alias the buffers
    assert_same(writer.staging.snapshot(state), state)
    assert writer.staged_checkpoint(tmp_path / 'checkpoint_1.th') is None  # only some states
    writer.close()


def test_the_staged_copy_is_copied_straight_into_the_live_tensors_that_fit(tmp_path, assert_same):
    state = make_state()
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(state, {tmp_path / 'checkpoint.th': None}, META)
    writer.wait()
    live = make_state(1)
    live['model']['w'] = torch.zeros(3)  # does not fit: cloned instead
    staged = writer.staged_checkpoint(tmp_path / 'checkpoint.th', into=live)
    assert staged is not None
    assert staged.state['model']['v'].data_ptr() == live['model']['v'].data_ptr()
    assert torch.equal(live['optimizer']['exp_avg'], state['optimizer']['exp_avg'])
    assert torch.equal(live['model']['w'], torch.zeros(3))
    assert_same(staged.state, state)
    writer.close()


def test_the_staged_copy_is_not_used_once_the_file_on_disk_differs_from_it(tmp_path):
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(make_state(), {tmp_path / 'checkpoint.th': None}, META)
    writer.wait()
    envelope.write_checkpoint(tmp_path / 'checkpoint.th', make_state(1), META)  # another save since
    assert writer.staged_checkpoint(tmp_path / 'checkpoint.th') is None
    writer.close()


def test_the_staged_copy_is_not_used_when_memory_no_longer_matches_its_digests(tmp_path):
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(make_state(), {tmp_path / 'checkpoint.th': None}, META)
    writer.wait()
    writer.staging.buffers[0].view(torch.uint8)[5] ^= 1  # a flipped bit in the staged copy
    assert writer.staged_checkpoint(tmp_path / 'checkpoint.th') is None
    writer.close()


# -- the solver in this mode ----------------------------------------------------------------------

INCREMENTAL = ('checkpoint.incremental=true',)


@pytest.mark.integration
@pytest.mark.parametrize('mode', ['async', 'sync'])
def test_a_divergence_rolls_back_from_memory_when_async_else_from_disk(dora, dora_tools, dora_dir, mode):
    overrides = (*FAULTY, *INCREMENTAL, '+faults.nan_batches=[20]', f'checkpoint.async_save={mode == "async"}')
    code, output = dora('run', *overrides)
    assert code == 0, output
    folder = dora_tools.folder(dora_dir, *overrides)
    source = 'memory (the staged copy' if mode == 'async' else 'disk in'
    assert f"Rollback: read {folder / 'checkpoint.th'} from {source}" in output
    assert f"Reloaded {folder / 'checkpoint.th'} (step 16)" in output


@pytest.mark.integration
@pytest.mark.parametrize('other', ['fsdp.use=true', 'checkpoint.remote=file:///tmp/mirror'])
def test_incremental_with_fsdp_or_a_remote_mirror_is_refused_naming_both_keys(dora, other):
    code, output = dora('run', *REGRESSION, *INCREMENTAL, other)
    assert code == 1
    last = output.strip().splitlines()[-1]
    assert 'checkpoint.incremental=true' in last and other.split('=')[0] in last


@pytest.mark.integration
def test_the_command_line_rolls_back_prunes_and_exports_an_incremental_experiment(dora_tools, dora_dir, tmp_path):
    overrides = (*REGRESSION, *INCREMENTAL, 'checkpoint.save_every=1', 'optim.epochs=3')
    xp = run_xp(dora_dir, *overrides)

    def solver(*args: str) -> str:
        proc = subprocess.run([*SOLVER, *args], cwd=ROOT, env=dora_tools.env(dora_dir), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    solver('rollback', str(xp.folder), '--to', 'epoch:1')
    moved = sorted(xp.folder.glob('rolled_back/*/checkpoint*.th'))
    assert moved and not naming.epoch_checkpoint_path(xp.folder, 2).exists()
    run_xp(dora_dir, *overrides)  # goes on from epoch 1; its collections keep the moved files' blobs
    solver('prune', str(xp.folder), '--keep-last', '1', '--yes')
    assert [epoch for epoch, _ in naming.epoch_checkpoints(xp.folder)] == [3]
    assert blob_names(dora_dir) == store.IncrementalStore(xp.folder).referenced()  # the Dora folder's store
    for path in store.checkpoint_files(xp.folder):
        envelope.read_checkpoint(path)
    solver('export', str(xp.folder), str(tmp_path / 'model.th'))
    shutil.rmtree(dora_dir / blobs.BLOBS)
    assert 'model' in envelope.read_checkpoint(tmp_path / 'model.th').state['best_state']['states']


# -- one store for the Dora folder ----------------------------------------------------------------

def dora_xp(dora_dir: Path, sig: str) -> Path:
    """An experiment folder of a Dora folder: its incremental checkpoints use `<dora>/blobs`."""
    folder = dora_dir / blobs.XPS / sig
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_experiments_of_a_dora_folder_store_equal_tensors_once_in_its_store(tmp_path, assert_same):
    a, b = dora_xp(tmp_path, 'aaaa'), dora_xp(tmp_path, 'bbbb')
    state = make_state()
    IncrementalStore(a).write(a / 'checkpoint.th', state, META)
    second = IncrementalStore(b)  # another experiment, another process
    second.write(b / 'checkpoint.th', state, META)
    assert second.last.written == 0 and not (a / blobs.BLOBS).exists() and not (b / blobs.BLOBS).exists()
    assert len(blob_names(tmp_path)) == 3
    assert envelope.read_unverified(b / 'checkpoint.th')['blobs']['store'] == blobs.SHARED
    moved = b / 'rolled_back' / '20260101-000000'
    moved.mkdir(parents=True)
    os.replace(b / 'checkpoint.th', moved / 'checkpoint.th')
    assert_same(envelope.read_checkpoint(moved / 'checkpoint.th').state, state)


def test_collecting_one_experiment_keeps_every_blob_another_experiment_references(tmp_path):
    a, b = dora_xp(tmp_path, 'aaaa'), dora_xp(tmp_path, 'bbbb')
    IncrementalStore(a).write(a / 'checkpoint_1.th', make_state(1), META)
    IncrementalStore(a).write(a / 'checkpoint.th', make_state(2), META)
    IncrementalStore(b).write(b / 'checkpoint.th', make_state(1), META)  # b started from a's epoch 1
    (a / 'checkpoint_1.th').unlink()
    assert IncrementalStore(a).collect() == []  # every blob of epoch 1 is b's too
    (b / 'checkpoint.th').unlink()
    assert len(IncrementalStore(a).collect()) == 3
    assert blob_names(tmp_path) == store.referenced(a, shared=True)
    envelope.read_checkpoint(a / 'checkpoint.th')


def test_a_checkpoint_of_another_experiment_that_cannot_be_read_stops_collection(tmp_path, caplog):
    a, b = dora_xp(tmp_path, 'aaaa'), dora_xp(tmp_path, 'bbbb')
    IncrementalStore(a).write(a / 'checkpoint.th', make_state(1), META)
    IncrementalStore(b).write(b / 'checkpoint.th', make_state(2), META)
    (a / 'checkpoint.th').unlink()
    (b / 'checkpoint.th').write_bytes(b'damaged')
    before = blob_names(tmp_path)
    assert IncrementalStore(a).collect() == [] and blob_names(tmp_path) == before
    assert f"{b / 'checkpoint.th'} cannot be read" in caplog.text


def test_a_save_holds_the_store_so_a_collection_beside_it_deletes_nothing_it_reuses(tmp_path, monkeypatch):
    a, b = dora_xp(tmp_path, 'aaaa'), dora_xp(tmp_path, 'bbbb')
    state = make_state()
    IncrementalStore(a).write(a / 'checkpoint.th', state, META)
    (a / 'checkpoint.th').unlink()  # a's blobs are unreferenced now, and b is about to reuse them
    collected: list[list[str]] = []
    write_file = envelope._write_file

    def collect_then_write(*args, **kwargs):  # a's collection runs after b decided to reuse, before b's file
        collected.append(IncrementalStore(a).collect())
        return write_file(*args, **kwargs)

    monkeypatch.setattr(envelope, '_write_file', collect_then_write)
    saver = IncrementalStore(b)
    saver.write(b / 'checkpoint.th', state, META)
    assert collected == [[]] and saver.last.written == 0
    envelope.read_checkpoint(b / 'checkpoint.th')
    monkeypatch.undo()
    assert IncrementalStore(a).collect() == []  # the store free again: b references them all


def test_a_collection_waits_for_a_rollback_moving_files_then_runs(tmp_path):
    a = dora_xp(tmp_path, 'aaaa')
    IncrementalStore(a).write(a / 'checkpoint.th', make_state(), META)
    (a / 'checkpoint.th').unlink()
    with IncrementalStore(a).referencing():
        assert IncrementalStore(a).collect(wait=0.2) == []
        assert len(blob_names(tmp_path)) == 3
    assert len(IncrementalStore(a).collect()) == 3


def test_an_experiment_store_of_the_old_layout_is_still_read_and_collected(tmp_path, assert_same):
    old = tmp_path / 'old'  # written before the shared store: <xp>/blobs, files without the mark
    IncrementalStore(old).write(old / 'checkpoint_1.th', make_state(1), META)
    xp = dora_xp(tmp_path, 'aaaa')
    xp.rmdir()
    os.replace(old, xp)
    assert 'store' not in envelope.read_unverified(xp / 'checkpoint_1.th')['blobs']
    IncrementalStore(xp).write(xp / 'checkpoint.th', make_state(1), META)  # a resume: the shared store
    assert_same(envelope.read_checkpoint(xp / 'checkpoint_1.th').state, make_state(1))
    assert_same(envelope.read_checkpoint(xp / 'checkpoint.th').state, make_state(1))
    (xp / 'checkpoint_1.th').unlink()
    assert len(IncrementalStore(xp).collect()) == 3 and blob_names(xp) == set()
    assert blob_names(tmp_path) == store.referenced(xp, shared=True)


def test_a_shared_checkpoint_copied_out_of_its_dora_folder_says_to_consolidate(tmp_path):
    a = dora_xp(tmp_path / 'dora', 'aaaa')
    IncrementalStore(a).write(a / 'checkpoint.th', make_state(), META)
    (tmp_path / 'elsewhere').mkdir()
    shutil.copy(a / 'checkpoint.th', tmp_path / 'elsewhere' / 'model.th')
    with pytest.raises(faults.CorruptCheckpointError, match="no 'xps' folder of a Dora folder holds it.*consolidate"):
        envelope.read_checkpoint(tmp_path / 'elsewhere' / 'model.th')


@pytest.mark.integration
def test_a_pretrain_and_its_frozen_fine_tune_pruned_and_rolled_back_at_once_both_verify_and_resume(
        dora_tools, dora_dir):
    common = (*REGRESSION, *INCREMENTAL, 'checkpoint.save_every=1')
    pretrain = run_xp(dora_dir, *common)
    tune = (*common, 'optim.epochs=4', f'continue_from=//sig/{pretrain.folder.name}', 'optim.freeze=[0]')
    fine_tune = run_xp(dora_dir, *tune)
    a, b = IncrementalStore(pretrain.folder), IncrementalStore(fine_tune.folder)
    assert a.blobs == b.blobs == dora_dir / blobs.BLOBS
    shared = set(store.referenced(pretrain.folder, shared=True) or ()) & set(
        store.referenced(fine_tune.folder, shared=True) or ())
    assert shared  # the frozen layer (and the weights b started from) stored once for both
    assert envelope.read_unverified(fine_tune.folder / 'start.th')['blobs']['store'] == blobs.SHARED  # lineage

    def solver(*args: str) -> subprocess.Popen:
        return subprocess.Popen([*SOLVER, *args], cwd=ROOT, env=dora_tools.env(dora_dir), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    a_sig, b_sig = pretrain.folder.name, fine_tune.folder.name
    for both in ([('rollback', a_sig, '--to', 'epoch:1'), ('prune', b_sig, '--keep-last', '2', '--yes')],
                 [('prune', a_sig, '--keep-last', '1', '--yes'), ('rollback', b_sig, '--to', 'epoch:3')]):
        procs = [solver(*args) for args in both]  # two processes at once, on two experiments
        for proc in procs:
            output, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, output
    assert blob_names(dora_dir) == a.referenced()
    for xp in (pretrain, fine_tune):
        verified = subprocess.run([*SOLVER, 'verify', str(xp.folder)], cwd=ROOT, env=dora_tools.env(dora_dir),
                                  capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        for path in store.checkpoint_files(xp.folder):  # those moved aside too
            envelope.read_checkpoint(path)
    resumed = [run_xp(dora_dir, *overrides).output for overrides in (common, tune)]
    assert f"Resumed from {naming.epoch_checkpoint_path(pretrain.folder, 1)}" in resumed[0]
    assert f"Resumed from {naming.epoch_checkpoint_path(fine_tune.folder, 3)}" in resumed[1]
    assert blob_names(dora_dir) == a.referenced()


SHARING = """
import sys, torch
from pathlib import Path
from solver.checkpointing import manager, naming, policy
from solver.checkpointing.config import CheckpointConfig
from solver.checkpointing.lock import ExperimentLock
from solver.checkpointing.store import IncrementalStore
folder = Path(sys.argv[1])
retention = policy.retention_from_config(CheckpointConfig(save_every=1, keep_last=1))
generator = torch.Generator().manual_seed(int(sys.argv[2]))
frozen = torch.ones(128, 128)  # the same bytes in both experiments
with ExperimentLock(folder):
    incremental = IncrementalStore(folder)
    for epoch in range(1, 10**6):
        state = {'frozen': frozen, 'live': {str(i): torch.randn(160, generator=generator) for i in range(40)}}
        incremental.write(folder / 'checkpoint.th', state, {'epoch': epoch})
        incremental.write(naming.epoch_checkpoint_path(folder, epoch), state, {'epoch': epoch})
        manager.prune(folder, retention)
        print('collecting', epoch, flush=True)
        incremental.collect(wait=1.0)
        print('collected', epoch, flush=True)
"""


@pytest.mark.integration
def test_kill_9_during_collections_of_two_experiments_sharing_a_store_loses_no_referenced_blob(tmp_path):
    rng = random.Random(11)
    folders = [tmp_path / blobs.XPS / sig for sig in ('aaaa', 'bbbb')]
    epochs, during = [], []
    for life in range(5):
        procs = [subprocess.Popen([sys.executable, '-c', SHARING, str(folder), str(10 * life + i)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
                 for i, folder in enumerate([*folders])]
        assert procs[0].stdout is not None
        for _ in range(rng.randint(1, 3)):  # into the collection of epoch 1-3 of one, the other anywhere
            while not (line := procs[0].stdout.readline()).startswith('collecting'):
                assert line, 'the saving process ended'
        time.sleep(rng.uniform(0.0, 0.02))
        for proc in procs:
            proc.kill()
            proc.wait()
        during.append(not procs[0].stdout.read())  # killed before it printed 'collected'
        for folder in folders:
            for path in store.checkpoint_files(folder):
                envelope.read_checkpoint(path)  # raises, naming the file and the damage
            recovery.clean_stray_files(folder)
        epochs.append(envelope.read_checkpoint(folders[0] / 'checkpoint.th').meta['epoch'])
    assert len(set(epochs)) > 1 and any(during)  # at least one life ended in the middle of a collection
    IncrementalStore(folders[0]).collect()  # a later collection finishes
    assert blob_names(tmp_path) == store.referenced(tmp_path / blobs.XPS, shared=True)
    assert not [p for p in (tmp_path / blobs.BLOBS).iterdir() if '.tmp.' in p.name]
    for folder in folders:
        for path in store.checkpoint_files(folder):
            envelope.read_checkpoint(path)


def test_a_shared_checkpoint_does_not_read_its_blobs_through_a_linked_store(tmp_path):
    a = dora_xp(tmp_path / 'dora', 'aaaa')
    IncrementalStore(a).write(a / 'checkpoint.th', make_state(), META)
    (tmp_path / 'other').mkdir()
    os.replace(tmp_path / 'dora' / blobs.BLOBS, tmp_path / 'other' / blobs.BLOBS)
    (tmp_path / 'dora' / blobs.BLOBS).symlink_to(tmp_path / 'other' / blobs.BLOBS)
    with pytest.raises(faults.CorruptCheckpointError, match='blobs is a symbolic link'):
        envelope.read_checkpoint(a / 'checkpoint.th')
    with pytest.raises(faults.CheckpointError, match='is a symbolic link'):
        IncrementalStore(a).collect()


def test_collection_reads_again_only_the_checkpoint_files_that_changed_since_the_last(tmp_path, monkeypatch):
    a, b = dora_xp(tmp_path, 'aaaa'), dora_xp(tmp_path, 'bbbb')
    incremental = IncrementalStore(a)
    incremental.write(a / 'checkpoint.th', make_state(1), META)
    IncrementalStore(b).write(b / 'checkpoint.th', make_state(2), META)
    read: list[Path] = []
    read_unverified = envelope.read_unverified
    monkeypatch.setattr(envelope, 'read_unverified', lambda path: read.append(path) or read_unverified(path))
    incremental.collect()
    assert sorted(read) == [a / 'checkpoint.th', b / 'checkpoint.th']
    read.clear()
    IncrementalStore(b).write(b / 'checkpoint.th', make_state(3), META)  # replaced: a new file
    assert len(incremental.collect()) == 3 and read == [b / 'checkpoint.th']  # make_state(2)'s blobs
    (a / 'checkpoint.th').unlink()
    assert len(incremental.collect()) == 3 and blob_names(tmp_path) == store.referenced(b, shared=True)
