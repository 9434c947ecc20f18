"""Reliability under faults: kill -9 at random moments, damaged files, a size limit during a save,
preemption signals, divergence rollback, and the checkpoint writer's listeners and errors.

The promise under test: whatever happens, at most the work since the last checkpoint is lost, no
damaged checkpoint is ever loaded, and a resumed run ends bit-identical to the same run left
alone. Runs are real `dora run` processes of the regression solver, faults are real signals,
real files and real resource limits; the test-only faulty solver (`tests/faulty_solver.py`)
injects a NaN batch or a SIGTERM at a chosen position of the training stream, or slows a stage.

The fault-injection test kills training `SOLVER_FAULT_KILLS` times (default 30, about two minutes
on two cores). The longer run:

    SOLVER_FAULT_KILLS=300 python -m pytest tests/test_reliability.py -k fault_injection
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import random
import resource
import signal
import threading
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    FAULTY,
    REGRESSION,
    SAVE_LINE,
    assert_same,
    assert_same_run,
    copy_xp,
    history,
    last_lines,
    run_xp,
    temporary_files,
)

from solver.checkpointing import blobs, envelope, faults, store
from solver.checkpointing.writer import CheckpointWriter, SaveMode

integration = pytest.mark.integration
WIDE = (*REGRESSION, 'model.hidden_size=512', 'dataset.dim=256')  # a 2 MB checkpoint
# Steps of ~10 ms, 96 per epoch: long enough to signal or kill a run in the middle of an epoch.
EXACT = (*WIDE, 'dataset.batch_size=256',
         'dataset.train_size=24576', 'dataset.eval_size=256', 'optim.epochs=2', 'optim.lr=1e-3')
EXACT_STEPS = 96


@pytest.fixture(scope='module')
def exact_reference(dora_tools, tmp_path_factory) -> Path:
    """The EXACT run left alone: what interrupted and resumed runs must end as."""
    return run_xp(tmp_path_factory.mktemp('reference') / 'dora', *EXACT).folder


# -- exact resume after kill -9 -------------------------------------------------------------------

@pytest.fixture(scope='module', params=['sync', 'async'])
def killed(request, dora_tools, tmp_path_factory) -> SimpleNamespace:
    """An EXACT run saving every 8 steps, killed with SIGKILL just after a save in the middle of
    epoch 2, then rerun to the end."""
    overrides = (*EXACT, 'checkpoint.every_steps=8', f'checkpoint.async_save={request.param == "async"}')
    dora_dir = tmp_path_factory.mktemp(f'killed_{request.param}') / 'dora'
    # An async save's line is printed when it starts: the line of the next save means it is durable.
    with dora_tools.start(dora_dir, *overrides) as run:
        run.wait_for_line(f'{SAVE_LINE} (epoch 1, step {EXACT_STEPS + 16})')
        run.kill()
    saved = envelope.read_checkpoint(run.folder / 'checkpoint.th').meta
    code, output = dora_tools.run(dora_dir, 'run', *overrides)
    return SimpleNamespace(folder=run.folder, saved=saved, code=code, output=output)


@integration
def test_a_kill_after_a_mid_epoch_save_leaves_that_mid_epoch_checkpoint(killed):
    assert killed.saved['epoch'] == 1 and 0 < killed.saved['epoch_step'] < EXACT_STEPS


@integration
def test_the_rerun_after_a_kill_resumes_at_the_batch_of_the_mid_epoch_checkpoint(killed):
    assert killed.code == 0, killed.output
    assert f"Resuming the train stage at step {killed.saved['epoch_step']} of {EXACT_STEPS}." in killed.output


@integration
def test_a_run_killed_mid_epoch_and_resumed_ends_bit_identical_to_one_left_alone(killed, exact_reference):
    assert_same_run(killed.folder, exact_reference)


# -- preemption signals ---------------------------------------------------------------------------

@pytest.fixture(scope='module', params=[(signal.SIGTERM, 'sync'), (signal.SIGUSR1, 'async')],
                ids=['SIGTERM-sync', 'SIGUSR1-async'])
def preempted(request, dora_tools, tmp_path_factory) -> SimpleNamespace:
    """An EXACT run sent a signal early in epoch 2 (no periodic saves), then rerun to the end."""
    sig, mode = request.param
    overrides = (*EXACT, f'checkpoint.async_save={mode == "async"}')
    dora_dir = tmp_path_factory.mktemp(f'preempted_{sig.name}') / 'dora'
    with dora_tools.start(dora_dir, *overrides) as run:
        run.wait_for_line(f'Train | epoch 2 | 8/{EXACT_STEPS}')
        run.send(sig)
        code, output = run.finish()
    saved = envelope.read_checkpoint(run.folder / 'checkpoint.th').meta
    rerun_code, rerun_output = dora_tools.run(dora_dir, 'run', *overrides)
    return SimpleNamespace(signal=sig, folder=run.folder, code=code, output=output, saved=saved,
                           rerun_code=rerun_code, rerun_output=rerun_output)


@integration
def test_a_signal_mid_epoch_makes_the_run_save_then_exit_with_128_plus_the_signal(preempted):
    assert preempted.code == 128 + preempted.signal, preempted.output
    received = preempted.output.index(f'Received {preempted.signal.name}')
    save = preempted.output.index(f"{SAVE_LINE} (epoch 1, step {preempted.saved['step']})")
    assert received < save < preempted.output.index(f'Stopped by {preempted.signal.name}')
    assert 0 < preempted.saved['epoch_step'] < EXACT_STEPS


@integration
def test_the_rerun_after_a_signal_resumes_at_the_batch_it_saved(preempted):
    assert preempted.rerun_code == 0, preempted.rerun_output
    assert f"Resuming the train stage at step {preempted.saved['epoch_step']} of {EXACT_STEPS}." \
        in preempted.rerun_output


@integration
def test_a_preempted_and_resumed_run_ends_bit_identical_to_one_left_alone(preempted, exact_reference):
    assert_same_run(preempted.folder, exact_reference)


@integration
@pytest.mark.parametrize('extra', [(), ('checkpoint.save_last=false', 'checkpoint.allow_none=true')],
                         ids=['save_last', 'no save_last'])
def test_a_signal_in_the_last_step_of_an_epoch_saves_its_train_stage_before_exiting(dora, dora_tools, dora_dir, extra):
    overrides = (*FAULTY, '+faults.sigterm_batches=[15]', *extra)  # batch 15: epoch 1's last step
    code, output = dora('run', *overrides)
    assert code == 128 + signal.SIGTERM, output
    saved = envelope.read_checkpoint(dora_tools.folder(dora_dir, *overrides) / 'checkpoint.th').meta
    # the train stage is saved whole; the epoch is not committed: valid has not run
    assert (saved['epoch'], saved['step'], saved['epoch_step']) == (0, 16, 16)
    assert 'Valid Summary' not in output


@pytest.fixture(scope='module')
def plain_reference(tmp_path_factory) -> Path:
    """The regression run left alone (3 epochs)."""
    return run_xp(tmp_path_factory.mktemp('plain') / 'dora', *REGRESSION).folder


@integration
@pytest.mark.parametrize('stage', ['valid', pytest.param('evaluate', marks=pytest.mark.slow),
                                   pytest.param('generate', marks=pytest.mark.slow)])
def test_a_signal_during_a_slow_stage_stops_it_at_the_next_batch_and_the_rerun_repeats_it(
        dora_tools, dora_dir, plain_reference, stage):
    # 1 s per batch of the stage in epoch 1: without the check between batches, the stage would
    # run 4 s more after the signal, and the save would wait for the end of the epoch.
    overrides = (*FAULTY, f'+faults.slow_stage={stage}', '+faults.slow_epochs=[1]', '+faults.slow_seconds=1')
    with dora_tools.start(dora_dir, *overrides) as run:
        run.wait_for_line(f'Slow {stage} batch 1')
        run.send(signal.SIGTERM)
        run.wait_for_line('Received SIGTERM')
        run.send(signal.SIGTERM)  # a second signal is logged, not ignored without a word
        code, output = run.finish()
    assert code == 128 + signal.SIGTERM, output
    assert 'Received SIGTERM again' in output
    assert f'Slow {stage} batch 2' not in output  # stopped between batches 1 and 2
    assert output.index('Received SIGTERM') < output.index(SAVE_LINE) < output.index('Stopped by SIGTERM')
    saved = envelope.read_checkpoint(run.folder / 'checkpoint.th').meta
    assert (saved['epoch'], saved['step'], saved['epoch_step']) == (0, 16, 16)
    code, output = dora_tools.run(dora_dir, 'run', *overrides)
    assert code == 0, output
    assert 'Resuming the train stage at step 16 of 16.' in output and f'Slow {stage} batch 3' in output
    assert_same_run(run.folder, plain_reference)


# -- fault injection: kill -9 at random moments, many times ---------------------------------------

FAULT_KILLS = int(os.environ.get('SOLVER_FAULT_KILLS', '30'))
FAULT_STEPS = 32  # per epoch
FAULT_EVERY = 2   # steps between saves
FAULT_BASE = (*WIDE, 'dataset.train_size=1024',
              f'checkpoint.every_steps={FAULT_EVERY}', 'checkpoint.save_every=1', 'checkpoint.keep_last=2')


class Moment(enum.Enum):
    """Where in a life of the run a kill lands, roughly (a `Kill` says exactly)."""

    START = 'start'  # `delay` s after launch: imports, lock, restore, or the first steps
    STEP = 'step'    # `delay` s after the `saves`-th save: in a step, or in the next save
    SAVE = 'save'    # `delay` s after the save following the `saves`-th one started (a .tmp file)


@dataclass
class Kill:
    moment: Moment
    saves: int
    delay: float

    def most_saves(self) -> int:
        """Saves this life makes at most: a kill comes at the latest when the next one is logged,
        so the progress of a life is bounded whatever the speed of the machine."""
        return 1 if self.moment is Moment.START else self.saves + 2


def kill_plan(kills: int, seed: int) -> list[Kill]:
    rng = random.Random(seed)
    plan = []
    for _ in range(kills):
        moment = rng.choice([Moment.START, Moment.STEP, Moment.SAVE, Moment.SAVE])
        if moment is Moment.START:
            plan.append(Kill(moment, 0, rng.uniform(0.0, 4.0)))
        else:
            plan.append(Kill(moment, rng.randint(0, 4), rng.uniform(0.0, 0.05)))
    return plan


# 'incremental': async saves into a blob store (checkpoint.incremental), collected as it goes.
FAULT_MODES = {'sync': ('checkpoint.async_save=false',), 'async': ('checkpoint.async_save=true',),
               'incremental': ('checkpoint.async_save=true', 'checkpoint.incremental=true')}
FAULT_PLANS = {mode: kill_plan((FAULT_KILLS + i) // 2, seed=1234 + i) for i, mode in enumerate(FAULT_MODES)}
# Enough epochs that no plan finishes the run before its last kill: each life adds at most
# `most_saves() + 1` saves' worth of steps (the +1: steps in flight when the kill lands).
FAULT_MOST_STEPS = max(sum(k.most_saves() + 1 for k in plan) for plan in FAULT_PLANS.values()) * FAULT_EVERY
FAULT_EPOCHS = 2 + FAULT_MOST_STEPS // FAULT_STEPS
FAULT = (*FAULT_BASE, f'optim.epochs={FAULT_EPOCHS}')


@pytest.fixture(scope='module')
def fault_reference(dora_tools, tmp_path_factory) -> Path:
    return run_xp(tmp_path_factory.mktemp('fault_reference') / 'dora', *FAULT).folder


def kill_when_planned(run: tp.Any, kill: Kill) -> None:
    def saves() -> int:
        return run.output().count(SAVE_LINE)

    def saving() -> bool:
        suffix = f'.tmp.{run.proc.pid}'
        return run.folder.is_dir() and any(name.endswith(suffix) for name in os.listdir(run.folder))

    def after(delay: float, most_saves: int) -> tp.Callable[[], bool]:
        deadline = time.monotonic() + delay
        return lambda: time.monotonic() >= deadline or saves() >= most_saves

    if kill.moment is not Moment.START:
        run.wait_for(lambda: saves() >= kill.saves, f'{kill.saves} saves')
    if kill.moment is Moment.SAVE:
        run.wait_for(lambda: saving() or saves() > kill.saves, 'a save in progress')
    run.wait_for(after(kill.delay, kill.most_saves()), 'the moment of the kill')
    run.kill()


def resume_line_expected(folder: Path) -> str | None:
    """Every checkpoint file left verifies; the line the next run must log when it resumes."""
    for path in sorted(folder.glob('checkpoint*.th')):
        envelope.read_checkpoint(path)  # raises, naming the file and the damage
    latest = folder / 'checkpoint.th'
    if not latest.exists():
        return None
    meta = envelope.read_checkpoint(latest).meta
    return f"Resumed from {latest} (epoch {meta['epoch']}, step {meta['step']})."


def assert_resumed_as_expected(output: str, expected: str | None) -> None:
    assert 'Skipping damaged checkpoint' not in output, output
    if 'Checkpoints: ' not in output:  # killed before restore() was done: nothing to check
        return
    if expected is None:
        assert 'Resumed from' not in output, output
    else:
        assert expected in output, f"expected {expected!r} in:\n{output}"


@integration
@pytest.mark.parametrize('mode', [  # async by default; sync and incremental with -m slow (CI time)
    pytest.param(mode, marks=[pytest.mark.slow] if mode != 'async' else []) for mode in FAULT_MODES])
def test_fault_injection_kill_at_random_moments_then_resume_ends_as_if_never_killed(
        dora_tools, tmp_path, fault_reference, mode):
    overrides = (*FAULT, *FAULT_MODES[mode])
    dora_dir = tmp_path / 'dora'
    expected = None
    for kill in FAULT_PLANS[mode]:
        with dora_tools.start(dora_dir, *overrides) as run:
            kill_when_planned(run, kill)
        assert_resumed_as_expected(run.output(), expected)
        expected = resume_line_expected(run.folder)
    with dora_tools.start(dora_dir, *overrides) as run:
        code, output = run.finish()
    assert code == 0, output
    assert_resumed_as_expected(output, expected)
    assert temporary_files(run.folder) == []
    assert_same_run(run.folder, fault_reference)
    if mode == 'incremental':  # every blob left is used by a kept checkpoint
        shared = store.IncrementalStore(run.folder)  # the Dora folder's store
        assert {p.name for p in shared.blobs.iterdir() if blobs.KEY.match(p.name)} == shared.referenced()


# -- damaged files at resume -----------------------------------------------------------------------

TRAINED = (*REGRESSION, 'checkpoint.save_every=1')  # checkpoint.th and checkpoint_<1..3>.th
STORAGE = {'single file': (), 'incremental': ('checkpoint.incremental=true',)}


@pytest.fixture(scope='module', params=STORAGE.values(), ids=STORAGE.keys())
def trained(request, tmp_path_factory) -> SimpleNamespace:
    """A finished run with an epoch checkpoint per epoch (read only: tests damage a copy), in
    each storage mode (`overrides` to rerun it)."""
    overrides = (*TRAINED, *request.param)
    xp = run_xp(tmp_path_factory.mktemp('trained') / 'dora', *overrides)
    xp.overrides = overrides
    return xp


def truncate(keep: float | int) -> tp.Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    return damage


def cut_end(path: Path) -> None:  # the end of the zip's central directory
    path.write_bytes(path.read_bytes()[:-10])


def flip_byte_at(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    assert offset >= 0
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def flip_tensor_byte(path: Path) -> None:
    """Flip a bit in the middle of the model's first weight matrix (in the file, or in its blob
    for an incremental checkpoint)."""
    weight = envelope.read_checkpoint(path).state['model']['0.weight'].numpy().tobytes()
    if weight[:64] not in path.read_bytes():
        key = blobs.blob_key(torch.frombuffer(bytearray(weight), dtype=torch.uint8))
        path = blobs.blob_folder(path, shared=True) / key  # the Dora folder's store
    flip_byte_at(path, path.read_bytes().find(weight[:64]) + len(weight) // 2)


def flip_structure_byte(path: Path) -> None:
    """Flip a bit of a state name in the pickled structure."""
    flip_byte_at(path, path.read_bytes().find(b'optimizer'))


DAMAGES = {
    'truncated, flipped tensor byte, empty': {
        'checkpoint.th': truncate(0.5), 'checkpoint_3.th': flip_tensor_byte, 'checkpoint_2.th': truncate(0)},
    'cut end, truncated to 100 bytes, flipped structure byte': {
        'checkpoint.th': cut_end, 'checkpoint_3.th': truncate(100), 'checkpoint_2.th': flip_structure_byte},
}


@integration
@pytest.mark.parametrize('damages', DAMAGES.values(), ids=DAMAGES.keys())
def test_a_rerun_reports_each_damaged_checkpoint_and_resumes_from_the_newest_intact_one(
        dora_tools, trained, tmp_path, damages):
    xp = copy_xp(trained, tmp_path)
    for name, damage in damages.items():
        damage(xp.folder / name)
    code, output = dora_tools.run(xp.dora_dir, 'run', *trained.overrides)
    assert code == 0, output
    for name in damages:
        assert f"Skipping damaged checkpoint: {xp.folder / name}" in output
    assert f"Resumed from {xp.folder / 'checkpoint_1.th'} (epoch 1," in output
    assert_same_run(xp.folder, trained.folder)


def files_on_disk(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of the files a run owns (not Dora's and Hydra's per-launch
    files: .argv.json, .hydra/, the lock, the log)."""
    owned = [p for p in [*folder.iterdir(), *store.IncrementalStore(folder).blobs.glob('*')]
             if p.is_file() and not p.name.startswith(('.', 'solver.log'))]
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in owned}


