"""Issue 24's figures in one run: the four benchmarks of rollback's second half, one after another.

    python scripts/bench_rollback.py            # the settings the README's tables were measured with
    python scripts/bench_rollback.py --quick    # smaller: a look in a few minutes
    python scripts/bench_rollback.py --dry-run  # print the commands only

Each part is its own script (run it alone for its options); this one runs them in turn with the
same interpreter and prints each one's output under a heading:

  partial rollback   scripts/bench_partial_rollback.py  partial vs full rollback, drum RNN
  shared store       scripts/bench_incremental.py       bytes: full files, per-experiment stores,
                                                        one store for the Dora folder
  compression        scripts/bench_compression.py       bytes, save and load: none, zstd, bf16
  restart            scripts/bench_restart.py           time to the first step of a resume, by phase
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent

PARTS = {  # name: (script, full arguments, quick arguments)
    'partial rollback': ('bench_partial_rollback.py', ['--repeats', '5'], ['--repeats', '2']),
    'shared store': ('bench_incremental.py', ['--epochs', '4', '--only', 'shared'],
                     ['--epochs', '2', '--only', 'shared', '--model', 'model.hidden_size=64']),
    'compression': ('bench_compression.py', ['--codecs', 'no', '--repeats', '3'],
                    ['--codecs', 'no', '--repeats', '1', '--big-mib', '64']),
    'restart': ('bench_restart.py', ['--repeat', '5'], ['--repeat', '2']),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='smaller settings')
    parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    parser.add_argument('--part', choices=sorted(PARTS), action='append', help='run only these parts')
    args = parser.parse_args()
    failed = []
    for name in args.part or list(PARTS):
        script, full, quick = PARTS[name]
        command = [sys.executable, str(SCRIPTS / script), *(quick if args.quick else full)]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        if args.dry_run:
            continue
        start = time.monotonic()
        code = subprocess.run(command).returncode
        print(f"=== {name}: exit {code}, {time.monotonic() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
