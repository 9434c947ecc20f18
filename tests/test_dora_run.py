"""Real `dora run` processes of the regression solver: train, resume, continue_from, keep policy,
execute_only, refusals, the experiment lock, and kill -9 in the middle of a save.

Each run takes a few seconds. Runs that several tests only read are module-scoped fixtures;
a test that changes an experiment works on a copy of its Dora folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    REGRESSION,
    SOLVER,
    BackgroundRun,
    back_to_epoch_1,
    copy_xp,
    history,
    last_lines,
    run_xp,
    without_durations,
    xp_folder,
)

from solver.checkpointing import envelope

pytestmark = pytest.mark.integration
TRAINED = (*REGRESSION, 'checkpoint.save_every=1')  # 3 epochs, checkpoint_<epoch>.th for each
KEPT = (*REGRESSION, 'optim.epochs=4', 'checkpoint.save_every=1', 'checkpoint.keep_last=2',
        'checkpoint.keep_every_states=[best_state]')
# A model whose checkpoint is ~34 MB, one update per epoch: saves long enough to be killed in.
BIG = (*REGRESSION, 'model.hidden_size=2048', 'dataset.dim=1024', 'optim.updates_per_epoch=1',
       'dataset.eval_size=32')


@pytest.fixture(scope='module')
def trained(dora_tools, tmp_path_factory) -> SimpleNamespace:
    """A finished 3-epoch experiment with an epoch checkpoint per epoch (read only: copy to change)."""
    return run_xp(tmp_path_factory.mktemp('trained'), *TRAINED)


# -- training and resuming ------------------------------------------------------------------------

def test_train_writes_a_checkpoint_and_one_history_entry_per_epoch(trained):
    assert len(history(trained.folder)) == 3
    latest = envelope.read_checkpoint(trained.folder / 'checkpoint.th')
    assert latest.meta['epoch'] == 3 and latest.meta['sig'] == trained.folder.name
    assert latest.state['history'] == history(trained.folder)


def test_save_every_writes_an_epoch_checkpoint_each_epoch(trained):
    assert [envelope.read_checkpoint(trained.folder / f'checkpoint_{e}.th').meta['epoch'] for e in (1, 2, 3)] \
        == [1, 2, 3]


def test_rerun_of_a_finished_experiment_changes_nothing(dora_tools, trained, tmp_path):
    xp = copy_xp(trained, tmp_path)
    before = {name: (xp.folder / name).read_bytes() for name in ('history.json', 'checkpoint.th')}
    code, output = dora_tools.run(xp.dora_dir, 'run', *TRAINED)
    assert code == 0, output
    assert 'is complete' in output
    assert 'Train Summary' not in output
    assert {name: (xp.folder / name).read_bytes() for name in before} == before


@pytest.fixture(scope='module')
def resumed(dora_tools, trained, tmp_path_factory) -> SimpleNamespace:
    """The trained experiment cut back to its epoch-1 checkpoint, then rerun."""
    xp = copy_xp(trained, tmp_path_factory.mktemp('resumed'))
    back_to_epoch_1(xp.folder)
    xp.code, xp.output = dora_tools.run(xp.dora_dir, 'run', *TRAINED)
    return xp


def test_rerun_resumes_at_the_epoch_of_the_checkpoint(resumed, trained):
    assert resumed.code == 0, resumed.output
    assert f"Resumed from {resumed.folder / 'checkpoint.th'} (epoch 1," in resumed.output
    assert 'Train Summary | Epoch 1 ' not in resumed.output
    assert len(history(resumed.folder)) == 3
    assert history(resumed.folder)[0] == history(trained.folder)[0]


def test_resumed_run_reproduces_the_uninterrupted_metrics(resumed, trained):
    assert without_durations(history(resumed.folder)) == without_durations(history(trained.folder))


def test_a_checkpoint_whose_progress_is_the_plain_dict_of_before_resumes_as_it_did(dora_tools, trained, tmp_path):
    # Checkpoints written while the run's position was an untyped dict hold it as this dict.
    xp = copy_xp(trained, tmp_path)
    epoch1 = envelope.read_checkpoint(xp.folder / 'checkpoint_1.th')
    step = int(epoch1.state['progress']['step'])
    old = {'step': step, 'train_batches': step, 'epoch_step': 0, 'sums': {}}
    envelope.write_checkpoint(xp.folder / 'checkpoint.th', {**epoch1.state, 'progress': old}, epoch1.meta)
    for epoch in (2, 3):
        (xp.folder / f'checkpoint_{epoch}.th').unlink()
    code, output = dora_tools.run(xp.dora_dir, 'run', *TRAINED)
    assert code == 0, output
    assert without_durations(history(xp.folder)) == without_durations(history(trained.folder))
    final = envelope.read_checkpoint(xp.folder / 'checkpoint.th').state['progress']
    assert final == envelope.read_checkpoint(trained.folder / 'checkpoint.th').state['progress']


def test_rerun_repairs_a_history_json_left_behind_by_a_kill_after_the_save(dora_tools, trained, tmp_path):
    xp = copy_xp(trained, tmp_path)
    full = history(xp.folder)
    (xp.folder / 'history.json').write_text(json.dumps(full[:2]))
    code, output = dora_tools.run(xp.dora_dir, 'run', *TRAINED)
    assert code == 0, output
    assert history(xp.folder) == full


# -- continue_from ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def continued(dora_tools, trained) -> SimpleNamespace:
    """A new experiment started from the trained one's best state; lr 0 keeps the weights it got."""
    xp = run_xp(trained.dora_dir, *REGRESSION, f'continue_from=//sig/{trained.folder.name}',
                'optim.lr=0', 'optim.epochs=1')
    assert xp.folder != trained.folder
    return xp


