"""Checkpoint saving and loading against the limits of this machine's disk and memory (issues 5, 16).

For each size, a model + Adam state of ~260 tensors (an MLP: 65 parameters, each with Adam's
step, exp_avg and exp_avg_sq) is saved and loaded every way we care about; every repeat runs
all the variants in turn, so that other jobs on a shared machine slow them alike, and medians
are printed. Ratios compare with figures of the same run:

- `x disk`:   disk time / time: 1.00 = as fast as writing (or reading) the same bytes plainly;
- `x memcpy`: time / the copy of the state into preallocated buffers (what async must pay);
- `x sync`:   time / our synchronous save.

"Cold" loads first drop the file from the page cache (fsync, then posix_fadvise DONTNEED:
`echo 1 > /proc/sys/vm/drop_caches` works too as root, but empties every job's cache); loads
compare with the disk read of the same cache state. Before each variant `os.sync()` lets the disk
finish what the previous one left (write-back, the discards of deleted files). `page cache`
is the growth of /proc/meminfo's Cached during a variant (other jobs move it too).

"Into the live state" is a resume: `read_checkpoint(into=state)` reads the bytes into the
model's and optimizer's own (touched) tensors, then `load_state_dict`, which copies nothing.
Saves write with O_DIRECT by default (`archive.DIRECT_WRITES`), loads read buffered: the
"buffered" and "O_DIRECT" variants set the other way.

    python scripts/bench_checkpoint.py                       # 256 MiB and 1 GiB, 3 repeats (~2 min)
    python scripts/bench_checkpoint.py --sizes 1024 --repeats 5 --json FILE   # the README's figures
    python scripts/bench_checkpoint.py --sizes '' --train --rounds 6  # training overhead (~4 min idle)
    python scripts/bench_checkpoint.py --sizes '' --train-runs 3      # ... as whole dora runs

`--json FILE` writes every figure (each run, medians, page-cache growth) and, per size, the
ratios named in issue 16: `sync_save_x_disk` (disk write + fsync / our sync save),
`load_cold_x_disk` (cold disk read into touched memory / our cold load into the live state),
`load_cached_x_torch_load` (torch.load cached / ours cached), `async_blocked_x_memcpy` (our
blocked time / the memcpy of the same state into touched buffers measured right before it: the
median of the repeats' ratios), `first_async_blocked_x_memcpy` (the same for the first save
after `prepare()`) and `dcp_async_blocked_x_ours`
(dcp.async_save's blocked time / ours): above 1 is better for every one but the two
`x_memcpy`, where at most 1 is the goal.

`--train-runs N` times N pairs of whole `dora run solver=drum_rnn` runs (hidden 1024 x 4 layers:
about 0.5 GiB of model, Adam and best state; 4 short epochs), one with an async save at every
epoch's end and one saving nothing, from the outside: wall time of each process.

`--train` trains the drum RNN (`DrumRNN`, hidden 2048 x 2 layers: about 0.85 GiB of model, Adam
and best state) on random events, with an epoch as long as 20 synchronous saves, and compares
an epoch with an async save at its end (and the previous epoch's save writing during it) with
an epoch without, in adjacent pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.utils.serialization as serialization
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from solver.checkpointing import (  # noqa: E402
    archive,
    directio,
    envelope,  # noqa: E402
    tree,
)
from solver.checkpointing.fs import evict, fsync_dir  # noqa: E402
from solver.checkpointing.writer import CheckpointWriter, SaveMode  # noqa: E402
from solver.drums.model import NUM_EVENTS, DrumRNN  # noqa: E402

MiB = 1 << 20
CHUNK = 16 * MiB
META = {'epoch': 1, 'step': 100, 'config': {'optim': {'lr': 1e-3}}}


def make_state(nbytes: int) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, tp.Any]]:
    """A model + Adam state of about `nbytes` in 260 tensors (parameters are a third of it)."""
    width = int(math.sqrt(nbytes / 4 / 3 / 33))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(32)], nn.Linear(width, width, bias=False))
    optimizer = torch.optim.Adam(model.parameters())
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    return model, optimizer, {'model': model.state_dict(), 'optimizer': optimizer.state_dict()}


def tensors_of(state: tp.Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree.skeleton(state, found)
    return found


fsync_path = fsync_dir  # opens any path read-only and fsyncs it, file or folder



def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def page_cache_mib() -> float:
    """The kernel's page cache (Cached in /proc/meminfo), in MiB."""
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('Cached:'):
                return int(line.split()[1]) / 1024
    return float('nan')


