"""Time from `dora run` to the first training step of a resumed drum RNN, by phase, with and
without the data cache, against a bare `python -c "import torch"`.

    python scripts/bench_restart.py                       # the bundled corpus, 5 resumes of each
    python scripts/bench_restart.py --repeat 9 --corpus /tmp/big   # another folder of drum MIDI
    python scripts/bench_restart.py --make 3600           # first write a corpus of 3600 files
                                                          # (scripts/make_drum_corpus.py) and use it

It trains `dora run solver=drum_rnn` into a temporary Dora folder until its first step, then stops
it with SIGTERM (it saves at the next step: a mid-epoch checkpoint). Each resume is the same
command: it reads that checkpoint, logs its `Startup:` line at its first step (solver/startup.py)
and is killed there (SIGKILL, so the checkpoint stays the same for every resume). The variants run
alternately, so that each sees the same machine: `cache.use=false` (every run parses the corpus,
as before the cache), `cache.use=true` with the entry in place (a resume), and `cache.use=true`
after the cache folder is emptied (the first run on a corpus: parse and write). Printed: the
median of each phase, and the wall time seen from outside (launch to the `Startup:` line),
beside `python -c "import torch"` and the same plus one Adam optimizer (torch imports
torch._dynamo on the first optimizer: a cost every PyTorch training pays).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r'Startup: ([\d.]+) s from process start to the first training step: (.*)\.')
BASELINES = {'python -c "import torch"': 'import torch',
             '... + torch.optim.Adam': 'import torch; torch.optim.Adam([torch.zeros(1, requires_grad=True)])'}


class Run:
    """`dora run solver=drum_rnn <overrides>` in its own session, its output in a file."""

    def __init__(self, overrides: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.start = time.perf_counter()
        with open(log, 'wb') as out:
            self.proc = subprocess.Popen([sys.executable, '-m', 'dora', 'run', 'solver=drum_rnn', *overrides],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_for_startup(self, timeout: float = 300) -> tuple[float, dict[str, float]]:
        """(wall seconds from launch, the phases of the `Startup:` line) once the run logs it."""
        deadline = time.monotonic() + timeout
        while True:
            found = LINE.search(self.log.read_text(errors='replace'))
            if found:
                wall = time.perf_counter() - self.start
                phases = {name: float(value) for name, value in
                          (part.rsplit(' ', 2)[:2] for part in found.group(2).split(', '))}
                return wall, {'total': float(found.group(1)), **phases}
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise SystemExit(f"no Startup line (exit {self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.005)

    def signal(self, sig: int) -> int:
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=300)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)


def timed(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, '-c', code], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--corpus', type=Path, help='a folder of drum MIDI files (default: the bundled one)')
    parser.add_argument('--make', type=int, metavar='N', help='write a corpus of N files first and use it')
    parser.add_argument('overrides', nargs='*', help='more overrides of the run (e.g. model.hidden_size=512)')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix='bench-restart-'))
    try:
        corpus = args.corpus
        if args.make:
            corpus = work / 'corpus'
            subprocess.run([sys.executable, str(ROOT / 'scripts' / 'make_drum_corpus.py'), '--num-files',
                            str(args.make), '--out', str(corpus)], check=True, stdout=subprocess.DEVNULL)
        overrides = [*([f'dataset.path={corpus.resolve()}'] if corpus else []), *args.overrides]
        env = {**os.environ, 'SOLVER_DORA_DIR': str(work / 'dora')}
        first = Run(overrides, env, work / 'train.log')
        first.wait_for_startup()
        code = first.signal(signal.SIGTERM)  # saves at the next step, exits 143
        if code != 128 + signal.SIGTERM:
            raise SystemExit(f"the first run ended with {code}:\n{(work / 'train.log').read_text()[-3000:]}")
        variants = {'cache off (parse)': (['cache.use=false'], False),
                    'cache on, warm (resume)': (['cache.use=true'], False),
                    'cache on, cold (parse, write)': (['cache.use=true'], True)}
        results: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in variants}
        baselines: dict[str, list[float]] = {name: [] for name in BASELINES}
        for index in range(args.repeat):
            for name, (extra, cold) in variants.items():
                if cold:
                    shutil.rmtree(work / 'dora' / 'cache', ignore_errors=True)
                run = Run([*overrides, *extra], env, work / f'resume_{index}_{list(variants).index(name)}.log')
                try:
                    results[name].append(run.wait_for_startup())
                finally:
                    run.kill()
            for name, code_line in BASELINES.items():
                baselines[name].append(timed(code_line, env))
        report(results, baselines, corpus, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, list[tuple[float, dict[str, float]]]], baselines: dict[str, list[float]],
           corpus: Path | None, repeat: int) -> None:
    phases = list(next(iter(results.values()))[0][1])
    print(f"Resumed `dora run solver=drum_rnn` on {corpus or 'the bundled corpus (data/drums)'}: medians of "
          f"{repeat}, seconds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    names = list(results)
    print(f"| {'phase':<14} | " + ' | '.join(f"{n:>29}" for n in names) + ' |')
    print(f"|{'-' * 16}|" + '|'.join('-' * 31 for _ in names) + '|')
    for phase in [*phases, 'before the step', 'wall, seen from outside']:
        cells = []
        for name in names:
            values = [wall if phase.startswith('wall') else
                      found['total'] - found['first step'] if phase == 'before the step' else found.get(phase, 0.0)
                      for wall, found in results[name]]
            cells.append(f"{statistics.median(values):>29.3f}")
        print(f"| {phase:<14} | " + ' | '.join(cells) + ' |')
    for name, values in baselines.items():
        print(f"| {name:<14} | {statistics.median(values):>29.3f} |")


if __name__ == '__main__':
    main()