def test_continue_from_sig_says_it_took_the_best_state_of_the_source(continued, trained):
    assert f"Continuing from the best state of {trained.folder / 'checkpoint.th'}" in continued.output


def test_continue_from_sig_starts_from_the_source_best_weights(continued, trained):
    source = envelope.read_checkpoint(trained.folder / 'checkpoint.th').state['best_state']['states']['model']
    model = envelope.read_checkpoint(continued.folder / 'checkpoint.th').state['model']
    assert source.keys() == model.keys()
    assert all(torch.equal(model[key], source[key]) for key in source)


def test_continue_from_sig_starts_with_a_fresh_optimizer(continued, trained):
    source = torch.load(trained.folder / 'checkpoint.th', weights_only=True)['state']
    new = torch.load(continued.folder / 'checkpoint.th', weights_only=True)['state']
    own_steps = new['progress']['step']
    assert own_steps == 16 and source['progress']['step'] == 48  # one epoch of 512 / 32; three
    assert [s['step'].item() for s in new['optimizer']['state'].values()] == [own_steps] * 4


def test_continue_from_is_ignored_once_the_experiment_has_its_own_checkpoint(dora_tools, continued, trained):
    before = (continued.folder / 'checkpoint.th').read_bytes()
    code, output = dora_tools.run(continued.dora_dir, 'run', *REGRESSION,
                                  f'continue_from=//sig/{trained.folder.name}', 'optim.lr=0', 'optim.epochs=1')
    assert code == 0, output
    assert 'ignored' in output and f"Resumed from {continued.folder / 'checkpoint.th'}" in output
    assert (continued.folder / 'checkpoint.th').read_bytes() == before


def test_continue_from_an_experiment_folder_takes_its_best_state(dora, trained):
    code, output = dora('run', *REGRESSION, f'continue_from={trained.folder}', 'optim.epochs=1')
    assert code == 0, output
    assert f"Continuing from the best state of {trained.folder / 'checkpoint.th'}" in output


def test_continue_from_an_unknown_sig_fails_naming_it(dora):
    code, output = dora('run', *REGRESSION, 'continue_from=//sig/0badc0de', 'optim.epochs=1')
    assert code != 0
    assert '0badc0de' in last_lines(output, 5)


def test_continue_from_a_missing_path_fails_naming_the_path(dora):
    code, output = dora('run', *REGRESSION, 'continue_from=/no/such/path', 'optim.epochs=1')
    assert code != 0
    assert '/no/such/path' in last_lines(output, 5)


# -- keep policy --------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def kept(dora_tools, tmp_path_factory) -> SimpleNamespace:
    return run_xp(tmp_path_factory.mktemp('kept'), *KEPT)


def test_keep_last_leaves_only_the_newest_epoch_checkpoints(kept):
    assert sorted(p.name for p in kept.folder.glob('checkpoint*.th')) == \
        ['checkpoint.th', 'checkpoint_3.th', 'checkpoint_4.th']


def test_keep_every_states_limits_epoch_checkpoints_to_those_states(kept):
    epoch = envelope.read_checkpoint(kept.folder / 'checkpoint_4.th')
    assert set(epoch.state) == {'best_state'}
    assert {'model', 'optimizer', 'best_state'} <= set(envelope.read_checkpoint(kept.folder / 'checkpoint.th').state)


