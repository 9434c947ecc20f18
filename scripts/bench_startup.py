"""Start-up time of the installed `solver` command: `--help`, `ls` over 40 experiments, `verify`
of one checkpoint, against a bare `python -c pass`, side by side in one run.

    python scripts/bench_startup.py                 # the solver this interpreter imports
    python scripts/bench_startup.py --repeat 9
    python scripts/bench_startup.py --before ../old-checkout   # the same commands, alternately with
                                                               # PYTHONPATH=../old-checkout: before/after

It trains one small experiment (`dora run solver=regression`) into a temporary Dora folder and
copies it 40 times. Each command runs `--repeat` times; the best wall time and the best CPU time
(user + system, which a busy machine disturbs less) are printed, with the heaviest imports of one
run (`python -X importtime`).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heaviest_imports(argv: list[str], env: dict[str, str], cwd: Path, count: int = 5) -> list[str]:
    proc = subprocess.run([sys.executable, '-X', 'importtime', *argv[1:]], env=env, cwd=cwd, capture_output=True,
                          text=True)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split('|')
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith('   '):
            rows.append((int(parts[1]), parts[2].strip()))  # top-level imports only (indent <= 2)
    return [f"{name} {us / 1e6:.2f}s" for us, name in sorted(rows, reverse=True)[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--experiments', type=int, default=40)
    parser.add_argument('--before', type=Path, help='a checkout to compare with, imported through PYTHONPATH '
                        '(run this script with an interpreter whose solver is not an editable install)')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix='bench-startup-'))
    try:
        env = {**os.environ, 'SOLVER_DORA_DIR': str(work / 'dora'), 'OMP_NUM_THREADS': '1'}
        subprocess.run([sys.executable, '-m', 'dora', '-P', 'solver', 'run', 'solver=regression'], env=env,
                       check=True, capture_output=True, cwd=work)
        (xp,) = (work / 'dora' / 'xps').iterdir()
        for i in range(1, args.experiments):
            shutil.copytree(xp, xp.parent / f'{i:08x}', symlinks=True)
        checkpoint = xp / 'checkpoint.th'
        commands = {'python -c pass': [sys.executable, '-c', 'pass'],
                    'solver --help': [sys.executable, '-m', 'solver.cli', '--help'],
                    f'solver ls ({args.experiments} experiments)': [sys.executable, '-m', 'solver.cli', 'ls'],
                    'solver verify FILE': [sys.executable, '-m', 'solver.cli', 'verify', str(checkpoint)]}
        before = {**env, 'PYTHONPATH': str(args.before.resolve())} if args.before else None
        print(f"{'command':<32} {'wall (best)':>12} {'cpu (best)':>11}" +
              (f" {'before wall':>12} {'cpu':>8} {'ratio':>6}" if before else '') + "   heaviest imports")
        for label, argv in commands.items():
            runs, old = [], []
            for _ in range(args.repeat):  # alternately, so that both see the same machine
                runs.append(timed(argv, env, work))
                if before:
                    old.append(timed(argv, before, work))
            imports = ', '.join(heaviest_imports(argv, env, work)) if 'solver' in label else ''
            wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            compared = ''
            if before:
                old_wall, old_cpu = min(r[0] for r in old), min(r[1] for r in old)
                compared = f" {old_wall:>11.3f}s {old_cpu:>7.3f}s {cpu / old_cpu:>6.2f}"
            print(f"{label:<32} {wall:>11.3f}s {cpu:>10.3f}s{compared}   {imports}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
