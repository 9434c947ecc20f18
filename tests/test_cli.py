"""The `solver` command line, run as a user runs it: the installed console script, in a subprocess.

The experiments are real `dora run`s of the regression solver (and the drum debug solver for
TensorBoard); edits (rollback, prune) and damage are made on copies of them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import DORA, SOLVER, damage_a_tensor

from solver.checkpointing import envelope
from solver.checkpointing.lock import ExperimentLock

pytestmark = pytest.mark.integration  # every test runs the installed `solver` script

RUN = ('solver=regression', 'checkpoint.save_every=1', 'optim.epochs=3')
COMMANDS = ('ls', 'show', 'verify', 'diff', 'export', 'rollback', 'prune')


@pytest.fixture(scope='session')
def solver(dora_tools) -> tp.Callable[..., SimpleNamespace]:
    """`solver(dora_dir, *args)`: runs `solver <args>` with `dora_dir` as the Dora folder; returns
    its exit code, stdout and stderr."""
    def run(dora_dir: Path, *args: str) -> SimpleNamespace:
        proc = subprocess.run([*SOLVER, *args], cwd=dora_tools.root, env=dora_tools.env(dora_dir),
                              capture_output=True, text=True, timeout=120)
        return SimpleNamespace(code=proc.returncode, out=proc.stdout, err=proc.stderr)
    return run


def one_line_error(result: SimpleNamespace) -> str:
    """The error of a refused command: one line on stderr, never a traceback."""
    assert 'Traceback' not in result.err and result.err.count('\n') == 1, result.err
    return result.err


@pytest.fixture(scope='module')
def xp(dora_tools, tmp_path_factory) -> SimpleNamespace:
    """A finished 3-epoch regression experiment with checkpoint_<epoch>.th for every epoch."""
    dora_dir = tmp_path_factory.mktemp('cli') / 'dora'
    code, output = dora_tools.run(dora_dir, 'run', *RUN)
    assert code == 0, output
    folder = dora_tools.folder(dora_dir, *RUN)
    return SimpleNamespace(dora_dir=dora_dir, folder=folder, sig=folder.name)


@pytest.fixture
def copy(xp, tmp_path) -> SimpleNamespace:
    """A private copy of the experiment's Dora folder, to edit or damage."""
    dora_dir = tmp_path / 'dora'
    shutil.copytree(xp.dora_dir, dora_dir, symlinks=True)
    return SimpleNamespace(dora_dir=dora_dir, folder=dora_dir / 'xps' / xp.sig, sig=xp.sig)



# -- help and arguments ---------------------------------------------------------------------------

def test_help_lists_every_subcommand_and_each_has_an_example(solver, tmp_path, capsys):
    top = solver(tmp_path, '--help')
    assert top.code == 0 and all(name in top.out for name in COMMANDS)
    from solver import cli  # the subcommands' help in this process: the script's start-up once is enough
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exited:
            cli.main([name, '--help'])
        out = capsys.readouterr().out
        assert exited.value.code == 0 and 'example:' in out and f'solver {name}' in out, out


@pytest.mark.integration
def test_an_unknown_signature_is_one_line_naming_the_near_ones(solver, xp):
    result = solver(xp.dora_dir, 'show', xp.sig[:-1] + ('0' if xp.sig[-1] != '0' else '1'))
    assert result.code == 2
    assert xp.sig in one_line_error(result) and 'neither a file, a folder nor a signature' in result.err


def test_a_file_that_is_not_a_checkpoint_is_one_line(solver, tmp_path):
    path = tmp_path / 'notes.th'
    path.write_text('hello')
    shown = solver(tmp_path, 'show', str(path))
    assert shown.code == 2 and 'not a torch zip archive' in one_line_error(shown)
    verified = solver(tmp_path, 'verify', str(path))
    assert verified.code == 1 and str(path) in verified.out and 'DAMAGED' in verified.out


def test_a_folder_without_checkpoint_is_one_line(solver, tmp_path):
    result = solver(tmp_path, 'verify', str(tmp_path))
    assert result.code == 1 and 'holds no checkpoint' in one_line_error(result)
    assert solver(tmp_path, 'ls', str(tmp_path)).code == 2