@integration
def test_with_every_checkpoint_damaged_the_run_refuses_to_start_over_and_changes_nothing(
        dora_tools, trained, tmp_path):
    xp = copy_xp(trained, tmp_path)
    for name, damage in [('checkpoint.th', truncate(0)), ('checkpoint_3.th', truncate(0.5)),
                         ('checkpoint_2.th', flip_tensor_byte), ('checkpoint_1.th', cut_end)]:
        damage(xp.folder / name)
    before = files_on_disk(xp.folder)
    code, output = dora_tools.run(xp.dora_dir, 'run', *trained.overrides)
    assert code != 0
    assert 'refusing to start over' in output
    assert all(str(xp.folder / name) in output for name in ('checkpoint.th', 'checkpoint_1.th'))
    assert files_on_disk(xp.folder) == before


# -- a full disk: the file size limit during a save -----------------------------------------------

def limit_file_size(limit: int) -> None:
    """In the child: files may not grow past `limit` bytes; a write past it fails with EFBIG
    (SIGXFSZ, which would kill the process instead, is ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@integration
@pytest.mark.parametrize('mode', ['sync', 'async'])
def test_a_save_past_the_file_size_limit_stops_the_run_naming_the_file_and_keeps_the_previous_one(
        dora_tools, dora_dir, mode):
    overrides = (*WIDE, 'checkpoint.every_steps=4', f'checkpoint.async_save={mode == "async"}')
    with dora_tools.start(dora_dir, *overrides) as run:  # a first run leaves a 2 MB checkpoint
        run.wait_for(lambda: run.output().count(SAVE_LINE) >= 2, 'two saves')  # the first is durable
        run.kill()
    latest = run.folder / 'checkpoint.th'
    before = latest.read_bytes()
    # The rerun resumes, then cannot write its first checkpoint (an async save's error stops the
    # run at the next save).
    code, output = dora_tools.run(dora_dir, 'run', *overrides, preexec_fn=functools.partial(
        limit_file_size, len(before) // 2))
    assert code != 0
    assert 'Resumed from' in output
    assert f"Could not write checkpoint {latest}: File too large" in last_lines(output)
    assert latest.read_bytes() == before
    envelope.read_checkpoint(latest)
    assert temporary_files(run.folder) == []


# -- rollback on divergence ------------------------------------------------------------------------

@integration
def test_a_nan_loss_rolls_back_skips_the_batches_and_the_run_finishes(dora, dora_tools, dora_dir):
    overrides = (*FAULTY, '+faults.nan_batches=[20]')  # in epoch 2; the last checkpoint is at 16
    code, output = dora('run', *overrides)
    assert code == 0, output
    assert 'Rollback 1/3: loss is nan' in output and 'skipped training batches 16-20' in output
    folder = dora_tools.folder(dora_dir, *overrides)
    assert len(history(folder)) == 3
    progress = envelope.read_checkpoint(folder / 'checkpoint.th').state['progress']
    assert (progress['step'], progress['train_batches']) == (48, 48 + 5)


@integration
def test_a_rollback_to_an_earlier_epoch_still_runs_every_epoch(dora, dora_tools, dora_dir):
    overrides = (*FAULTY, 'optim.epochs=4', 'checkpoint.save_last=false', 'checkpoint.save_every=2',
                 '+faults.nan_batches=[56]')  # in epoch 4; the newest checkpoint is checkpoint_2.th
    code, output = dora('run', *overrides)
    assert code == 0, output
    folder = dora_tools.folder(dora_dir, *overrides)
    assert f"Reloaded {folder / 'checkpoint_2.th'} (step 32)" in output
    assert len(history(folder)) == 4


@integration
def test_a_nan_loss_at_every_step_stops_after_max_rollbacks_naming_the_key(dora):
    code, output = dora('run', *FAULTY, '+faults.nan_batches=[20,21,22,23,24,25]')
    assert code != 0
    assert 'Rollback 3/3' in output and 'Rollback 4' not in output
    assert 'checkpoint.rollback.max_rollbacks' in last_lines(output, 1)


@integration
def test_max_rollbacks_zero_stops_at_the_first_nan_before_saving_anything_trained_on_it(
        dora, dora_tools, dora_dir):
    overrides = (*FAULTY, '+faults.nan_batches=[20]', 'checkpoint.rollback.max_rollbacks=0')
    code, output = dora('run', *overrides)
    assert code != 0
    assert 'Rollback 1' not in output
    assert 'loss is nan' in last_lines(output, 1) and 'checkpoint.rollback.max_rollbacks' in last_lines(output, 1)
    saved = envelope.read_checkpoint(dora_tools.folder(dora_dir, *overrides) / 'checkpoint.th')
    assert saved.meta['step'] == 16
    assert all(value.isfinite().all() for value in saved.state['model'].values())


# -- the checkpoint writer: listeners and background errors ---------------------------------------

STATE = {'model': {'weight': torch.arange(6.0)}}


@pytest.mark.parametrize('mode', list(SaveMode))
def test_a_slow_listener_does_not_block_save(tmp_path, mode):
    saved, calls = threading.Event(), []

    def slow_listener(paths: list[Path]) -> None:
        # Returns once both saves have returned; had save() waited for it, it would time out.
        calls.append((paths, saved.wait(timeout=60)))

    writer = CheckpointWriter(mode)
    writer.listeners.append(slow_listener)
    writer.save(STATE, {tmp_path / 'a.th': None}, {})
    writer.save(STATE, {tmp_path / 'b.th': None}, {})
    saved.set()
    writer.close()
    assert calls == [([tmp_path / 'a.th'], True), ([tmp_path / 'b.th'], True)]


def test_a_failing_listener_is_logged_and_saving_goes_on(tmp_path, caplog):
    def failing_listener(paths: list[Path]) -> None:
        raise ValueError('upload failed')

    writer = CheckpointWriter(SaveMode.SYNC)
    writer.listeners.append(failing_listener)
    with caplog.at_level(logging.ERROR, logger='solver.checkpointing.writer'):
        writer.save(STATE, {tmp_path / 'a.th': None}, {})
        writer.save(STATE, {tmp_path / 'b.th': None}, {})
        writer.close()
    failures = [r for r in caplog.records if 'failing_listener' in r.getMessage()]
    assert len(failures) == 2 and 'upload failed' in failures[0].exc_text
    assert_same(envelope.read_checkpoint(tmp_path / 'b.th').state, STATE)


def unwritable_target(tmp_path: Path) -> Path:
    """A checkpoint path whose folder is a file: the write fails, even for root."""
    (tmp_path / 'not_a_folder').write_text('')
    return tmp_path / 'not_a_folder' / 'checkpoint.th'


def test_an_async_save_error_is_raised_by_the_next_save(tmp_path):
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(STATE, {unwritable_target(tmp_path): None}, {})  # returns: the write is in the background
    with pytest.raises(faults.CheckpointError, match='not_a_folder/checkpoint.th'):
        writer.save(STATE, {tmp_path / 'b.th': None}, {})
    writer.close()


def test_an_async_save_error_is_raised_by_close(tmp_path):
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(STATE, {unwritable_target(tmp_path): None}, {})
    with pytest.raises(faults.CheckpointError, match='not_a_folder/checkpoint.th'):
        writer.close()