@contextlib.contextmanager
def direct_io(writes: bool, reads: bool) -> tp.Iterator[None]:
    """Checkpoints written and read with O_DIRECT or not (`archive.DIRECT_*`) inside the block."""
    before = archive.DIRECT_WRITES, archive.DIRECT_READS
    archive.DIRECT_WRITES, archive.DIRECT_READS = writes, reads
    try:
        yield
    finally:
        archive.DIRECT_WRITES, archive.DIRECT_READS = before


def process_cpu() -> float:
    """User + system CPU seconds of this process so far, all threads."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def timed(function: tp.Callable[[], tp.Any]) -> float:
    begin = time.perf_counter()
    function()
    return time.perf_counter() - begin


def settle() -> None:
    """Let the disk finish what earlier variants left it (write-back, discards of deleted files)."""
    os.sync()


class SaveLoadBench:
    """One state of a given size and every variant measured on it; `run_once` adds one repeat."""

    def __init__(self, nbytes: int, folder: Path) -> None:
        self.model, self.optimizer, self.state = make_state(nbytes)
        self.tensors = tensors_of(self.state)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        self.copies = [torch.empty_like(t) for t in self.tensors]
        for copy, tensor in zip(self.copies, self.tensors):
            copy.copy_(tensor)  # touched: a second copy costs what a reused buffer costs
        self.folder = folder
        self.ours = folder / 'checkpoint.th'
        self.read_buffer = torch.ones(self.nbytes + 16 * MiB, dtype=torch.uint8)
        self.times: dict[str, list[float]] = {}
        self.cache: dict[str, list[float]] = {}  # page-cache growth during each run, MiB
        envelope.write_checkpoint(self.ours, self.state, META)  # a previous checkpoint to replace
        self.writer = CheckpointWriter(SaveMode.ASYNC)
        self.writer.prepare(self.state)  # as StandardSolver.run does before the first epoch
        self.first_async: tuple[float, float] | None = None  # blocked, memcpy right before it
        self.async_pairs: list[tuple[float, float]] = []    # each repeat's (blocked, memcpy right before)

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def measure(self, name: str, function: tp.Callable[[], tp.Any]) -> None:
        """Time `function` and the page cache's growth while it runs."""
        before = page_cache_mib()
        self.add(name, timed(function))
        self.cache.setdefault(name, []).append(page_cache_mib() - before)

    # -- the limits ----------------------------------------------------------------------------

    def disk_write(self) -> float:
        path = self.folder / 'raw.bin'
        remove(path)
        begin = time.perf_counter()
        with open(path, 'wb') as f:
            for tensor in self.tensors:
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - begin

    def disk_read(self, path: Path, fresh: bool = False) -> float:
        """Read the file into a preallocated (touched) buffer, or fresh memory, 16 MiB per call."""
        size = path.stat().st_size
        view = memoryview((torch.empty(size, dtype=torch.uint8) if fresh else self.read_buffer).numpy())
        begin = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < size:
                done += os.preadv(fd, [view[done:done + CHUNK]], done) or size
        finally:
            os.close(fd)
        return time.perf_counter() - begin

    def memcpy(self) -> float:
        begin = time.perf_counter()
        for copy, tensor in zip(self.copies, self.tensors):
            copy.copy_(tensor)
        return time.perf_counter() - begin

    def memcpy_fresh(self) -> float:
        return timed(lambda: [t.clone() for t in self.tensors])

    # -- saves ---------------------------------------------------------------------------------

    def ours_sync(self) -> float:
        return timed(lambda: envelope.write_checkpoint(self.ours, self.state, META))

    def ours_async(self) -> tuple[float, float]:
        begin, cpu = time.perf_counter(), process_cpu()
        stats = self.writer.save(self.state, {self.folder / 'async.th': None}, META)
        self.writer.wait()
        self.add('our async save: CPU time, all threads', process_cpu() - cpu)  # what it takes from training
        return stats.blocked, time.perf_counter() - begin

    def torch_save(self, crc32: bool = True) -> float:
        path = self.folder / 'torch.th'
        remove(path)
        begin = time.perf_counter()
        with open(path, 'wb') as f, serialization.config.patch({'save.compute_crc32': crc32}):
            torch.save(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - begin

    def breakdown(self) -> None:
        """Where a synchronous save's time goes: digests, torch.save's CRC32, flush-behind."""
        self.add('  digests (xxh3) alone', timed(lambda: envelope.digests(self.state)))
        settle()
        self.add('  torch.save without CRC32 + fsync', self.torch_save(crc32=False))
        settle()
        with contextlib.ExitStack() as stack:  # our buffered save with the kernel's default write-back
            stack.enter_context(direct_io(writes=False, reads=archive.DIRECT_READS))
            stack.callback(setattr, directio, '_sync_range', directio._sync_range)
            directio._sync_range = None
            self.add('  our sync save without flush-behind', self.ours_sync())

    def dcp_save(self) -> float:
        path = self.folder / 'dcp'
        remove(path)
        return timed(lambda: dcp.save(self.state, checkpoint_id=path, no_dist=True))

    def dcp_async_save(self) -> tuple[float, float]:
        path = self.folder / 'dcp_async'
        remove(path)
        begin = time.perf_counter()
        future = dcp.async_save(self.state, checkpoint_id=path, no_dist=True)
        blocked = time.perf_counter() - begin
        future.result()
        return blocked, time.perf_counter() - begin

    # -- loads ---------------------------------------------------------------------------------

    def load_into_model(self, into_live: bool = False) -> None:
        """A resume: read the checkpoint (into the live tensors, or fresh ones), load_state_dict."""
        ckpt = envelope.read_checkpoint(self.ours, into=self.state if into_live else None)
        self.model.load_state_dict(ckpt.state['model'])
        self.optimizer.load_state_dict(ckpt.state['optimizer'])
        self.state = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict()}
        self.tensors = tensors_of(self.state)
        assert not into_live or len(ckpt.live) == len(self.tensors), "not all read into the live state"

    def load_direct(self) -> None:
        with direct_io(writes=archive.DIRECT_WRITES, reads=True):
            self.load_into_model(into_live=True)

    def loads(self, turn: int) -> None:
        variants: list[tuple[str, tp.Callable[[], tp.Any]]] = [
            ('disk read', lambda: self.disk_read(self.ours)),
            ('disk read into fresh memory', lambda: self.disk_read(self.ours, fresh=True)),
            ('our load into the live state', lambda: self.load_into_model(into_live=True)),
            ('our load into the live state, O_DIRECT', self.load_direct),
            ('our load (fresh tensors)', lambda: envelope.read_checkpoint(self.ours)),
            ('torch.load(weights_only)', lambda: torch.load(self.ours, weights_only=True)),
            ('our load (fresh) + load_state_dict', self.load_into_model),
        ]
        turn %= len(variants)  # each repeat starts with another variant
        for name, load in variants[turn:] + variants[:turn]:
            evict(self.ours)
            settle()
            self.measure(f'{name}, cold', load)
            self.measure(f'{name}, cached', load)

    def ours_sync_buffered(self) -> float:
        with direct_io(writes=False, reads=archive.DIRECT_READS):
            return self.ours_sync()

    def run_once(self, turn: int, breakdown: bool = False) -> None:
        for name, variant in [('disk write + fsync', self.disk_write),
                              ('memcpy into preallocated buffers', self.memcpy),
                              ('memcpy into fresh memory', self.memcpy_fresh),
                              ('our sync save, buffered', self.ours_sync_buffered),
                              ('our sync save', self.ours_sync)]:
            settle()
            self.measure(name, variant)
        if breakdown:
            self.breakdown()
        settle()
        memcpy = self.memcpy()  # right before the save: the same state of caches and memory
        blocked, durable = self.ours_async()
        self.add('memcpy right before the async save', memcpy)
        self.async_pairs.append((blocked, memcpy))
        if self.first_async is None:
            self.first_async = (blocked, memcpy)
        self.add('our async save: loop blocked', blocked)
        self.add('our async save: until durable', durable)
        settle()
        self.add('torch.save + fsync', self.torch_save())
        settle()
        self.add('dcp.save', self.dcp_save())
        settle()
        blocked, durable = self.dcp_async_save()
        self.add('dcp.async_save: blocked', blocked)
        self.add('dcp.async_save: until durable', durable)
        self.loads(turn)

    def ratios(self) -> dict[str, float]:
        """The ratios of issue 16, from the medians of this run (see the module doc)."""
        median = {name: statistics.median(values) for name, values in self.times.items()}
        blocked = median['our async save: loop blocked']
        ratios = {
            'sync_save_x_disk': median['disk write + fsync'] / median['our sync save'],
            'sync_save_buffered_x_disk': median['disk write + fsync'] / median['our sync save, buffered'],
            'load_cold_x_disk': median['disk read, cold'] / median['our load into the live state, cold'],
            'load_cold_direct_x_disk':
                median['disk read, cold'] / median['our load into the live state, O_DIRECT, cold'],
            'load_cached_x_torch_load':
                median['torch.load(weights_only), cached'] / median['our load into the live state, cached'],
            # each save against the memcpy measured right before it, the median of the repeats
            'async_blocked_x_memcpy': statistics.median(b / m for b, m in self.async_pairs),
            'dcp_async_blocked_x_ours': median['dcp.async_save: blocked'] / blocked,
        }
        if self.first_async is not None:
            ratios['first_async_blocked_x_memcpy'] = self.first_async[0] / self.first_async[1]
        return ratios

    def figures(self) -> dict[str, tp.Any]:
        """Every figure of this size, for --json."""
        return {
            'nbytes': self.nbytes, 'tensors': len(self.tensors),
            'figures': {name: {'median_s': statistics.median(values), 'runs_s': values,
                               'page_cache_growth_mib': self.cache.get(name)}
                        for name, values in self.times.items()},
            'first_async': {'blocked_s': self.first_async[0], 'memcpy_s': self.first_async[1]}
            if self.first_async else None,
            'ratios': self.ratios(),
        }

    def report(self) -> None:
        median = {name: statistics.median(values) for name, values in self.times.items()}
        disk, memcpy = median['disk write + fsync'], median['memcpy into preallocated buffers']
        sync = median['our sync save']
        ratios = {
            'disk write + fsync': (disk, 'x disk'),
            'memcpy into fresh memory': (memcpy, 'x memcpy, time'),
            'our sync save': (disk, 'x disk'),
            'our sync save, buffered': (disk, 'x disk'),
            '  torch.save without CRC32 + fsync': (disk, 'x disk'),
            '  our sync save without flush-behind': (disk, 'x disk'),
            'our async save: loop blocked': (median['memcpy right before the async save'], 'x memcpy, time'),
            'our async save: until durable': (sync, 'x sync, time'),
            'torch.save + fsync': (disk, 'x disk'),
            'dcp.save': (disk, 'x disk'),
            'dcp.async_save: blocked': (memcpy, 'x memcpy, time'),
            'dcp.async_save: until durable': (sync, 'x sync, time'),
        }
        print(f"\n### {self.nbytes / MiB:.0f} MiB in {len(self.tensors)} tensors "
              f"(medians of {len(self.times['our sync save'])})\n")
        print(f"| {'operation':<50} | {'time':>8} | {'ratio':<22} | {'cache':>9} | runs")
        print(f"|{'-' * 52}|{'-' * 10}|{'-' * 24}|{'-' * 11}|-----")
        for name, value in median.items():
            if name.endswith(', cold') or name.endswith(', cached'):  # vs the disk read of the same cache
                base, kind = median['disk read' + name[name.rindex(','):]], 'x disk'
            else:
                base, kind = ratios.get(name, (None, ''))
            if base is None:
                ratio = ''
            elif kind == 'x disk':
                ratio = f"{base / value:.2f} x disk"
            else:
                ratio = f"{value / base:.2f} {kind}"
            runs = ' '.join(f"{v:.3f}" for v in self.times[name])
            cache = f"{statistics.median(self.cache[name]):+.0f} MiB" if name in self.cache else ''
            print(f"| {name:<50} | {value:7.3f}s | {ratio:<22} | {cache:>9} | {runs}")
        if self.first_async is not None:
            blocked, copy = self.first_async
            print(f"\nfirst async save after prepare(): blocked {blocked:.3f}s, {blocked / copy:.2f} x the "
                  f"memcpy right before it ({copy:.3f}s); included above")
        print("\nratios (issue 16): " + ', '.join(f"{k} {v:.2f}" for k, v in self.ratios().items()))

    def close(self) -> None:
        self.writer.close()


