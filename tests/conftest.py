"""Shared fixtures: a private Dora folder per test and a runner for real `dora` processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_ANSI = re.compile(r'\x1b\[[0-9;]*m')  # flashy logs in colour

Runner = tp.Callable[..., tuple[int, str]]


def dora_env(dora_dir: Path) -> dict[str, str]:
    """The environment of a `dora` process that keeps its experiments under `dora_dir`.

    One torch thread: the test models are tiny, and the suite runs on two cores.
    """
    return {**os.environ, 'SOLVER_DORA_DIR': str(dora_dir), 'OMP_NUM_THREADS': '1'}


def run_dora(dora_dir: Path, *args: str, timeout: float = 120,
             preexec_fn: tp.Callable[[], None] | None = None) -> tuple[int, str]:
    """Run `dora <args>` from the repository root; return its exit code and output (both streams).

    `preexec_fn` runs in the child before `dora` starts (e.g. to set a resource limit).
    """
    proc = subprocess.run(['dora', *args], cwd=ROOT, env=dora_env(dora_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, preexec_fn=preexec_fn)
    return proc.returncode, _ANSI.sub('', proc.stdout)


def xp_folder(dora_dir: Path, *overrides: str) -> Path:
    """The folder of `dora run <overrides>` in `dora_dir`: the signature is computed, nothing runs."""
    from solver.train import main
    return dora_dir / 'xps' / main.get_xp(list(overrides)).sig


class BackgroundRun:
    """`dora run <overrides>` in the background, in its own session, its output in a file: for
    tests that signal or kill a training process at chosen moments. As a context manager, the
    run is killed on exit if it is still going."""

    def __init__(self, dora_dir: Path, *overrides: str) -> None:
        self.folder = xp_folder(dora_dir, *overrides)
        dora_dir.mkdir(parents=True, exist_ok=True)
        self.log = dora_dir.parent / f'run_{time.monotonic_ns()}.log'
        with open(self.log, 'wb') as out:
            self.proc = subprocess.Popen(['dora', 'run', *overrides], cwd=ROOT, env=dora_env(dora_dir),
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._text, self._read = '', 0

    def __enter__(self) -> BackgroundRun:
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.kill()

    def output(self) -> str:
        """The complete lines the run has printed so far, without colours (read incrementally)."""
        with open(self.log, 'rb') as f:
            f.seek(self._read)
            data = f.read()
        complete = data[:data.rfind(b'\n') + 1]
        self._read += len(complete)
        self._text += _ANSI.sub('', complete.decode(errors='replace'))
        return self._text

    def wait_for(self, condition: tp.Callable[[], bool], what: str, timeout: float = 120) -> None:
        """Poll `condition` every millisecond; fail if the run ends first (the timeout is a safety net)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout}s:\n{self.output()}"
            time.sleep(0.001)

    def wait_for_line(self, text: str, timeout: float = 120) -> None:
        self.wait_for(lambda: text in self.output(), repr(text), timeout)

    def send(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the run (its whole process group) if it is still going, and reap it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the run to end by itself; its exit code and complete output."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return code, self.output()


@pytest.fixture(scope='session')
def dora_tools() -> tp.Any:
    """The helpers above, for module-scoped fixtures that share one experiment between tests."""
    import types
    return types.SimpleNamespace(run=run_dora, env=dora_env, folder=xp_folder, root=ROOT, start=BackgroundRun)


@pytest.fixture
def dora_dir(tmp_path: Path) -> Path:
    return tmp_path / 'dora'


@pytest.fixture
def dora(dora_dir: Path) -> Runner:
    """`dora('run', 'solver=regression', ...)` -> (returncode, output), in this test's Dora folder."""
    return lambda *args, **kwargs: run_dora(dora_dir, *args, **kwargs)


def _assert_same(actual: tp.Any, expected: tp.Any) -> None:
    """Equal structure, types, dtypes and tensor values, recursively (container order included)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected)
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_same(a, e)
    else:
        assert type(actual) is type(expected) and actual == expected


@pytest.fixture
def assert_same() -> tp.Callable[[tp.Any, tp.Any], None]:
    """The deep comparison of checkpoint states shared by the checkpoint, archive and writer tests."""
    return _assert_same
