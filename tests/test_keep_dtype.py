"""`checkpoint.keep_dtype`: epoch files kept for good become bf16 weights-only files, through
real `dora run` and `solver` processes: never resumed or rolled back to, read by
`continue_from`, `execute_only` and `solver export`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REGRESSION, SOLVER, run_xp

from solver.checkpointing import envelope

pytestmark = pytest.mark.integration
# epoch files at 2 and 4 (keep_every), the newest alone among keep_last: checkpoint_2.th is kept for good
KEPT = (*REGRESSION, 'optim.epochs=4', 'checkpoint.keep_every=2', 'checkpoint.keep_last=1',
        'checkpoint.keep_dtype=bf16')


@pytest.fixture(scope='module')
def kept(dora_tools, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp('keep_dtype')  # mirrored too (checkpoint.remote: not in the signature)
    found = run_xp(root / 'dora', *KEPT, f'checkpoint.remote=file://{root}/remote')
    found.remote = root / 'remote' / found.folder.name
    return found


def solver(dora_tools, dora_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SOLVER, *args], cwd=dora_tools.root, env=dora_tools.env(dora_dir),
                          capture_output=True, text=True, timeout=120)


def test_a_file_kept_for_good_is_its_best_state_alone_in_bf16_marked_weights_only(kept):
    reduced = envelope.read_checkpoint(kept.folder / 'checkpoint_2.th')  # verified: digests of the bf16 bytes
    assert set(reduced.state) == {'best_state'}
    floats = [t for state in reduced.state['best_state']['states'].values() for t in state.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    assert reduced.meta['weights_only'] == 'bf16' and reduced.meta['partial'] == ['best_state']
    assert reduced.meta['epoch'] == 2 and 'metric' in reduced.meta  # still ranked by retention
    newest = envelope.read_checkpoint(kept.folder / 'checkpoint_4.th')  # among keep_last: whole
    assert {'model', 'optimizer', 'best_state'} <= set(newest.state) and 'weights_only' not in newest.meta
    assert 'Kept checkpoint_2.th for good as weights only' in kept.output


def test_the_remote_mirror_holds_the_weights_only_file_as_it_now_is(kept):
    assert (kept.remote / 'checkpoint_2.th').read_bytes() == (kept.folder / 'checkpoint_2.th').read_bytes()


def test_solver_ls_says_which_files_are_weights_only(dora_tools, kept):
    result = solver(dora_tools, kept.dora_dir, 'ls', kept.folder.name, '--json')
    holds = {r['file']: r['holds'] for r in json.loads(result.stdout)}
    assert holds == {'checkpoint_2.th': 'weights only (bf16), not resumable', 'checkpoint_4.th': 'full',
                     'checkpoint.th': 'full'}


def test_a_resume_never_takes_a_weights_only_file(dora_tools, kept, tmp_path):
    dora_dir = tmp_path / 'dora'
    shutil.copytree(kept.dora_dir, dora_dir, symlinks=True)
    folder = dora_dir / 'xps' / kept.folder.name
    for name in ('checkpoint.th', 'checkpoint_4.th'):
        (folder / name).write_bytes(b'')
    code, output = dora_tools.run(dora_dir, 'run', *KEPT)
    assert code != 0
    assert 'checkpoint_2.th is weights only (its best state in bf16, checkpoint.keep_dtype): it cannot resume' in output
    assert 'can resume the run, refusing to start over silently' in output


def test_rollback_does_not_offer_a_weights_only_file(dora_tools, kept, tmp_path):
    dora_dir = tmp_path / 'dora'
    shutil.copytree(kept.dora_dir, dora_dir, symlinks=True)
    result = solver(dora_tools, dora_dir, 'rollback', kept.folder.name, '--to', 'epoch:2')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'holds the end of epoch 2' in result.stderr and 'epoch:4' in result.stderr


def test_continue_from_execute_only_and_export_read_a_weights_only_file(dora_tools, kept, tmp_path):
    source = kept.folder / 'checkpoint_2.th'
    code, output = dora_tools.run(tmp_path / 'dora', 'run', *REGRESSION, f'continue_from={source}',
                                  'execute_only=evaluate')
    assert code == 0, output
    assert f'Continuing from the best state of {source}' in output and 'cast to this model' in output
    target = tmp_path / 'exported.th'
    result = solver(dora_tools, kept.dora_dir, 'export', str(source), str(target))
    assert result.returncode == 0, result.stderr
    exported = envelope.read_checkpoint(target)
    reduced = envelope.read_checkpoint(source)
    for name, state in reduced.state['best_state']['states'].items():
        for key, value in state.items():
            assert torch.equal(exported.state['best_state']['states'][name][key], value.float())
