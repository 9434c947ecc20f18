"""The package as people install it: the wheel carries its configs, corpus and recipes and runs
from any folder; paths resolve to the project, never to site-packages."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
from helpers import ROOT, dora_env

from solver import locations


def test_every_package_under_solver_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']['packages'])
    found = {'.'.join(p.parent.relative_to(ROOT).parts) for p in (ROOT / 'solver').rglob('__init__.py')}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_the_framework_files_are_found_through_the_installed_packages():
    assert (locations.shipped('config') / 'base.yaml').is_file()
    assert (locations.shipped('config') / 'solver' / 'drum_rnn.yaml').is_file()
    assert locations.find('data/drums').is_dir()


def test_a_checkout_is_its_own_root_and_an_installed_package_uses_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locations.project_root(ROOT / 'solver') == ROOT
    installed = tmp_path / 'site-packages' / 'solver'
    installed.mkdir(parents=True)
    assert locations.project_root(installed) == tmp_path


def test_relative_config_paths_fall_back_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locations, '_root', tmp_path)
    assert locations.find('data/drums') == locations.shipped('data') / 'drums'
    (tmp_path / 'data' / 'drums').mkdir(parents=True)
    assert locations.find('data/drums') == Path('data/drums')  # the launch directory's own comes first


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel, as `pip wheel .` builds it."""
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation',
                    '-w', str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob('solver-*.whl'))


@pytest.mark.integration
def test_the_wheel_carries_configs_corpus_and_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ['solver/config/config.yaml', 'solver/config/base.yaml', 'solver/config/solver/drum_rnn/debug.yaml',
                   'solver/recipes/drum_rnn.py', 'solver/data/drums/rock/rock_000.mid', 'solver/train.py']:
        assert needed in names


@pytest.mark.integration
def test_the_installed_wheel_trains_resumes_and_writes_samples_from_an_empty_folder(wheel, tmp_path):
    """A fresh venv holding the wheel alone (its third-party packages borrowed from this one
    through a path file, so the test installs nothing from the index: the full install from the
    index is `scripts/check_install.sh --wheel`), run from an empty folder."""
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    site = Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / 'borrowed.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--quiet', '--no-deps',
                    str(wheel)], check=True, capture_output=True, timeout=300)
    empty = tmp_path / 'empty'
    empty.mkdir()
    env = {k: v for k, v in dora_env(tmp_path).items() if k not in ('SOLVER_DORA_DIR', 'PYTHONPATH')}
    run = [str(python), '-m', 'dora', '-P', 'solver', 'run', 'solver=drum_rnn/debug']
    outputs = []
    for _ in range(2):  # the second run restores the first's checkpoint and finds nothing left to do
        proc = subprocess.run(run, cwd=empty, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    where = subprocess.run([str(python), '-c', 'import solver; print(solver.__file__)'], capture_output=True,
                           text=True, cwd=empty, env=env).stdout
    assert where.startswith(str(site)), where
    (xp,) = (empty / 'outputs' / 'xps').iterdir()
    assert (xp / 'checkpoint.th').is_file() and list(xp.glob('samples/epoch_2/*.mid'))
    assert 'is complete: 2 of 2 epochs done' in outputs[1]
    assert not (site / 'outputs').exists() and not (site / 'solver' / 'outputs').exists()
    assert os.listdir(empty) == ['outputs']
