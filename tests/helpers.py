"""Shared test helpers: real `dora` processes (in the foreground or the background), experiment
folders, histories, and one deep comparison of states. Importable from any test (pytest puts
this folder on the path: `pythonpath` in pyproject.toml); the fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing as tp
from pathlib import Path
from types import SimpleNamespace

import torch

from solver.checkpointing import envelope

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
_ANSI = re.compile(r'\x1b\[[0-9;]*m')  # flashy logs in colour

REGRESSION = ('solver=regression',)  # 16 steps per epoch, 3 epochs: a run of seconds
# The regression solver with test-only faults (`+faults.<key>=...`, see faulty_solver.py).
FAULTY = (*REGRESSION, 'solver_class=faulty_solver.FaultySolver')
# The project's commands through the running interpreter: the tests need no activated venv.
DORA = (sys.executable, '-m', 'dora')
SOLVER = (sys.executable, '-m', 'solver')
TORCHRUN = (sys.executable, '-m', 'torch.distributed.run')
SAVE_LINE = ' - Checkpoint checkpoint.th'  # the log line of every save of the latest checkpoint


# -- processes ------------------------------------------------------------------------------------

def dora_env(dora_dir: Path) -> dict[str, str]:
    """The environment of a `dora` process that keeps its experiments under `dora_dir`.

    One torch thread: the test models are tiny, and the suite runs on two cores. This folder is
    on the path, so that `solver_class=faulty_solver.FaultySolver` can be imported.
    Distributed runs (`dora run -d`) get a free port of their own: Dora derives its default from
    the signature, so two tests running one signature at once (`pytest -n 2`) would collide.
    """
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get('PYTHONPATH', '')) if p)
    return {'MASTER_PORT': str(free_port()), **os.environ, 'SOLVER_DORA_DIR': str(dora_dir),
            'OMP_NUM_THREADS': '1', 'PYTHONPATH': path}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run_dora(dora_dir: Path, *args: str, timeout: float = 120,
             preexec_fn: tp.Callable[[], None] | None = None) -> tuple[int, str]:
    """Run `dora <args>` from the repository root; return its exit code and output (both streams).

    `preexec_fn` runs in the child before `dora` starts (e.g. to set a resource limit).
    """
    proc = subprocess.run([*DORA, *args], cwd=ROOT, env=dora_env(dora_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, preexec_fn=preexec_fn)
    return proc.returncode, _ANSI.sub('', proc.stdout)


def xp_folder(dora_dir: Path, *overrides: str) -> Path:
    """The folder of `dora run <overrides>` in `dora_dir`: the signature is computed, nothing runs."""
    from solver.train import main
    return dora_dir / 'xps' / main.get_xp(list(overrides)).sig


def run_xp(dora_dir: Path, *overrides: str, args: tp.Sequence[str] = (), timeout: float = 120) -> SimpleNamespace:
    """`dora run [args] <overrides>`, which must succeed: its folder, Dora folder and output."""
    code, output = run_dora(dora_dir, 'run', *args, *overrides, timeout=timeout)
    assert code == 0, output
    return SimpleNamespace(dora_dir=dora_dir, folder=xp_folder(dora_dir, *overrides), output=output)


class BackgroundRun:
    """`dora run <overrides>` in the background, in its own session, its output in a file: for
    tests that signal or kill a training process at chosen moments. As a context manager, the
    run is killed on exit if it is still going."""

    def __init__(self, dora_dir: Path, *overrides: str) -> None:
        self.folder = xp_folder(dora_dir, *overrides)
        dora_dir.mkdir(parents=True, exist_ok=True)
        self.log = dora_dir.parent / f'run_{time.monotonic_ns()}.log'
        with open(self.log, 'wb') as out:
            self.proc = subprocess.Popen([*DORA, 'run', *overrides], cwd=ROOT, env=dora_env(dora_dir),
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

    def wait_for_lock(self) -> None:
        """Until the run holds its experiment's lock (its pid is in `.lock`)."""
        lock = self.folder / '.lock'
        self.wait_for(lambda: lock.exists() and lock.read_text().strip() == str(self.proc.pid),
                      'lock taken by the run')

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


# -- experiment folders ------------------------------------------------------------------------------

def history(folder: Path) -> list[dict]:
    """Dora's history.json of an experiment."""
    return json.loads((folder / 'history.json').read_text())


def without_durations(entries: list[dict]) -> list[dict]:
    """History entries without the stages' durations (which differ from run to run)."""
    return [{stage: {k: v for k, v in metrics.items() if k != 'duration'} for stage, metrics in entry.items()}
            for entry in entries]


def last_lines(output: str, count: int = 3) -> str:
    return '\n'.join(output.strip().splitlines()[-count:])


def copy_xp(source: SimpleNamespace, tmp_path: Path) -> SimpleNamespace:
    """A private copy of a shared experiment (`dora_dir`, `folder`), for a test that changes it."""
    dora_dir = tmp_path / 'dora'
    shutil.copytree(source.dora_dir, dora_dir, symlinks=True)
    return SimpleNamespace(dora_dir=dora_dir, folder=dora_dir / 'xps' / source.folder.name)


def back_to_epoch_1(folder: Path, epochs: int = 3) -> None:
    """Leave an experiment of `epochs` epochs with `save_every=1` as if it had stopped after epoch 1:
    its epoch-1 checkpoint as the latest, the later epoch files gone. A rerun then resumes there."""
    shutil.copyfile(folder / 'checkpoint_1.th', folder / 'checkpoint.th')
    for epoch in range(2, epochs + 1):
        (folder / f'checkpoint_{epoch}.th').unlink()


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob('.checkpoint*.tmp.*'))


# -- comparing states ----------------------------------------------------------------------------------

def assert_same(actual: tp.Any, expected: tp.Any, ordered: bool = True, where: str = 'state') -> None:
    """Equal structure, tensors equal bit for bit (dtype and shape included), recursively.

    `ordered`: dict keys in the same order and scalars of the same type too (what a file must
    give back); without it, as a resumed run's state compares with an uninterrupted one's.
    """
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), where
        same_keys = list(actual) == list(expected) if ordered else actual.keys() == expected.keys()
        assert same_keys, f"{where}: keys differ"
        for key in expected:
            assert_same(actual[key], expected[key], ordered, f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, ordered, f"{where}[{i}]")
    else:
        assert not ordered or type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_same_run(folder: Path, reference: Path) -> None:
    """`folder` ended where `reference` did: every state of the latest checkpoint (model,
    optimizer, best state, RNG, data position) bit-identical, the same metrics in the history."""
    actual = envelope.read_checkpoint(folder / 'checkpoint.th').state
    expected = envelope.read_checkpoint(reference / 'checkpoint.th').state
    assert without_durations(history(folder)) == without_durations(history(reference))
    assert without_durations(actual.pop('history')) == without_durations(expected.pop('history'))
    actual.pop('xp.sig'), expected.pop('xp.sig')  # the experiments' names differ with their configs
    assert_same(actual, expected, ordered=False)


def damage_a_tensor(path: Path) -> None:
    """Flip one byte of the first tensor record of the archive at `path` (a byte the digests cover,
    whatever the alignment padding between records)."""
    offset = torch._C.PyTorchFileReader(str(path)).get_record_offset('data/0')
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
