"""Incremental checkpoints vs single files, and rollback times (issue 10), side by side in one run.

1. Bytes on disk and save time, full vs `checkpoint.incremental=true`, from real `dora run`s
   (synchronous saves, so that a save's "loop blocked" is its whole duration):
   (a) the drum RNN (default size, 2.0 M parameters) with `checkpoint_<epoch>.th` every epoch;
   (b) a `continue_from` fine-tune of (a)'s result with `optim.freeze=[first,layers.0]`
       (the first two of the three LSTM layers).
   Bytes on disk are the blocks the checkpoint files and blobs take (`st_blocks`), after the run.
   (c) one Dora folder's store (issue 24): a pretrain and three `continue_from` fine-tunes of it
       with `optim.freeze=[first,layers.0]` (learning rates 1e-3, 5e-4, 2e-4), all full files in
       one Dora folder and all incremental in another: bytes of every `*.th` under `xps/` (lineage
       `start.th` included) and of the shared store, against the per-experiment stores the same
       files would have (each experiment's blobs, those its own files name, counted per
       experiment), and against counting each blob once.
2. Rollback times for one state (run (a)'s last checkpoint), through the solver's own
   `rollback()` (built in process from the same config): from the async writer's staged copy
   (memory), from disk with the page cache of the files dropped (posix_fadvise DONTNEED),
   `solver rollback --to epoch:N` + a restart until it logs "Resumed from" (if this branch has
   the command), beside a cold `torch.load` of the same file.

    python scripts/bench_incremental.py                 # 10 epochs of 2 updates: ~10 min on 2 cores
    python scripts/bench_incremental.py --epochs 4      # a quicker look
    python scripts/bench_incremental.py --only shared   # (c) alone
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
    parser.add_argument('--only', choices=['all', 'shared'], default='all', help="'shared': (c) alone")
    parser.add_argument('--latest-only', action='store_true',
                        help="(c) with checkpoint.th alone (the default config), not an epoch file per epoch")
    parser.add_argument('--model', default='', help="model overrides for (c), e.g. 'model.hidden_size=128'")
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


def shared_store(dora_root: Path, common: tuple[str, ...], model: tuple[str, ...]) -> None:
    """(c): a pretrain and three frozen fine-tunes, full files in one Dora folder, incremental in another."""
    from solver import lineage
    from solver.checkpointing import blobs, store

    tunes = [f'optim.lr={lr}' for lr in ('1e-3', '5e-4', '2e-4')]
    folders: dict[str, list[Path]] = {}
    for mode in ('full', 'incremental'):
        dora_dir = dora_root / mode
        base = (*common, *model, f'checkpoint.incremental={mode == "incremental"}')
        pretrain, _ = run(dora_dir, *base)
        folders[mode] = [pretrain] + [run(dora_dir, *base, f'continue_from={pretrain}', 'optim.freeze=[first,layers.0]',
                                          tune)[0] for tune in tunes]

    def blocks(paths: tp.Iterable[Path]) -> int:
        return sum(p.stat().st_blocks * 512 for p in paths)

    full = blocks(p for folder in folders['full'] for p in store.checkpoint_files(folder))
    xps = folders['incremental']
    files = blocks(p for folder in xps for p in store.checkpoint_files(folder))
    shared_dir = store.IncrementalStore(xps[0]).blobs
    on_disk = {p.name: p.stat().st_blocks * 512 for p in shared_dir.iterdir() if blobs.KEY.match(p.name)}
    own = [store.referenced(folder, shared=True) or set() for folder in xps]
    per_xp = sum(on_disk[key] for keys in own for key in keys)
    once = sum(on_disk[key] for key in set().union(*own))
    # Before this change a fine-tune's start.th was a full file: its blobs counted out, the full file in.
    before = [{key for path in store.checkpoint_files(folder) if path.name != lineage.START
               for key in store._refs(path, shared=True)} for folder in xps]
    files_before = blocks(p for folder in xps for p in store.checkpoint_files(folder) if p.name != lineage.START)
    starts = blocks(p for folder in folders['full'] for p in store.checkpoint_files(folder) if p.name == lineage.START)
    per_xp_before = files_before + starts + sum(on_disk[key] for keys in before for key in keys)
    files_kept = 'an epoch file per epoch' if any('save_every' in o for o in common) else 'checkpoint.th alone'
    print(f"\n(c) a pretrain + 3 fine-tunes with optim.freeze=[first,layers.0] ({' '.join(model) or 'default model'}, "
          f"{files_kept}): bytes on disk of every *.th under xps/ (start.th included) and of the blobs")
    rows = [('full files', full), ('per-experiment stores, start.th full', per_xp_before),
            ('per-experiment stores', files + per_xp),
            ('one store for the Dora folder', files + sum(on_disk.values())),
            ('  each blob counted once', files + once)]
    for name, nbytes in rows:
        print(f"  {name:38} {nbytes / 2**20:8.2f}MB {nbytes / full:6.2f}x")
    print(f"  (checkpoint files alone {files / 2**20:.2f}MB; {len(on_disk)} blobs in {shared_dir}; "
          f"{sum(len(keys) for keys in own)} blob references counted per experiment)")


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
    shared_store(dora_dir.parent / 'shared', tuple(o for o in common if not (args.latest_only and 'save_every' in o)),
                 tuple(args.model.split()))
    if args.only == 'shared':
        return None if args.keep else shutil.rmtree(dora_dir.parent)
    source = compare('(a) drum RNN, an epoch file per epoch', common, dora_dir)
    compare('(b) continue_from (a) with optim.freeze=[first,layers.0]',
            (*common, f'continue_from={source}', 'optim.freeze=[first,layers.0]'), dora_dir)
    rollback_times(dora_dir, (*common, 'checkpoint.incremental=false'), source, args.epochs)
    if not args.keep:
        shutil.rmtree(dora_dir.parent)


if __name__ == '__main__':
    main()
