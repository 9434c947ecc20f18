"""Incremental checkpoints vs single files, and rollback times (issue 10), side by side in one run.

1. Bytes on disk and save time, full vs `checkpoint.incremental=true`, from real `dora run`s
   (synchronous saves, so that a save's "loop blocked" is its whole duration):
   (a) the drum RNN (default size, 2.0 M parameters) with `checkpoint_<epoch>.th` every epoch;
   (b) a `continue_from` fine-tune of (a)'s result with `optim.freeze=[first,layers.0]`
       (the first two of the three LSTM layers).
   Bytes on disk are the blocks the checkpoint files and blobs take (`st_blocks`), after the run.
2. Rollback times for one state (run (a)'s last checkpoint), through the solver's own
   `rollback()` (built in process from the same config): from the async writer's staged copy
   (memory), from disk with the page cache of the files dropped (posix_fadvise DONTNEED),
   `solver rollback --to epoch:N` + a restart until it logs "Resumed from" (if this branch has
   the command), beside a cold `torch.load` of the same file.

    python scripts/bench_incremental.py                 # 10 epochs of 2 updates: ~10 min on 2 cores
    python scripts/bench_incremental.py --epochs 4      # a quicker look
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

from solver.checkpointing.fs import evict

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = re.compile(r'Checkpoint (\S+?),? .*?loop blocked ([0-9.]+)s')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--updates', type=int, default=2, help='updates per epoch')
    parser.add_argument('--keep', action='store_true', help='keep the Dora folder (printed)')
    return parser.parse_args()


def run(dora_dir: Path, *overrides: str) -> tuple[Path, list[float]]:
    """`dora run` to the end; the XP folder and the duration of each save (from its log)."""
    env = {**os.environ, 'SOLVER_DORA_DIR': str(dora_dir), 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run(['dora', 'run', *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"dora run {' '.join(overrides)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    from solver.train import main
    folder = dora_dir / 'xps' / main.get_xp(list(overrides)).sig
    return folder, [float(m.group(2)) for m in BLOCKED.finditer(proc.stdout + proc.stderr)]


def disk_bytes(folder: Path) -> tuple[int, int]:
    """(blocks on disk, apparent bytes) of an XP's checkpoint files and blobs."""
    files = [p for p in folder.glob('checkpoint*.th')] + list((folder / 'blobs').glob('*'))
    stats = [p.stat() for p in files if p.is_file()]
    return sum(s.st_blocks * 512 for s in stats), sum(s.st_size for s in stats)



def compare(name: str, base: tuple[str, ...], dora_dir: Path) -> Path:
    """Run `base` full and incremental; print bytes and save times side by side."""
    rows = {}
    for mode in ('full', 'incremental'):
        folder, saves = run(dora_dir, *base, f'checkpoint.incremental={mode == "incremental"}')
        rows[mode] = (folder, saves, disk_bytes(folder))
    full, inc = rows['full'], rows['incremental']
    print(f"\n{name}: {len(full[1])} saves of checkpoint.th + checkpoint_<epoch>.th")
    print(f"  {'':12} {'on disk':>10} {'apparent':>10} {'save mean':>10} {'save total':>11}")
    for mode, (_, saves, (blocks, size)) in rows.items():
        print(f"  {mode:12} {blocks / 2**20:8.1f}MB {size / 2**20:8.1f}MB "
              f"{sum(saves) / len(saves):9.3f}s {sum(saves):10.2f}s")
    print(f"  {'ratio':12} {inc[2][0] / full[2][0]:9.2f}x {inc[2][1] / full[2][1]:9.2f}x "
          f"{sum(inc[1]) / sum(full[1]):9.2f}x")
    return full[0]


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def rollback_times(dora_dir: Path, overrides: tuple[str, ...], folder: Path, epochs: int) -> None:
    """Rollback of the same state: in process from memory and from disk, restart, torch.load."""
    import torch

    from solver import builders
    from solver.base import DivergenceError
    from solver.checkpointing.manager import Moment
    from solver.checkpointing.writer import SaveMode
    from solver.train import main

    xp = main.get_xp(list(overrides))
    capture = Capture()
    logging.getLogger('solver').addHandler(capture)
    logging.getLogger('solver').setLevel(logging.INFO)
    with xp.enter():
        solver = builders.get_solver(xp.cfg)
        writer = solver.manager.writer
        writer.mode = SaveMode.ASYNC  # [bench] the run saved synchronously to time its saves
        solver.restore()
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(solver.state_dict()))
        writer.prepare(solver.full_state())
        solver.save_checkpoint(Moment.EPOCH_END)  # the staged copy: the state just loaded, saved again
        writer.wait()
        times = {}
        for source in ('memory', 'disk'):
            if source == 'disk':
                writer.staged = None  # [bench] as after a save whose copy was not kept
                evict(*folder.glob('checkpoint*.th'))
            solver.manager.rollbacks = 0
            begin = time.perf_counter()
            solver.rollback(DivergenceError('bench'))
            times[source] = time.perf_counter() - begin
            logged = [line for line in capture.lines if line.startswith('Rollback: read')][-1]
            assert f'from {source}' in logged, logged
        solver.manager.close()
    path = folder / 'checkpoint.th'
    evict(path)
    begin = time.perf_counter()
    torch.load(path, map_location='cpu', weights_only=True)
    cold_load = time.perf_counter() - begin

    restart = _rollback_and_restart(dora_dir, overrides, folder, epochs)
    print(f"\nRollback of one state ({nbytes / 2**20:.1f} MB: model, Adam, best state; run (a), full files)")
    print(f"  in process, from memory (staged copy)   {times['memory']:7.3f}s")
    print(f"  in process, from disk (cache dropped)   {times['disk']:7.3f}s")
    for what, seconds in restart.items():
        print(f"  {what:40}{seconds:7.3f}s" if seconds is not None else f"  {what:40}    n/a")
    print(f"  cold torch.load of checkpoint.th        {cold_load:7.3f}s")
    print(f"  ratios: memory / cold torch.load = {times['memory'] / cold_load:.2f}x, "
          f"disk / cold torch.load = {times['disk'] / cold_load:.2f}x")