# -- ls and show -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_ls_lists_each_experiment_with_its_progress_best_metric_and_state(solver, xp):
    result = solver(xp.dora_dir, 'ls')
    assert result.code == 0
    row = next(line for line in result.out.splitlines() if line.startswith(xp.sig))
    assert '3/3' in row and 'complete' in row and 'checkpoint.save_every=1' in row and 'valid.loss' in row
    record, = json.loads(solver(xp.dora_dir, 'ls', '--json').out)
    history = json.loads((xp.folder / 'history.json').read_text())
    best = min(range(3), key=lambda i: history[i]['valid']['loss'])
    assert record['sig'] == xp.sig and record['overrides'] == list(RUN)
    assert (record['epochs'], record['planned'], record['state'], record['pid']) == (3, 3, 'complete', None)
    assert record['best'] == {'metric': 'valid.loss', 'value': history[best]['valid']['loss'], 'epoch': best + 1}


@pytest.mark.integration
def test_ls_shows_a_running_experiment_with_the_pid_holding_its_lock(solver, copy):
    import os
    with ExperimentLock(copy.folder):
        record, = json.loads(solver(copy.dora_dir, 'ls', '--json').out)
    assert (record['state'], record['pid']) == ('running', os.getpid())
    record, = json.loads(solver(copy.dora_dir, 'ls', '--json').out)
    assert (record['state'], record['pid']) == ('complete', None)


@pytest.mark.integration
def test_ls_of_an_experiment_lists_its_checkpoints_and_verify_names_a_damaged_one(solver, copy):
    records = json.loads(solver(copy.dora_dir, 'ls', copy.sig, '--json').out)
    assert [(r['file'], r['epoch'], r['step']) for r in records] == [
        ('checkpoint_1.th', 1, 16), ('checkpoint_2.th', 2, 32), ('checkpoint_3.th', 3, 48), ('checkpoint.th', 3, 48)]
    assert all(r['size'] == (copy.folder / r['file']).stat().st_size for r in records)
    damage_a_tensor(copy.folder / 'checkpoint_2.th')
    result = solver(copy.dora_dir, 'ls', str(copy.folder), '--verify')
    assert result.code == 1
    lines = {line.split()[0]: line for line in result.out.splitlines()[1:]}
    assert 'DAMAGED' in lines['checkpoint_2.th'] and lines['checkpoint_1.th'].endswith('intact')


@pytest.mark.integration
def test_show_gives_metadata_config_against_the_defaults_and_last_metrics(solver, xp):
    data = json.loads(solver(xp.dora_dir, 'show', xp.sig, '--json').out)
    assert data['meta']['epoch'] == 3 and data['meta']['sig'] == xp.sig and data['meta']['versions']['git']
    assert 'checkpoint.save_every=1' in data['config_overrides'] and 'optim.epochs=3' in data['config_overrides']
    assert 'solver_class="solver.regression.RegressionSolver"' in data['config_overrides']
    history = json.loads((xp.folder / 'history.json').read_text())
    assert data['last_metrics']['valid'] == history[-1]['valid']
    text = solver(xp.dora_dir, 'show', str(xp.folder / 'checkpoint_1.th')).out
    assert 'epoch 1, step 16' in text and 'checkpoint.save_every=1' in text


# -- verify ----------------------------------------------------------------------------------------

@pytest.mark.integration
def test_verify_exits_0_when_intact_and_1_naming_the_damaged_file(solver, copy):
    intact = solver(copy.dora_dir, 'verify', copy.sig, '--json')
    assert intact.code == 0 and json.loads(intact.out)['intact'] and len(json.loads(intact.out)['files']) == 4
    damage_a_tensor(copy.folder / 'checkpoint.th')
    damaged = solver(copy.dora_dir, 'verify', copy.sig)
    assert damaged.code == 1 and 'Traceback' not in damaged.err
    line = next(line for line in damaged.out.splitlines() if line.startswith(str(copy.folder / 'checkpoint.th')))
    assert 'DAMAGED' in line and ('digest' in line or 'damaged' in line)


# -- diff ------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_diff_of_a_checkpoint_with_itself_is_identical(solver, xp):
    result = solver(xp.dora_dir, 'diff', f'{xp.sig[:4]}/checkpoint_3.th', xp.sig)
    assert result.code == 0 and ' 0 differ' in result.out and 'only in A' in result.out


