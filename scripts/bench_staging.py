"""Host memory and loop-blocked time of async checkpoint saves with and without a staging bound
(`checkpoint.staging_max_mb`), beside a synchronous save, for the same state.

    python scripts/bench_staging.py --mb 512 --bound 128 --repeats 3

Each mode runs in a fresh process: the state is built (tensors of 8 MB, --mb in all), then the
writer is prepared and saves the state --repeats times into the same file (a tensor changes
between saves, as training would). Reported: the loop's blocked time per save (median), the
time until the save is durable (median), and the peak RSS the writer added over the process's
RSS once the state existed (VmHWM, reset through /proc/self/clear_refs), which includes the
staging buffers made by `prepare`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distributed import rss_mb  # noqa: E402

from solver.checkpointing.writer import CheckpointWriter, SaveMode  # noqa: E402

MODES = {
    'async, unbounded': (SaveMode.ASYNC, None),
    'async, bounded': (SaveMode.ASYNC, 'bound'),
    'sync': (SaveMode.SYNC, None),
}


def one_mode(mode: str, mb: int, bound: float, repeats: int, folder: Path) -> dict[str, float]:
    """Measure one mode in this process (run by `main` in a child process per mode)."""
    torch.set_num_threads(1)
    save_mode, limit = MODES[mode]
    state = {'model': {f'w{i}': torch.rand(2**21) for i in range(max(1, mb // 8))}}
    Path('/proc/self/clear_refs').write_text('5')
    baseline = rss_mb('VmRSS')
    writer = CheckpointWriter(save_mode, staging_max_mb=bound if limit else None)
    writer.prepare(state)
    blocked, durable = [], []
    try:
        for repeat in range(repeats):
            state['model']['w0'][0] = repeat
            begin = time.perf_counter()
            stats = writer.save(state, {folder / 'checkpoint.th': None}, {'epoch': repeat})
            blocked.append(stats.blocked)
            writer.wait()
            durable.append(time.perf_counter() - begin)
    finally:
        writer.close()
    return {'blocked': statistics.median(blocked), 'durable': statistics.median(durable),
            'peak_mb': rss_mb('VmHWM') - baseline, 'staged_mb': writer.staging.nbytes / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mb', type=int, default=512, help='state size in MB')
    parser.add_argument('--bound', type=float, default=128, help='checkpoint.staging_max_mb of the bounded mode')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--dir', default=None, help='where to write (default: a temporary folder)')
    parser.add_argument('--one', default=None, help=argparse.SUPPRESS)  # internal: measure one mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_mode(args.one, args.mb, args.bound, args.repeats, Path(args.dir))))
        return 0
    results = {}
    for mode in MODES:
        with tempfile.TemporaryDirectory(prefix='bench_staging_', dir=args.dir) as folder:
            out = subprocess.run([sys.executable, __file__, '--one', mode, '--mb', str(args.mb), '--bound',
                                  str(args.bound), '--repeats', str(args.repeats), '--dir', folder],
                                 check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.splitlines()[-1])
    print(f"State {args.mb} MB (tensors of 8 MB); bound {args.bound:g} MB; medians of {args.repeats} saves; "
          f"torch {torch.__version__}.")
    print(f"{'mode':<18} {'blocked s':>9} {'durable s':>9} {'peak RSS added MB':>18}")
    for mode, r in results.items():
        print(f"{mode:<18} {r['blocked']:>9.3f} {r['durable']:>9.3f} {r['peak_mb']:>18.0f}")
    free, bounded = results['async, unbounded'], results['async, bounded']
    print(f"Bounded / unbounded: loop blocked x{bounded['blocked'] / free['blocked']:.1f}, "
          f"peak RSS added x{bounded['peak_mb'] / max(free['peak_mb'], 1.0):.2f}; "
          f"bounded blocked / sync blocked x{bounded['blocked'] / results['sync']['blocked']:.2f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