def test_a_damaged_latest_checkpoint_with_partial_epoch_files_names_keep_every_states(
        dora_tools, kept, tmp_path):
    xp = copy_xp(kept, tmp_path)
    (xp.folder / 'checkpoint.th').write_bytes(b'')
    code, output = dora_tools.run(xp.dora_dir, 'run', *KEPT)
    assert code != 0
    assert 'keep_every_states' in last_lines(output, 2)


# -- execute_only, refusals ------------------------------------------------------------------------

def test_execute_only_evaluate_runs_evaluate_and_leaves_the_history(dora_tools, trained, tmp_path):
    xp = copy_xp(trained, tmp_path)
    before = (xp.folder / 'history.json').read_bytes()
    code, output = dora_tools.run(xp.dora_dir, 'run', *TRAINED, 'execute_only=evaluate')
    assert code == 0, output
    assert 'Evaluate Summary' in output and 'Train Summary' not in output
    assert (xp.folder / 'history.json').read_bytes() == before


def test_an_unknown_solver_fails_listing_the_available_ones(dora):
    code, output = dora('run', 'solver=nope')
    assert code != 0
    assert 'nope' in output and 'regression' in output and 'drum_rnn' in output


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_a_checkpoint_that_would_run_code_is_refused(dora, dora_tools, dora_dir, tmp_path):
    folder = dora_tools.folder(dora_dir, *REGRESSION)
    folder.mkdir(parents=True)
    marker = tmp_path / 'pwned'
    torch.save({'format': envelope.FORMAT, 'version': envelope.VERSION, 'state': RunsCode(marker)},
               folder / 'checkpoint.th')
    code, output = dora('run', *REGRESSION)
    assert code != 0
    assert 'refused: needs arbitrary Python objects' in output and 'weights_only' not in output
    assert not marker.exists()


def test_a_checkpoint_of_another_experiment_is_refused_naming_both_and_continue_from(dora, dora_dir, trained):
    overrides = (*REGRESSION, 'optim.epochs=4')
    folder = xp_folder(dora_dir, *overrides)
    folder.mkdir(parents=True)
    shutil.copyfile(trained.folder / 'checkpoint.th', folder / 'checkpoint.th')
    code, output = dora('run', *overrides)
    assert code == 1
    line = last_lines(output, 1)
    assert trained.folder.name in line and folder.name in line and 'continue_from' in line
    assert 'Traceback' not in output and not (folder / 'history.json').exists()


@pytest.mark.parametrize('override, key', [('optim.epochs=0', 'optim.epochs'),
                                           ('checkpoint.keep_last=-2', 'checkpoint.keep_last'),
                                           ('checkpoint.save_last=false', 'checkpoint.allow_none')])
def test_an_impossible_config_is_refused_in_one_line_before_anything_is_built(dora, dora_dir, override, key):
    code, output = dora('run', *REGRESSION, override)
    assert code == 1
    assert key in last_lines(output, 1) and 'Traceback' not in output
    assert 'parameters' not in output  # the model was never built
    assert not list(xp_folder(dora_dir, *REGRESSION, override).glob('checkpoint*'))


# -- early stopping -------------------------------------------------------------------------------

# lr 0: the valid loss never improves after epoch 1, so patience 2 stops the run after epoch 3.
EARLY = (*REGRESSION, 'optim.lr=0', 'optim.epochs=10', 'early_stop.patience=2')


@pytest.fixture(scope='module')
def stopped(tmp_path_factory) -> SimpleNamespace:
    return run_xp(tmp_path_factory.mktemp('early') / 'dora', *EARLY)


def test_early_stopping_stops_after_patience_epochs_without_improvement_and_says_why(stopped):
    assert 'Early stop at epoch 3' in stopped.output and 'early_stop.patience' in stopped.output
    entries = history(stopped.folder)
    assert len(entries) == 3 and 'early_stop' not in entries[1]
    assert entries[-1]['early_stop']['epochs_without_improvement'] == 2
    assert envelope.read_checkpoint(stopped.folder / 'checkpoint.th').meta['epoch'] == 3


def test_a_rerun_of_an_early_stopped_experiment_says_it_is_complete_and_trains_nothing(stopped, tmp_path):
    xp = copy_xp(stopped, tmp_path)
    before = (xp.folder / 'checkpoint.th').read_bytes()
    rerun = run_xp(xp.dora_dir, *EARLY)
    assert 'is complete' in rerun.output and 'stopped early' in rerun.output
    assert 'Train Summary' not in rerun.output
    assert (xp.folder / 'checkpoint.th').read_bytes() == before


