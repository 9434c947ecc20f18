"""Run the experiments of a Dora grid one after another on this machine.

`dora grid NAME` only submits to Slurm. This lists the same experiments through Dora's own grid
API (`run_grid(..., dry_run=True)`) and runs each with `dora run <its overrides>`: same
signatures, same folders, and an interrupted sweep resumes each experiment where it stopped.

    python scripts/run_grid.py drum_rnn                 # all of them
    python scripts/run_grid.py drum_rnn --dry_run       # just list signature and overrides
    python scripts/run_grid.py drum_rnn -- optim.epochs=1   # extra overrides (new signatures)
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys

from dora.grid import RunGridArgs, run_grid


def grid_experiments(name: str) -> list[list[str]]:
    """The override lists of the experiments of grid `recipes/<name>.py` (`solver.recipes` installed)."""
    from solver.train import main
    explorer = importlib.import_module(f'{main.dora.grid_package}.{name}').explorer
    args = RunGridArgs(dry_run=True, monitor=False, silent=True)
    return [[f'{sheep.xp.sig}', *sheep.xp.argv] for sheep in run_grid(main, explorer, name, args=args)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('grid')
    parser.add_argument('--dry_run', action='store_true', help='list the experiments, run nothing')
    parser.add_argument('extra', nargs='*', help='overrides added to every experiment')
    args = parser.parse_args()
    experiments = grid_experiments(args.grid)
    dora = shutil.which('dora') or 'dora'
    failed = []
    for index, (sig, *argv) in enumerate(experiments, start=1):
        print(f"[{index}/{len(experiments)}] {sig}: dora run {' '.join(argv + args.extra)}", flush=True)
        if not args.dry_run and subprocess.run([dora, 'run', *argv, *args.extra]).returncode:
            failed.append(sig)
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
