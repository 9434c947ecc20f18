"""What real CRC-32s in checkpoint archives would cost, beside the xxh3 digests we compute anyway.

Our archive writer (`solver/checkpointing/archive.py`) leaves the zip records' CRC-32 at 0, so
`unzip -t` and Python's `zipfile` call every checkpoint damaged; the xxh3 digests, checked on every
load, cover every byte instead. This prints the time per GiB of each CRC-32 implementation that is
importable (stdlib zlib always; python-isal and zlib-ng if installed) next to the digests, on the
same buffer in turn, best of `--repeats`:

    python scripts/bench_crc.py                 # 1 GiB, best of 3
    python scripts/bench_crc.py --mib 256
"""

from __future__ import annotations

import argparse
import sys
import time
import typing as tp
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from solver.checkpointing.digest import tensor_digest  # noqa: E402


def implementations(tensor: torch.Tensor) -> dict[str, tp.Callable[[], object]]:
    data = tensor.numpy().data.cast('B')
    found: dict[str, tp.Callable[[], object]] = {
        'xxh3 digest (what we compute)': lambda: tensor_digest(tensor),
        'zlib.crc32 (stdlib)': lambda: zlib.crc32(data),
    }
    try:
        from isal import isal_zlib
        found['isal_zlib.crc32 (python-isal)'] = lambda: isal_zlib.crc32(data)
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng
        found['zlib_ng.crc32 (zlib-ng)'] = lambda: zlib_ng.crc32(data)
    except ImportError:
        pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mib', type=int, default=1024)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    tensor = torch.randn(args.mib << 18)  # float32: 4 bytes each
    gib = tensor.numel() * 4 / 2**30
    found = implementations(tensor)
    best = {name: float('inf') for name in found}
    for _ in range(args.repeats):  # each repeat runs all in turn: a busy machine slows them alike
        for name, run in found.items():
            begin = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - begin)
    base = best['xxh3 digest (what we compute)']
    print(f"{args.mib} MiB, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:32s} {seconds / gib:6.3f} s/GiB  {gib / seconds:5.1f} GiB/s  {seconds / base:5.2f} x xxh3")


if __name__ == '__main__':
    main()