@pytest.mark.integration
def test_diff_of_two_epochs_gives_the_largest_differences_of_each_tensor(solver, xp):
    a, b = (envelope.read_checkpoint(xp.folder / f'checkpoint_{n}.th').state['model'] for n in (1, 2))
    result = solver(xp.dora_dir, 'diff', str(xp.folder / 'checkpoint_1.th'), str(xp.folder / 'checkpoint_2.th'),
                    '--states', 'model', '--json')
    assert result.code == 1
    entries = {e['name']: e for e in json.loads(result.out)['entries']}
    assert set(entries) == {f'model.{key}' for key in a}
    for key in a:
        delta = (a[key].double() - b[key].double()).abs().max().item()
        assert entries[f'model.{key}']['status'] == 'differs'
        assert entries[f'model.{key}']['max_abs'] == pytest.approx(delta, rel=1e-12)


def test_diff_names_shape_and_dtype_mismatches_and_entries_on_one_side(solver, tmp_path):
    meta = {'epoch': 1, 'step': 1}
    envelope.write_checkpoint(tmp_path / 'a.th', {'model': {'w': torch.zeros(2, 3), 'b': torch.zeros(3),
                                                              'gone': torch.ones(1)}}, meta)
    envelope.write_checkpoint(tmp_path / 'b.th', {'model': {'w': torch.zeros(3, 2), 'b': torch.zeros(3).half(),
                                                              'new': torch.ones(1)}}, meta)
    result = solver(tmp_path, 'diff', str(tmp_path / 'a.th'), str(tmp_path / 'b.th'), '--json')
    statuses = {e['name']: e['status'] for e in json.loads(result.out)['entries']}
    assert result.code == 1 and statuses == {'model.w': 'mismatch', 'model.b': 'mismatch',
                                             'model.gone': 'only_a', 'model.new': 'only_b'}
    text = solver(tmp_path, 'diff', str(tmp_path / 'a.th'), str(tmp_path / 'b.th')).out
    assert 'float32[2, 3] vs float32[3, 2]' in text and 'only in B' in text
    assert text.strip().endswith('4 entries: 0 equal, 0 differ, 2 shape/dtype/type mismatch, 1 only in A, 1 only in B')


# -- export ----------------------------------------------------------------------------------------

READ_SAFETENSORS = """
import json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], 'pt') as f:
    meta = f.metadata()
    out = {'meta': meta, 'tensors': {k: [str(f.get_tensor(k).dtype), f.get_tensor(k).sum().item()] for k in f.keys()}}
assert not [m for m in sys.modules if m == 'solver' or m.startswith('solver.')]
print(json.dumps(out))
"""


@pytest.mark.integration
def test_export_safetensors_is_readable_by_safetensors_alone_with_config_and_provenance(solver, xp, tmp_path):
    target = tmp_path / 'model.safetensors'
    result = solver(xp.dora_dir, 'export', xp.sig, str(target), '--format', 'safetensors', '--dtype', 'bf16')
    assert result.code == 0, result.err
    proc = subprocess.run([sys.executable, '-I', '-c', READ_SAFETENSORS, str(target)], capture_output=True,
                          text=True, timeout=60)  # -I: no PYTHONPATH, so no way to import this project
    assert proc.returncode == 0, proc.stderr
    read = json.loads(proc.stdout)
    best = envelope.read_checkpoint(xp.folder / 'checkpoint.th').state['best_state']['states']['model']
    assert set(read['tensors']) == {f'model.{key}' for key in best}
    for key, value in best.items():
        dtype, total = read['tensors'][f'model.{key}']
        assert dtype == 'torch.bfloat16' and total == value.to(torch.bfloat16).sum().item()
    meta = read['meta']
    assert json.loads(meta['sig']) == xp.sig and json.loads(meta['epoch']) == 3 and json.loads(meta['git_commit'])
    assert json.loads(meta['config'])['checkpoint']['save_every'] == 1


