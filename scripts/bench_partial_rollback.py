"""What a partial rollback costs beside a full one, on the drum RNN.

Trains the drum debug model (`solver=drum_rnn/debug`, plus the overrides given: e.g.
`model.hidden_size=512 model.num_layers=3` for a larger state) for 2 epochs with
`checkpoint_<epoch>.th` kept, then, each time on a fresh copy of its experiment folder:
- `full`: `solver rollback <xp> --to epoch:1` (moves the later files aside, cuts the history);
- `partial`: `solver rollback <xp> --to epoch:1 --only <prefix>` (reads and verifies both points,
  merges, writes a new checkpoint.th through the verified writer).
Each is timed as the function the command calls (in this process, the interpreter and imports
excluded) and as the whole `solver` command (a process, as a user runs it). Medians of `--repeats`.

    python scripts/bench_partial_rollback.py --repeats 5
    python scripts/bench_partial_rollback.py --repeats 3 --only model.layers.1 model.hidden_size=512 model.num_layers=3
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

from helpers import DORA, SOLVER, dora_env, xp_folder  # noqa: E402

from solver import experiment, rewind  # noqa: E402


def timed(function: tp.Callable[[], tp.Any]) -> float:
    begin = time.perf_counter()
    function()
    return time.perf_counter() - begin


def once(trained: Path, copy: Path, sig: str, only: str | None, command: bool = False) -> float:
    """Seconds of one rollback to epoch 1 (partial with `only`) of a fresh copy of `trained`."""
    shutil.copytree(trained, copy)
    try:
        if command:
            argv = [*SOLVER, 'rollback', sig, '--to', 'epoch:1', *(['--only', only] if only else [])]
            return timed(functools.partial(subprocess.run, argv, cwd=ROOT, env=dora_env(copy), check=True,
                                           capture_output=True))
        xp = experiment.Experiment(copy / 'xps' / sig)
        if only:
            return timed(functools.partial(rewind.rollback_partial, xp, 'epoch:1', only))
        return timed(functools.partial(experiment.rollback, xp, 'epoch:1'))
    finally:
        shutil.rmtree(copy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--only', default='model.output', help='the prefix of the partial rollback')
    parser.add_argument('--json', help='also write the figures to this file')
    parser.add_argument('overrides', nargs='*', help='more overrides of the drum debug run')
    args = parser.parse_args()
    overrides = ('solver=drum_rnn/debug', 'optim.epochs=2', 'checkpoint.save_every=1', *args.overrides)
    with tempfile.TemporaryDirectory(prefix='bench_partial_') as tmp:
        trained = Path(tmp) / 'trained'
        proc = subprocess.run([*DORA, 'run', *overrides], cwd=ROOT, env=dora_env(trained), capture_output=True,
                              text=True)
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        sig = xp_folder(trained, *overrides).name
        size = (trained / 'xps' / sig / 'checkpoint.th').stat().st_size
        runs: dict[str, list[float]] = {'full': [], 'partial': [], 'full (command)': [], 'partial (command)': []}
        for i in range(args.repeats):
            for kind in ('full', 'partial'):  # alternately, so that the machine's drift hits both alike
                only = args.only if kind == 'partial' else None
                runs[kind].append(once(trained, Path(tmp) / f'{kind}_{i}', sig, only))
                runs[f'{kind} (command)'].append(once(trained, Path(tmp) / f'{kind}_{i}', sig, only, command=True))
    medians = {kind: statistics.median(times) for kind, times in runs.items()}
    threads = os.environ.get('OMP_NUM_THREADS', 'default')
    print(f"drum RNN {' '.join(args.overrides) or '(debug)'}: checkpoint.th {size / 2**20:.2f} MiB; "
          f"--only {args.only}; medians of {args.repeats}; torch threads {threads}")
    for kind, value in medians.items():
        print(f"  {kind:<20} {value * 1000:8.1f} ms")
    print(f"  partial / full: {medians['partial'] / medians['full']:.1f}x in process, "
          f"{medians['partial (command)'] / medians['full (command)']:.2f}x as commands")
    if args.json:
        Path(args.json).write_text(json.dumps({'bytes': size, 'only': args.only, 'overrides': args.overrides,
                                               'runs': runs, 'medians': medians}, indent=2))


if __name__ == '__main__':
    main()
