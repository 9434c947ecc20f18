"""`solver new`: a project of one's own, in its own folder, installed into this interpreter's
environment, trained through real `dora run`, killed with SIGKILL, resumed, fine-tuned with
continue_from, and looked at with the `solver` command, exactly as the drum RNN is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DORA, SOLVER, dora_env

from solver import cli

NAME = 'beat_task'


def test_a_bad_project_name_is_refused_in_one_line(tmp_path, capsys):
    assert cli.main(['new', 'Not-A-Name', '--dir', str(tmp_path)]) == 2
    assert 'lowercase Python identifier' in capsys.readouterr().err
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / 'keep.txt').write_text('mine')
    assert cli.main(['new', NAME, '--dir', str(tmp_path)]) == 2
    assert 'already exists' in capsys.readouterr().err
    assert (tmp_path / NAME / 'keep.txt').read_text() == 'mine'


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    """A project written by `solver new`, installed (editable) into this environment, then
    uninstalled."""
    parent = tmp_path_factory.mktemp('code')
    proc = subprocess.run([*SOLVER, 'new', NAME, '--dir', str(parent)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    root = parent / NAME
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation', '-e',
                    str(root)], check=True, capture_output=True, timeout=300)
    yield root
    subprocess.run([sys.executable, '-m', 'pip', 'uninstall', '--quiet', '--yes', NAME], capture_output=True,
                   timeout=300)


def env_of(project: Path) -> dict[str, str]:
    """The environment of a user in their project: no SOLVER_DORA_DIR, no test folder on the path."""
    return {k: v for k, v in dora_env(project).items() if k not in ('SOLVER_DORA_DIR', 'PYTHONPATH')}


def dora(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DORA, *args], cwd=project, env=env_of(project), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.integration
def test_a_new_project_trains_is_killed_resumes_and_fine_tunes(project: Path):
    overrides = [f'solver={NAME}', 'optim.epochs=2', 'dataset.train_size=32768']  # epochs of about a second
    history = project / 'outputs' / 'xps'
    log = project / 'run.log'
    with open(log, 'wb') as out:
        proc = subprocess.Popen([*DORA, 'run', *overrides], cwd=project, env=env_of(project), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(history.glob('*/history.json')):  # written once the first epoch's checkpoint is durable
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (xp,) = (project / 'outputs' / 'xps').iterdir()  # the project's own outputs/, not the framework's
    resumed = dora(project, 'run', *overrides)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert 'Resumed from' in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert len(json.loads((xp / 'history.json').read_text())) == 2

    env = env_of(project)
    verify = subprocess.run([*SOLVER, 'verify', xp.name], cwd=project, env=env, capture_output=True, text=True)
    assert verify.returncode == 0 and 'intact' in verify.stdout, verify.stdout + verify.stderr
    listed = json.loads(subprocess.run([*SOLVER, 'ls', '--json'], cwd=project, env=env, capture_output=True,
                                       text=True, check=True).stdout)
    assert [(r['sig'], r['epochs'], r['state']) for r in listed] == [(xp.name, 2, 'complete')]

    tuned = dora(project, 'run', *overrides, 'optim.lr=0.003', f'continue_from=//sig/{xp.name}')
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert len(list((project / 'outputs' / 'xps').iterdir())) == 2

    grid = dora(project, 'grid', NAME, '--dry_run')
    assert grid.returncode == 0 and 'opt.lr=0.003' in grid.stdout, grid.stdout + grid.stderr


@pytest.mark.integration
def test_the_new_project_s_own_test_passes(project: Path):
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider'], cwd=project,
                          env=env_of(project), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