@pytest.mark.integration
def test_export_th_is_what_continue_from_pretrained_reads(solver, xp, dora_tools, tmp_path):
    pretrained = tmp_path / 'pretrained'
    result = solver(xp.dora_dir, 'export', xp.sig, str(pretrained / 'reg.th'), '--latest')
    assert result.code == 0 and 'latest state' in result.out, result.err
    latest = envelope.read_checkpoint(xp.folder / 'checkpoint.th').state['model']
    exported = envelope.read_checkpoint(pretrained / 'reg.th')
    assert set(exported.state) == {'best_state'}
    assert all(torch.equal(exported.state['best_state']['states']['model'][k], v) for k, v in latest.items())
    dora_dir = tmp_path / 'dora'
    proc = subprocess.run([*DORA, 'run', 'solver=regression', 'continue_from=//pretrained/reg', 'optim.epochs=1',
                           'optim.lr=0'], cwd=dora_tools.root, capture_output=True, text=True, timeout=120,
                          env={**dora_tools.env(dora_dir), 'SOLVER_PRETRAINED_DIR': str(pretrained)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = dora_tools.folder(dora_dir, 'solver=regression', 'continue_from=//pretrained/reg', 'optim.epochs=1',
                               'optim.lr=0')
    model = envelope.read_checkpoint(folder / 'checkpoint.th').state['model']
    assert all(torch.equal(model[k], v) for k, v in latest.items())


# -- rollback --------------------------------------------------------------------------------------

@pytest.mark.integration
def test_rollback_then_rerun_finishes_bit_identical_to_the_original_run(solver, copy, dora_tools):
    original = envelope.read_checkpoint(copy.folder / 'checkpoint.th')
    history = json.loads((copy.folder / 'history.json').read_text())
    result = solver(copy.dora_dir, 'rollback', copy.sig, '--to', 'epoch:1')
    assert result.code == 0 and 'rolled back to the end of epoch 1' in result.out, result.err
    assert json.loads((copy.folder / 'history.json').read_text()) == history[:1]
    assert sorted(p.name for p in copy.folder.glob('checkpoint*.th')) == ['checkpoint_1.th']
    moved, = (copy.folder / 'rolled_back').iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ['NOTE.txt', 'checkpoint.th', 'checkpoint_2.th',
                                                       'checkpoint_3.th', 'history.json', 'samples']
    assert sorted(p.name for p in (moved / 'samples').iterdir()) == ['epoch_2', 'epoch_3']
    assert json.loads((moved / 'history.json').read_text()) == history
    assert 'epoch 1' in (moved / 'NOTE.txt').read_text()

    code, output = dora_tools.run(copy.dora_dir, 'run', *RUN)
    assert code == 0 and 'Resumed from' in output and 'checkpoint_1.th' in output, output
    final = envelope.read_checkpoint(copy.folder / 'checkpoint.th')
    states = [name for name in original.state if name != 'history']  # history holds durations
    same = solver(copy.dora_dir, 'diff', str(moved / 'checkpoint.th'), copy.sig, '--states', ','.join(states))
    assert same.code == 0, same.out
    drop = lambda h: [{s: {k: v for k, v in m.items() if k != 'duration'} for s, m in e.items()} for e in h]  # noqa: E731
    assert drop(final.state['history']) == drop(history)
    assert drop(json.loads((copy.folder / 'history.json').read_text())) == drop(history)


@pytest.mark.integration
def test_rollback_to_best_returns_to_the_epoch_of_the_best_valid_metric(solver, copy):
    history = json.loads((copy.folder / 'history.json').read_text())
    best = 1 + min(range(3), key=lambda i: history[i]['valid']['loss'])
    result = solver(copy.dora_dir, 'rollback', str(copy.folder), '--to', 'best')
    assert result.code == 0 and f'end of epoch {best}' in result.out
    assert len(json.loads((copy.folder / 'history.json').read_text())) == best


@pytest.mark.integration
def test_rollback_to_a_point_no_kept_checkpoint_holds_lists_the_points(solver, copy):
    (copy.folder / 'checkpoint_2.th').unlink()
    result = solver(copy.dora_dir, 'rollback', copy.sig, '--to', 'epoch:2')
    error = one_line_error(result)
    assert result.code == 2 and 'epoch:1 (checkpoint_1.th), epoch:3 (checkpoint_3.th)' in error
    assert len(json.loads((copy.folder / 'history.json').read_text())) == 3
    assert not (copy.folder / 'rolled_back').exists()


@pytest.mark.integration
def test_rollback_is_refused_while_the_experiment_runs(solver, copy):
    import os
    with ExperimentLock(copy.folder):
        result = solver(copy.dora_dir, 'rollback', copy.sig, '--to', 'epoch:1')
    assert result.code == 1 and f'pid {os.getpid()}' in one_line_error(result)
    assert len(list(copy.folder.glob('checkpoint*.th'))) == 4


# -- prune -----------------------------------------------------------------------------------------

@pytest.mark.integration
def test_prune_is_a_dry_run_unless_yes_and_never_removes_the_newest(solver, copy):
    dry = solver(copy.dora_dir, 'prune', copy.sig, '--keep-last', '1')
    assert dry.code == 0 and 'dry run: 2 file(s)' in dry.out
    assert len(list(copy.folder.glob('checkpoint_*.th'))) == 3
    done = solver(copy.dora_dir, 'prune', copy.sig, '--keep-last', '1', '--yes')
    assert done.code == 0 and 'removed checkpoint_1.th' in done.out
    assert sorted(p.name for p in copy.folder.glob('checkpoint*.th')) == ['checkpoint.th', 'checkpoint_3.th']
    assert solver(copy.dora_dir, 'prune', copy.sig, '--keep-last', '0').code == 2


def rewrite_meta(path: Path, **changes: tp.Any) -> None:
    """Rewrite a checkpoint file with its metadata changed (None: the key removed), digests and all."""
    found = envelope.read_checkpoint(path)
    meta = {key: value for key, value in {**found.meta, **changes}.items() if value is not None}
    envelope.write_checkpoint(path, found.state, meta)


@pytest.mark.integration
@pytest.mark.parametrize('ranked_by', ['metadata', 'history'])
def test_prune_keeps_the_best_k_epoch_files_when_the_config_keeps_best(solver, copy, ranked_by):
    # Each file is ranked by the metric it records, as the run ranked it; files written before
    # the metric was recorded are ranked by history.json.
    history = json.loads((copy.folder / 'history.json').read_text())
    best = 1 + min(range(2), key=lambda i: history[i]['valid']['loss'])  # best of the two older epochs
    config = copy.folder / '.hydra' / 'config.yaml'
    text = config.read_text()
    assert '  keep_best: null\n' in text  # the recorded config of a run made without keep_best
    config.write_text(text.replace('  keep_best: null\n', '  keep_best: 1\n', 1))
    if ranked_by == 'metadata':  # make it the best of all, so keep_best=1 holds it
        rewrite_meta(copy.folder / f'checkpoint_{best}.th', metric=-1.0)
    else:
        for path in copy.folder.glob('checkpoint_*.th'):
            rewrite_meta(path, metric=None)
        history[best - 1]['valid']['loss'] = -1.0
        (copy.folder / 'history.json').write_text(json.dumps(history))
    result = solver(copy.dora_dir, 'prune', copy.sig, '--keep-last', '1', '--yes')
    assert result.code == 0 and f'keep    checkpoint_{best}.th (among the best 1' in result.out, result.out
    assert sorted(p.name for p in copy.folder.glob('checkpoint_*.th')) == sorted(
        {f'checkpoint_{best}.th', 'checkpoint_3.th'})


@pytest.mark.integration
def test_prune_keeps_the_keep_every_files_of_the_config(solver, copy):
    config = copy.folder / '.hydra' / 'config.yaml'
    config.write_text(config.read_text().replace('  keep_every: null\n', '  keep_every: 2\n', 1))
    result = solver(copy.dora_dir, 'prune', copy.sig, '--keep-last', '1', '--yes')
    assert result.code == 0 and 'keep    checkpoint_2.th (a multiple of 2 epochs)' in result.out, result.out
    assert sorted(p.name for p in copy.folder.glob('checkpoint_*.th')) == ['checkpoint_2.th', 'checkpoint_3.th']


# -- TensorBoard -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_tensorboard_shows_each_stage_piano_rolls_and_hyperparameters_under_the_signature(dora_tools, tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    overrides = ('solver=drum_rnn/debug', 'logging.log_tensorboard=true')
    code, output = dora_tools.run(tmp_path, 'run', *overrides)
    assert code == 0, output
    sig = dora_tools.folder(tmp_path, *overrides).name
    events = EventMultiplexer()
    events.AddRunsFromDirectory(str(tmp_path / 'xps'))  # what `tensorboard --logdir outputs/xps` reads
    events.Reload()
    tags: dict[str, tp.Any] = events.Runs()[f'{sig}/tensorboard']
    for stage in ('train', 'valid', 'evaluate', 'generate'):
        assert [e.step for e in events.Scalars(f'{sig}/tensorboard', f'{stage}/duration')] == [1, 2]
    assert {'generate/sample_00', 'generate/sample_01'} <= set(tags['images'])
    assert [e.step for e in events.Images(f'{sig}/tensorboard', 'generate/sample_00')] == [1, 2]
    assert '_hparams_/session_start_info' in events.PluginRunToTagToContent('hparams')[f'{sig}/tensorboard']