def test_solver_ls_shows_an_early_stopped_experiment_as_such(stopped):
    proc = subprocess.run([*SOLVER, 'ls', '--json'], capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'SOLVER_DORA_DIR': str(stopped.folder.parent.parent)})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [row['state'] for row in rows] == ['early-stopped'], rows


# -- history.json only names durable checkpoints ----------------------------------------------------

def saved_epoch(path: Path) -> int:
    """The epoch of a checkpoint file, read through one open file (a replace cannot mix two)."""
    with open(path, 'rb') as f:
        return torch.load(f, map_location='cpu', weights_only=True)['meta']['epoch']


def test_with_async_saves_history_json_never_runs_ahead_of_the_checkpoint(dora_dir):
    overrides = (*BIG, 'optim.epochs=6', 'checkpoint.async_save=true')
    seen: list[tuple[int, int]] = []
    with BackgroundRun(dora_dir, *overrides) as run:
        latest, log = run.folder / 'checkpoint.th', run.folder / 'history.json'
        while run.proc.poll() is None:
            if not log.exists():
                continue
            recorded = len(json.loads(log.read_text()))  # read first: the checkpoint only grows after
            durable = saved_epoch(latest) if latest.exists() else 0
            seen.append((recorded, durable))
            assert recorded <= durable, f"history.json names {recorded} epochs, the checkpoint holds {durable}"
        code, output = run.finish()
    assert code == 0, output
    assert len(history(run.folder)) == 6
    assert len({recorded for recorded, _ in seen}) >= 3, seen  # it was watched through the run


# -- processes: the lock, kill -9 ------------------------------------------------------------------

@pytest.fixture
def training(dora_dir):
    """`training(*overrides)`: a background `dora run`, killed at the end of the test if still going."""
    started: list[BackgroundRun] = []

    def start(*overrides: str) -> BackgroundRun:
        started.append(BackgroundRun(dora_dir, *overrides))
        return started[-1]
    yield start
    for run in started:
        run.kill()


def assert_latest_checkpoint_is_intact(folder: Path) -> None:
    if (folder / 'checkpoint.th').exists():
        envelope.read_checkpoint(folder / 'checkpoint.th')


def test_a_second_run_of_a_running_experiment_is_refused_naming_the_pid(dora, training):
    first = training(*BIG, 'optim.epochs=1000')
    first.wait_for_lock()
    code, output = dora('run', *BIG, 'optim.epochs=1000')
    assert first.proc.poll() is None, 'the first run must still hold the experiment'
    assert code != 0
    assert f'pid {first.proc.pid}' in output


def test_kill_during_a_save_leaves_the_previous_checkpoint_and_the_rerun_completes(dora, training):
    run = training(*BIG)
    latest, temporary = run.folder / 'checkpoint.th', run.folder / f'.checkpoint.th.tmp.{run.proc.pid}'
    run.wait_for(latest.exists, 'first checkpoint')
    run.wait_for(temporary.exists, 'second save')
    run.kill()
    assert envelope.read_checkpoint(latest).meta['epoch'] >= 1  # 1, unless the save won the race
    code, output = dora('run', *BIG)
    assert code == 0, output
    assert 'Resumed from' in output and len(history(run.folder)) == 3
    assert not list(run.folder.glob('.checkpoint*.tmp.*'))


@pytest.mark.slow  # CI time: the fault-injection kill loop of test_reliability covers kills by default
def test_kill_at_random_moments_never_leaves_a_damaged_checkpoint(dora, training):
    moments = random.Random(1234)
    for _ in range(3):
        run = training(*BIG)
        run.wait_for_lock()
        time.sleep(moments.uniform(0.0, 1.5))
        run.kill()
        assert_latest_checkpoint_is_intact(run.folder)
    code, output = dora('run', *BIG)
    assert code == 0, output
    assert len(history(run.folder)) == 3
    assert_latest_checkpoint_is_intact(run.folder)


def test_mid_epoch_saves_without_save_last_never_leave_a_stale_latest(dora, dora_dir):
    args = ('run', 'solver=regression', 'checkpoint.save_last=false', 'checkpoint.save_every=1',
            'checkpoint.every_steps=4')
    code, out = dora(*args)
    assert code == 0, out[-2000:]
    code, out = dora(*args)
    assert code == 0, out[-2000:]
    assert 'is complete' in out
    assert 'Resuming the train stage' not in out