# -- training overhead ------------------------------------------------------------------------

def train_overhead(args: argparse.Namespace, folder: Path) -> None:
    torch.manual_seed(0)
    model = DrumRNN(hidden_size=args.hidden, num_layers=args.layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    events = torch.randint(0, NUM_EVENTS, (args.batch, args.length + 1))

    def step() -> None:
        logits, _ = model(events[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, NUM_EVENTS), events[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # Adam's state exists from here
    best = {k: v.clone() for k, v in model.state_dict().items()}

    def state() -> dict[str, tp.Any]:
        return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'best_state': best}

    nbytes = sum(t.numel() * t.element_size() for t in tensors_of(state()))
    path = folder / 'train.th'
    sync_save = statistics.median(timed(lambda: envelope.write_checkpoint(path, state(), META)) for _ in range(3))
    step()  # the first steps touch fresh memory
    step_time = statistics.median(timed(step) for _ in range(3))
    steps = args.steps or max(2, math.ceil(20 * sync_save / step_time))
    print(f"\n### Training overhead: DrumRNN hidden {args.hidden} x {args.layers} layers, batch "
          f"{args.batch} x {args.length}: {nbytes / MiB:.0f} MiB of state\n")
    print(f"sync save {sync_save:.2f}s, step {step_time:.2f}s: {steps} steps per epoch "
          f"(~{steps * step_time / sync_save:.0f}x the save)")
    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.prepare(state())

    def epoch(save: bool) -> float:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        if save:
            blocked.append(writer.save(state(), {path: None}, META).blocked)
        return time.perf_counter() - begin

    # Each round: an epoch with no save (A); an epoch that saves at its end (not counted), whose
    # write runs during the next epoch (B), which saves too: B pays one background write and one
    # snapshot, as every epoch of a run with a save per epoch does. Then the last write is waited
    # for, so that A never overlaps one. Pairs taken minutes apart would mostly measure the
    # other jobs of a shared machine.
    without, with_saves, blocked = [], [], []
    for _ in range(args.rounds):
        without.append(epoch(save=False))
        epoch(save=True)
        with_saves.append(epoch(save=True))
        writer.wait()
    writer.close()
    ratios = [b / a for a, b in zip(without, with_saves)]
    print(f"epoch without saves {statistics.median(without):.2f}s {[round(t, 2) for t in without]}")
    print(f"epoch with an async save {statistics.median(with_saves):.2f}s {[round(t, 2) for t in with_saves]} "
          f"(loop blocked {statistics.median(blocked):.3f}s per save)")
    print(f"overhead: {100 * (statistics.median(ratios) - 1):+.1f}% (median of the rounds: "
          f"{' '.join(f'{100 * (r - 1):+.1f}%' for r in ratios)})")


README_ROWS = [  # (label, figure, base figure, how the ratio reads)
    ('disk: write + fsync of the same bytes', 'disk write + fsync', None, ''),
    ('our sync save (O_DIRECT, the default)', 'our sync save', 'disk write + fsync', 'x disk'),
    ('our sync save, buffered', 'our sync save, buffered', 'disk write + fsync', 'x disk'),
    ('torch.save + fsync', 'torch.save + fsync', 'disk write + fsync', 'x disk'),
    ('dcp.save', 'dcp.save', 'disk write + fsync', 'x disk'),
    ('memcpy into touched buffers, right before the async save', 'memcpy right before the async save', None, ''),
    ('our async save: loop blocked', 'our async save: loop blocked', 'memcpy right before the async save',
     'x memcpy'),
    ('dcp.async_save: loop blocked', 'dcp.async_save: blocked', 'memcpy right before the async save', 'x memcpy'),
    ('our async save: until durable', 'our async save: until durable', None, ''),
    ('disk: read cold into touched memory', 'disk read, cold', None, ''),
    ('our load into the live state, cold', 'our load into the live state, cold', 'disk read, cold', 'x disk'),
    ('... with O_DIRECT, cold', 'our load into the live state, O_DIRECT, cold', 'disk read, cold', 'x disk'),
    ('our load (fresh) + load_state_dict, cold', 'our load (fresh) + load_state_dict, cold', 'disk read, cold',
     'x disk'),
    ('torch.load(weights_only), cold', 'torch.load(weights_only), cold', 'disk read, cold', 'x disk'),
    ('our load into the live state, cached', 'our load into the live state, cached',
     'torch.load(weights_only), cached', 'x torch.load'),
    ('torch.load(weights_only), cached', 'torch.load(weights_only), cached', None, ''),
]


def readme_table(size: str, figures: dict[str, tp.Any]) -> str:
    """The README's performance table for one size, from this run's medians."""
    median = {name: f['median_s'] for name, f in figures['figures'].items()}
    cache = {name: f['page_cache_growth_mib'] for name, f in figures['figures'].items()}
    lines = [f"| {size} MiB, {figures['tensors']} tensors | time | ratio | page cache |", "|---|---|---|---|"]
    for label, name, base, kind in README_ROWS:
        if kind == 'x memcpy':
            ratio = f"{median[name] / median[tp.cast(str, base)]:.2f} x memcpy"
        elif base is not None:
            ratio = f"{median[base] / median[name]:.2f} {kind}"
        else:
            ratio = ''
        growth = f"{statistics.median(cache[name]):+.0f} MiB" if cache.get(name) else ''
        lines.append(f"| {label} | {median[name]:.3f} s | {ratio} | {growth} |")
    if figures['first_async']:
        first = figures['first_async']
        lines.append(f"| first async save after `prepare()`: blocked | {first['blocked_s']:.3f} s | "
                     f"{first['blocked_s'] / first['memcpy_s']:.2f} x memcpy | |")
    return '\n'.join(lines)


def train_runs(args: argparse.Namespace, folder: Path) -> dict[str, tp.Any]:
    """Whole `dora run` processes, in adjacent pairs: an async save at every epoch's end vs none."""
    root = Path(__file__).resolve().parent.parent
    common = ['solver=drum_rnn', f'model.hidden_size={args.run_hidden}', f'model.num_layers={args.run_layers}',
              f'optim.epochs={args.run_epochs}', f'optim.updates_per_epoch={args.run_updates}',
              f'dataset.batch_size={args.run_batch}']
    # Saving nothing: no staging buffers either (their allocation is part of what async saving costs).
    variants = {'no saves': ['checkpoint.save_last=false', 'checkpoint.async_save=false', 'checkpoint.allow_none=true'],
                'async save per epoch': ['checkpoint.save_last=true', 'checkpoint.async_save=true']}
    env = {**os.environ, 'SOLVER_DORA_DIR': str(folder / 'dora')}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}  # user + system seconds of the run's processes
    print(f"\n### Training overhead, whole runs: dora run {' '.join(common)}\n")
    for pair in range(args.train_runs):
        order = list(variants) if pair % 2 == 0 else list(reversed(variants))  # neither always first
        for name in order:
            begin, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run(['dora', 'run', '--clear', *common, *variants[name]], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            elapsed, now = time.perf_counter() - begin, resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime)
            if proc.returncode:
                sys.exit(f"dora run failed ({name}):\n{proc.stdout[-3000:]}")
            times[name].append(elapsed)
            print(f"pair {pair + 1} {name}: {elapsed:.1f}s, {cpu[name][-1]:.1f} CPU s", flush=True)
    ratios = [b / a for a, b in zip(times['no saves'], times['async save per epoch'])]
    cpu_ratios = [b / a for a, b in zip(cpu['no saves'], cpu['async save per epoch'])]
    print(f"run time with / without saves: {statistics.median(ratios):.3f}x (median of {len(ratios)} pairs: "
          f"{' '.join(f'{r:.3f}' for r in ratios)})")
    print(f"CPU time with / without saves: {statistics.median(cpu_ratios):.3f}x (median of {len(cpu_ratios)} "
          f"pairs: {' '.join(f'{r:.3f}' for r in cpu_ratios)})")
    return {'command': ['dora', 'run', *common], 'variants': variants, 'runs_s': times, 'ratios': ratios,
            'train_runs_x_no_save': statistics.median(ratios), 'cpu_s': cpu, 'cpu_ratios': cpu_ratios,
            'train_runs_cpu_x_no_save': statistics.median(cpu_ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', default='256,1024', help='state sizes in MiB, comma-separated')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--dir', type=Path, default=None, help='where to write (default: a temporary folder)')
    parser.add_argument('--breakdown', action='store_true', help="also where a sync save's time goes")
    parser.add_argument('--train', action='store_true', help='also measure the training overhead of async saves')
    parser.add_argument('--hidden', type=int, default=2048)
    parser.add_argument('--layers', type=int, default=2)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--length', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=4, help='pairs of epochs with and without a save')
    parser.add_argument('--steps', type=int, default=0, help='steps per epoch (default: 20 sync saves long)')
    parser.add_argument('--train-runs', type=int, default=0, help='pairs of whole dora runs, with and without saves')
    parser.add_argument('--run-hidden', type=int, default=1024)
    parser.add_argument('--run-layers', type=int, default=4)
    parser.add_argument('--run-epochs', type=int, default=4)
    parser.add_argument('--run-updates', type=int, default=5, help='updates per epoch of the whole runs')
    parser.add_argument('--run-batch', type=int, default=8, help='batch size of the whole runs')
    parser.add_argument('--json', type=Path, default=None, help='write every figure and the ratios to this file')
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results: dict[str, tp.Any] = {'command': sys.argv, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
                                  'load_average_start': os.getloadavg(), 'sizes': {}}
    with tempfile.TemporaryDirectory(prefix='bench_checkpoint_', dir=args.dir) as tmp:
        for size in [int(s) for s in args.sizes.split(',') if s.strip()]:
            folder = Path(tmp) / f'{size}'
            folder.mkdir()
            bench = SaveLoadBench(size * MiB, folder)
            with contextlib.ExitStack() as stack:
                stack.callback(bench.close)
                for turn in range(args.repeats):
                    bench.run_once(turn, args.breakdown)
            bench.report()
            results['sizes'][str(size)] = bench.figures()
            print(f"\nREADME table:\n\n{readme_table(str(size), results['sizes'][str(size)])}")
            del bench
            shutil.rmtree(folder)
        if args.train:
            train_overhead(args, Path(tmp))
        if args.train_runs:
            results['train_runs'] = train_runs(args, Path(tmp))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results['load_average_end'] = os.getloadavg()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"figures and ratios written to {args.json}")


if __name__ == '__main__':
    main()
