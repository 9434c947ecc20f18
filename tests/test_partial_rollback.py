"""Partial rollback through real `dora run` and `solver rollback --only`: one layer returns to an
earlier epoch with its optimizer, EMA and best-state entries, the rest stays at the newest point,
the run goes on from the result, and a task doing the same in process ends bit-identical."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import FAULTY, SOLVER, assert_same, assert_same_run, dora_env, run_xp

from solver.checkpointing import envelope

pytestmark = pytest.mark.integration

# The faulty solver without faults is the regression solver: the in-process run below is the same
# solver with one key more. EMA on, so that its entries are rolled back too.
RUN = (*FAULTY, 'checkpoint.save_every=1', 'optim.ema.use=true')
LAYER = 'model.2'  # the second Linear: 2.weight and 2.bias; optimizer indices 2 and 3


def solver(dora_dir: Path, *args: str) -> SimpleNamespace:
    proc = subprocess.run([*SOLVER, *args], env=dora_env(dora_dir), capture_output=True, text=True, timeout=120)
    return SimpleNamespace(code=proc.returncode, out=proc.stdout, err=proc.stderr)


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> SimpleNamespace:
    """A finished 3-epoch run with checkpoint_<epoch>.th for every epoch."""
    return run_xp(tmp_path_factory.mktemp('partial') / 'dora', *RUN)


def copy_of(trained: SimpleNamespace, where: Path) -> SimpleNamespace:
    dora_dir = where / 'dora'
    shutil.copytree(trained.dora_dir, dora_dir, symlinks=True)
    return SimpleNamespace(dora_dir=dora_dir, folder=dora_dir / 'xps' / trained.folder.name, sig=trained.folder.name)


@pytest.fixture(scope='module')
def rolled(trained, tmp_path_factory) -> SimpleNamespace:
    """A copy returned to epoch 2 in full (so that a run can go on), then `--only model.2` to epoch 1."""
    xp = copy_of(trained, tmp_path_factory.mktemp('rolled'))
    assert solver(xp.dora_dir, 'rollback', xp.sig, '--to', 'epoch:2').code == 0
    xp.newest = envelope.read_checkpoint(xp.folder / 'checkpoint_2.th')  # checkpoint.th (epoch 3) moved aside
    xp.result = solver(xp.dora_dir, 'rollback', xp.sig, '--to', 'epoch:1', '--only', LAYER)
    assert xp.result.code == 0, xp.result.err
    return xp


def test_the_named_layer_and_its_optimizer_ema_and_best_entries_equal_epoch_n_and_the_rest_the_newest(rolled):
    merged = envelope.read_checkpoint(rolled.folder / 'checkpoint.th')  # verified: the normal writer wrote it
    epoch1 = envelope.read_checkpoint(rolled.folder / 'checkpoint_1.th').state
    newest = rolled.newest.state
    names = merged.meta['param_names']['optimizer']
    assert names == ['model.0.weight', 'model.0.bias', 'model.2.weight', 'model.2.bias']
    for key in ('0.weight', '0.bias', '2.weight', '2.bias'):
        want = epoch1 if key.startswith('2.') else newest
        assert_same(merged.state['model'][key], want['model'][key], where=key)
        assert_same(merged.state['ema']['state']['model'][key], want['ema']['state']['model'][key], where=key)
        assert_same(merged.state['best_state']['states']['model'][key], want['best_state']['states']['model'][key])
        index = names.index(f'model.{key}')
        assert_same(merged.state['optimizer']['state'][index], want['optimizer']['state'][index], where=key)
    for name in ('rng', 'progress'):
        assert_same(merged.state[name], newest[name], where=name)
    assert merged.state['best_state']['metric'] == newest['best_state']['metric']


def test_the_history_records_what_was_rolled_back_and_the_replaced_file_is_kept(rolled):
    record = {'only': [LAYER], 'epoch': 1, 'from': 'checkpoint_1.th', 'others_from': 'checkpoint_2.th',
              'others_epoch': 2}
    history = json.loads((rolled.folder / 'history.json').read_text())
    assert len(history) == 2
    done = history[-1]['partial_rollback']['1']
    assert {k: v for k, v in done.items() if k != 'time'} == record
    assert envelope.read_checkpoint(rolled.folder / 'checkpoint.th').state['history'] == history
    moved, = (rolled.folder / 'rolled_back').glob('*/checkpoint_2.th')  # a copy, by the partial rollback
    assert_same(envelope.read_checkpoint(moved).state, rolled.newest.state)
    assert 'model.2 returned to the end of epoch 1' in (moved.parent / 'NOTE.txt').read_text()
    report = json.loads((rolled.folder / 'load_report.json').read_text())
    assert sorted(report['loaded']) == ['best_state.states.model.2.bias', 'best_state.states.model.2.weight',
                                        'ema.state.model.2.bias', 'ema.state.model.2.weight', 'model.2.bias',
                                        'model.2.weight', 'optimizer.state.2 (model.2.weight)',
                                        'optimizer.state.3 (model.2.bias)']
    assert '8 entries loaded from checkpoint_1.th, 0 skipped, 8 kept as they were' in rolled.result.out


def test_the_next_run_goes_on_from_it_and_ends_as_the_same_rollback_done_in_process(rolled, tmp_path):
    resumed = run_xp(rolled.dora_dir, *RUN)
    assert 'Resumed from' in resumed.output and 'checkpoint.th (epoch 2' in resumed.output, resumed.output
    assert len(json.loads((rolled.folder / 'history.json').read_text())) == 3
    # A task calling `rollback_partial` at the start of epoch 3 (after epoch 2's save) takes the same entries.
    live = run_xp(tmp_path / 'dora', *RUN, f'+faults.partial_rollback={{epoch:3,to:1,only:[{LAYER}]}}')
    assert f"Partial rollback of {LAYER} to epoch 1: 8 entries loaded from checkpoint_1.th" in live.output
    actual = envelope.read_checkpoint(live.folder / 'checkpoint.th').state
    expected = envelope.read_checkpoint(rolled.folder / 'checkpoint.th').state
    assert actual['history'][2]['partial_rollback']['1']['in_process'] is True
    for name in ('model', 'optimizer', 'ema', 'best_state', 'rng', 'progress'):
        assert_same(actual[name], expected[name], ordered=False, where=name)


def test_a_prefix_matching_nothing_is_refused_in_one_line_and_nothing_changes(trained, tmp_path):
    xp = copy_of(trained, tmp_path)
    before = (xp.folder / 'checkpoint.th').read_bytes()
    for only, why in (('model.20', "--only model.20: matches nothing in 'model'"),
                      ('optimizer', "--only optimizer: 'optimizer' is not a module state")):
        result = solver(xp.dora_dir, 'rollback', xp.sig, '--to', 'epoch:1', '--only', only)
        assert result.code == 2 and why in result.err and result.err.count('\n') == 1, result.err
    result = solver(xp.dora_dir, 'rollback', xp.sig, '--to', 'epoch:7', '--only', LAYER)
    assert result.code == 2 and 'points to return to: epoch:1' in result.err
    assert (xp.folder / 'checkpoint.th').read_bytes() == before and not (xp.folder / 'rolled_back').exists()
    assert_same_run(xp.folder, trained.folder)
