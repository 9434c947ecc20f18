"""Lineage and partial loading through real `dora run` and `solver` commands: a pretrain, a
fine-tune of it and a fine-tune of that; what each records of its source, `solver ls --tree`,
`solver show`'s ancestors, `solver rollback --to start`, and `checkpoint.strict`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import REGRESSION, SOLVER, assert_same, assert_same_run, dora_env, run_dora, run_xp, xp_folder

from solver.checkpointing import envelope

pytestmark = pytest.mark.integration


def solver(dora_dir: Path, *args: str) -> SimpleNamespace:
    proc = subprocess.run([*SOLVER, *args], env=dora_env(dora_dir), capture_output=True, text=True, timeout=120)
    return SimpleNamespace(code=proc.returncode, out=proc.stdout, err=proc.stderr)


@pytest.fixture(scope='module')
def family(tmp_path_factory) -> SimpleNamespace:
    """A pretrain (3 epochs), a fine-tune of it (2 epochs, lr / 10), and a fine-tune of that
    without its last layer (1 epoch, `ignore_state_keys`)."""
    dora_dir = tmp_path_factory.mktemp('lineage') / 'dora'
    pre = run_xp(dora_dir, *REGRESSION)
    tune = (*REGRESSION, f'continue_from=//sig/{pre.folder.name}', 'optim.epochs=2', 'optim.lr=0.001')
    first = run_xp(dora_dir, *tune)
    second = run_xp(dora_dir, *REGRESSION, f'continue_from={first.folder}', 'optim.epochs=1',
                    'checkpoint.ignore_state_keys=[model.2]')
    return SimpleNamespace(dora_dir=dora_dir, pre=pre.folder, first=first.folder, second=second.folder,
                           tune=tune, first_output=first.output)


def test_a_fine_tune_records_its_source_and_the_digest_of_what_it_took(family):
    entry = json.loads((family.first / 'lineage.json').read_text())
    source = envelope.read_checkpoint(family.pre / 'checkpoint.th')
    assert {k: entry[k] for k in ('continue_from', 'sig', 'checkpoint', 'epoch', 'step', 'taken', 'skipped')} == {
        'continue_from': f'//sig/{family.pre.name}', 'sig': family.pre.name,
        'checkpoint': str(family.pre / 'checkpoint.th'), 'epoch': 3, 'step': 48, 'taken': 4, 'skipped': 0}
    start = envelope.read_checkpoint(family.first / 'start.th')  # the state it started from, verified
    assert start.meta['epoch'] == 0 and start.meta['sig'] == family.first.name and start.meta['lineage'] == entry
    assert_same(start.state['model'], source.state['best_state']['states']['model'], ordered=False)
    assert start.state['optimizer']['state'] == {} and start.state['history'] == []
    assert "4 entries loaded from" in family.first_output and 'listed in load_report.json' in family.first_output
    second = json.loads((family.second / 'lineage.json').read_text())
    assert second['sig'] == family.first.name and second['skipped'] == 2  # model.2.weight and .bias, ignored
    report = json.loads((family.second / 'load_report.json').read_text())
    assert report['skipped'] == {'model.2.weight': 'ignored: checkpoint.ignore_state_keys',
                                 'model.2.bias': 'ignored: checkpoint.ignore_state_keys'}


def test_ls_tree_shows_the_fine_tunes_under_their_sources(family):
    result = solver(family.dora_dir, 'ls', '--tree')
    assert result.code == 0, result.err
    rows = [line.split()[:2] for line in result.out.splitlines()[1:]]
    assert rows == [[family.pre.name, '3/3'], ['└─', family.first.name], ['└─', family.second.name]]
    assert result.out.splitlines()[3].startswith('   └─ ')  # the grandchild one level deeper
    listed = json.loads(solver(family.dora_dir, 'ls', '--tree', '--json').out)
    assert [(r['sig'], r['depth']) for r in listed] == [(family.pre.name, 0), (family.first.name, 1),
                                                        (family.second.name, 2)]


def test_show_lists_the_ancestors_with_the_config_changes_along_each_edge(family):
    shown = json.loads(solver(family.dora_dir, 'show', family.second.name, '--json').out)['ancestors']
    assert [(a['sig'], a['found'], a['epoch']) for a in shown] == [(family.first.name, True, 2),
                                                                  (family.pre.name, True, 3)]
    assert 'optim.epochs=1' in shown[0]['config_changes'] and 'checkpoint.ignore_state_keys=["model.2"]' \
        in shown[0]['config_changes']
    assert 'optim.lr=0.001' in shown[1]['config_changes'] and 'optim.epochs=2' in shown[1]['config_changes']
    text = solver(family.dora_dir, 'show', family.second.name).out
    assert f"started from {family.first.name}: {family.first}, epoch 2" in text
    assert f"config against {family.pre.name}: continue_from=" in text


def test_rollback_to_start_then_rerun_ends_bit_identical_to_the_fine_tune_and_keeps_its_lineage(family, tmp_path):
    dora_dir = tmp_path / 'dora'
    shutil.copytree(family.dora_dir, dora_dir, symlinks=True)
    folder = dora_dir / 'xps' / family.first.name
    lineage = (folder / 'lineage.json').read_bytes()
    result = solver(dora_dir, 'rollback', family.first.name, '--to', 'start')
    assert result.code == 0 and 'returned to its start' in result.out, result.err
    assert json.loads((folder / 'history.json').read_text()) == []
    assert sorted(p.name for p in folder.glob('checkpoint*.th')) == ['checkpoint_0.th']
    code, output = run_dora(dora_dir, 'run', *family.tune)
    assert code == 0 and 'checkpoint_0.th (epoch 0, step 0)' in output, output
    assert_same_run(folder, family.first)
    assert (folder / 'lineage.json').read_bytes() == lineage  # a resume keeps the record of the start


def test_rollback_to_start_is_refused_without_a_lineage_or_with_an_altered_start(family, tmp_path):
    dora_dir = tmp_path / 'dora'
    shutil.copytree(family.dora_dir, dora_dir, symlinks=True)
    result = solver(dora_dir, 'rollback', family.pre.name, '--to', 'start')
    assert result.code == 2 and 'was not started by continue_from' in result.err and result.err.count('\n') == 1
    folder = dora_dir / 'xps' / family.first.name
    start = envelope.read_checkpoint(folder / 'start.th')
    start.state['model']['0.bias'] += 1  # a start.th rewritten, intact, but not the state the run took
    envelope.write_checkpoint(folder / 'start.th', start.state, start.meta)
    result = solver(dora_dir, 'rollback', family.first.name, '--to', 'start')
    assert result.code == 2 and 'does not hold the start lineage.json records' in result.err, result.err
    assert_same_run(folder, family.first)
    assert not (folder / 'rolled_back').exists() and not (folder / 'checkpoint_0.th').exists()


def test_a_partial_rollback_to_start_returns_one_layer_to_what_continue_from_gave_it(family, tmp_path):
    dora_dir = tmp_path / 'dora'
    shutil.copytree(family.dora_dir, dora_dir, symlinks=True)
    folder = dora_dir / 'xps' / family.first.name
    newest = envelope.read_checkpoint(folder / 'checkpoint.th').state
    result = solver(dora_dir, 'rollback', family.first.name, '--to', 'start', '--only', 'model.2')
    assert result.code == 0 and 'model.2 returned to its start (start.th)' in result.out, result.err
    merged = envelope.read_checkpoint(folder / 'checkpoint.th').state
    start = envelope.read_checkpoint(folder / 'start.th').state
    for key in ('0.weight', '2.weight'):
        assert_same(merged['model'][key], (start if key.startswith('2.') else newest)['model'][key], where=key)
    assert sorted(merged['optimizer']['state']) == [0, 1]  # model.2's Adam moments are fresh again, as at the start
    assert_same(merged['optimizer']['state'][0], newest['optimizer']['state'][0])


def test_strict_refuses_a_source_that_does_not_fit_and_strict_false_loads_what_fits(family, dora_dir):
    smaller = (*REGRESSION, f'continue_from=//sig/{family.pre.name}', 'optim.epochs=1', 'model.hidden_size=16')
    code, output = run_dora(family.dora_dir, 'run', *smaller)
    last = output.strip().splitlines()[-1]
    assert code == 1 and 'does not fit this model: model.0.weight: shape differs: [32, 8] in the source, [16, 8]' \
        in last and 'checkpoint.strict=false' in last and 'Traceback' not in output, output
    folder = xp_folder(family.dora_dir, *smaller)
    assert not list(folder.glob('*.th'))
    code, output = run_dora(family.dora_dir, 'run', *smaller, 'checkpoint.strict=false')  # the same experiment
    assert code == 0 and '1 entries loaded from' in output and '3 skipped (3 shape differs)' in output, output
    report = json.loads((folder / 'load_report.json').read_text())
    assert report['loaded'] == ['model.2.bias'] and sorted(report['skipped']) == ['model.0.bias', 'model.0.weight',
                                                                                 'model.2.weight']
    source = envelope.read_checkpoint(family.pre / 'checkpoint.th').state['best_state']['states']['model']
    start = envelope.read_checkpoint(folder / 'start.th').state['model']
    assert_same(start['2.bias'], source['2.bias'])
