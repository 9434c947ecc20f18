"""Shared fixtures: a private Dora folder per test and a runner for real `dora` processes."""

from __future__ import annotations

import os
import re
import subprocess
import typing as tp
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_ANSI = re.compile(r'\x1b\[[0-9;]*m')  # flashy logs in colour

Runner = tp.Callable[..., tuple[int, str]]


def dora_env(dora_dir: Path) -> dict[str, str]:
    """The environment of a `dora` process that keeps its experiments under `dora_dir`.

    One torch thread: the test models are tiny, and the suite runs on two cores.
    """
    return {**os.environ, 'SOLVER_DORA_DIR': str(dora_dir), 'OMP_NUM_THREADS': '1'}


def run_dora(dora_dir: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run `dora <args>` from the repository root; return its exit code and output (both streams)."""
    proc = subprocess.run(['dora', *args], cwd=ROOT, env=dora_env(dora_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.returncode, _ANSI.sub('', proc.stdout)


def xp_folder(dora_dir: Path, *overrides: str) -> Path:
    """The folder of `dora run <overrides>` in `dora_dir`: the signature is computed, nothing runs."""
    from solver.train import main
    return dora_dir / 'xps' / main.get_xp(list(overrides)).sig


@pytest.fixture(scope='session')
def dora_tools() -> tp.Any:
    """The helpers above, for module-scoped fixtures that share one experiment between tests."""
    import types
    return types.SimpleNamespace(run=run_dora, env=dora_env, folder=xp_folder, root=ROOT)


@pytest.fixture
def dora_dir(tmp_path: Path) -> Path:
    return tmp_path / 'dora'


@pytest.fixture
def dora(dora_dir: Path) -> Runner:
    """`dora('run', 'solver=regression', ...)` -> (returncode, output), in this test's Dora folder."""
    return lambda *args, **kwargs: run_dora(dora_dir, *args, **kwargs)
