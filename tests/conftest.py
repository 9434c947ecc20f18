"""Shared fixtures: a private Dora folder per test and runners for real `dora` processes
(the helpers themselves are in helpers.py)."""

from __future__ import annotations

import types
import typing as tp
from pathlib import Path

import helpers
import pytest

Runner = tp.Callable[..., tuple[int, str]]


@pytest.fixture(scope='session')
def dora_tools() -> tp.Any:
    """The process helpers, for module-scoped fixtures that share one experiment between tests."""
    return types.SimpleNamespace(run=helpers.run_dora, env=helpers.dora_env, folder=helpers.xp_folder,
                                 root=helpers.ROOT, start=helpers.BackgroundRun)


@pytest.fixture
def dora_dir(tmp_path: Path) -> Path:
    return tmp_path / 'dora'


@pytest.fixture
def dora(dora_dir: Path) -> Runner:
    """`dora('run', 'solver=regression', ...)` -> (returncode, output), in this test's Dora folder."""
    return lambda *args, **kwargs: helpers.run_dora(dora_dir, *args, **kwargs)


@pytest.fixture
def assert_same() -> tp.Callable[..., None]:
    """The deep comparison of checkpoint states (`helpers.assert_same`)."""
    return helpers.assert_same