def _tensors(obj: tp.Any) -> tp.Iterator[tp.Any]:
    import torch
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _rollback_and_restart(dora_dir: Path, overrides: tuple[str, ...], folder: Path,
                          epochs: int) -> dict[str, float | None]:
    """`solver rollback <xp> --to epoch:N` (if the command exists), then `dora run` until it has
    resumed; the run is then stopped."""
    env = {**os.environ, 'SOLVER_DORA_DIR': str(dora_dir), 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    target = max(1, epochs - 2)
    has_rollback = shutil.which('solver') is not None and subprocess.run(
        ['solver', 'rollback', '--help'], env=env, capture_output=True).returncode == 0
    rollback = None
    if has_rollback:
        begin = time.perf_counter()
        subprocess.run(['solver', 'rollback', str(folder), '--to', f'epoch:{target}'], env=env, check=True,
                       capture_output=True)
        rollback = time.perf_counter() - begin
    begin = time.perf_counter()
    proc = subprocess.Popen(['dora', 'run', *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    resumed = None
    for line in proc.stdout:
        if 'Resumed from' in line or 'is complete' in line:
            resumed = time.perf_counter() - begin
            break
    proc.kill()
    proc.wait()
    return {f'`solver rollback --to epoch:{target}`': rollback,
            'restart (`dora run` until resumed)': resumed,
            'rollback + restart': (rollback or 0.0) + (resumed or 0.0) if rollback is not None else None}


def main() -> None:
    args = parse_args()
    dora_dir = Path(tempfile.mkdtemp(prefix='bench_incremental_')) / 'dora'
    os.environ['SOLVER_DORA_DIR'] = str(dora_dir)  # before solver.train reads it
    common = ('solver=drum_rnn', f'optim.epochs={args.epochs}', f'optim.updates_per_epoch={args.updates}',
              'checkpoint.save_every=1', 'checkpoint.async_save=false', 'evaluate.every=0', 'generate.every=0')
    print(f"drum RNN, {args.epochs} epochs of {args.updates} updates; Dora folder {dora_dir}")
    source = compare('(a) drum RNN, an epoch file per epoch', common, dora_dir)
    compare('(b) continue_from (a) with optim.freeze=[first,layers.0]',
            (*common, f'continue_from={source}', 'optim.freeze=[first,layers.0]'), dora_dir)
    rollback_times(dora_dir, (*common, 'checkpoint.incremental=false'), source, args.epochs)
    if not args.keep:
        shutil.rmtree(dora_dir.parent)


if __name__ == '__main__':
    main()
