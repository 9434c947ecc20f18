"""Sharded checkpoints (DCP, every rank writes its shards) beside a consolidated rank-0 save of
the same state, at several world sizes (CPU, gloo), with the peak memory of every rank.

    python scripts/bench_distributed.py --mb 512
    python scripts/bench_distributed.py --mb 85 --ranks 1 2 4 8 --sharded-only   # time vs ranks

The state is an FSDP2-sharded stack of linear layers and its Adam optimizer (3 x --mb). Per
world size, in one run of fresh processes:

- sharded save:      `envelope.write_checkpoint` of the DTensor state (shards + file, digests)
- sharded load:      `envelope.read_checkpoint(like=state)`: each rank reads its shards
- consolidated save: full state gathered on rank 0 (`get_state_dict(full_state_dict=True,
                     cpu_offload=True)`), written by rank 0 with `write_checkpoint`
- consolidated load: every rank reads the whole file and keeps its shards (`like=state`)

Times are the slowest rank's, each the best of --repeat. Memory is the peak RSS a phase adds
over what the process held before it (VmHWM, reset before each phase via /proc/self/clear_refs).
With several world sizes, sharded save and load are also given against 1 rank, with the size of
DCP's global `.metadata` and the number of files per checkpoint (what grows with the ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solver import distrib  # noqa: E402
from solver.checkpointing import envelope  # noqa: E402

PHASES = ('sharded save', 'sharded load', 'consolidated save', 'consolidated load')


def rss_mb(field: str) -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(fn: tp.Callable[[], tp.Any]) -> tuple[float, float]:
    """(seconds, MB of peak RSS over the RSS before), with every rank started together."""
    Path('/proc/self/clear_refs').write_text('5')  # reset VmHWM to the current RSS
    before = rss_mb('VmRSS')
    dist.barrier()
    begin = time.perf_counter()
    result = fn()
    dist.barrier()
    seconds = time.perf_counter() - begin
    peak = rss_mb('VmHWM') - before
    del result
    return seconds, peak


def build(mb: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    width = 1024
    layers = max(1, mb * 2**20 // (4 * width * width))
    with torch.device('meta'):
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    mesh = init_device_mesh('cpu', (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device='cpu')
    with torch.no_grad():
        for param in model.parameters():
            param.to_local().uniform_(-0.05, 0.05)
    optimizer = torch.optim.Adam(model.parameters())
    distrib.init_optimizer_state(optimizer)
    return model, optimizer


def worker(rank: int, world: int, port: int, mb: int, repeat: int, folder: str, out: str, phases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model, optimizer = build(mb)
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict()}
    meta = {'epoch': 1}
    sharded_path, full_path = Path(folder) / 'sharded.th', Path(folder) / 'full.th'

    def consolidated_save() -> None:
        model_state, optim_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            envelope.write_checkpoint(full_path, {'model': model_state, 'optimizer': optim_state}, meta)

    run = {
        'sharded save': lambda: envelope.write_checkpoint(sharded_path, state, meta),
        'sharded load': lambda: envelope.read_checkpoint(sharded_path, like=state),
        'consolidated save': consolidated_save,
        'consolidated load': lambda: envelope.read_checkpoint(full_path, like=state),
    }
    results = {}
    for name in phases:
        runs = [measure(run[name]) for _ in range(repeat)]
        results[name] = {'seconds': min(r[0] for r in runs), 'peak_mb': max(r[1] for r in runs)}
    shard_mb = sum(t.to_local().numel() * t.element_size() for t in checkpoint_tensors(state)) / 2**20
    [shards] = Path(folder).glob('sharded.th.dcp.*')
    files = {'count': len(list(shards.iterdir())), 'metadata_kb': (shards / '.metadata').stat().st_size / 1024}
    Path(out, f'rank{rank}.json').write_text(json.dumps({'results': results, 'shard_mb': shard_mb, 'files': files}))
    dist.destroy_process_group()


def checkpoint_tensors(state: tp.Any) -> list[tp.Any]:
    if isinstance(state, torch.Tensor):
        return [state] if hasattr(state, 'to_local') else []
    if isinstance(state, dict):
        return [t for v in state.values() for t in checkpoint_tensors(v)]
    return []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run(world: int, mb: int, repeat: int, root: Path, phases: list[str]) -> list[dict]:
    folder, out = root / f'ckpt{world}', root / f'out{world}'
    folder.mkdir()
    out.mkdir()
    mp.spawn(worker, args=(world, free_port(), mb, repeat, str(folder), str(out), phases), nprocs=world)
    return [json.loads((out / f'rank{r}.json').read_text()) for r in range(world)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mb', type=int, default=256, help='model parameters in MB (the state is 3x)')
    parser.add_argument('--ranks', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--dir', default=None, help='where to write (default: a temporary folder)')
    parser.add_argument('--sharded-only', action='store_true', help='skip the consolidated save and load')
    args = parser.parse_args()
    phases = [p for p in PHASES if not (args.sharded_only and p.startswith('consolidated'))]
    root = Path(tempfile.mkdtemp(prefix='bench_distributed_', dir=args.dir))
    try:
        table = {world: run(world, args.mb, args.repeat, root, phases) for world in args.ranks}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"State: {args.mb} MB of parameters + Adam = {3 * args.mb} MB; best of {args.repeat}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo.")
    print(f"{'ranks':>5}  {'phase':<18} {'time s':>7}  peak RSS added per rank, MB (shard held: MB)")
    for world, ranks in table.items():
        for phase in phases:
            seconds = max(r['results'][phase]['seconds'] for r in ranks)
            peaks = ', '.join(f"r{i} {r['results'][phase]['peak_mb']:.0f}" for i, r in enumerate(ranks))
            print(f"{world:>5}  {phase:<18} {seconds:>7.2f}  {peaks} ({ranks[0]['shard_mb']:.0f})")
    def slowest(world: int, phase: str) -> float:
        return max(r['results'][phase]['seconds'] for r in table[world])

    if not args.sharded_only:
        print("Ratios (consolidated / sharded):")
        for world, ranks in table.items():
            r0 = ranks[0]['results']
            save = slowest(world, 'consolidated save') / slowest(world, 'sharded save')
            load = slowest(world, 'consolidated load') / slowest(world, 'sharded load')
            memory = r0['consolidated save']['peak_mb'] / max(r0['sharded save']['peak_mb'], 1.0)
            print(f"  {world} rank(s): save time x{save:.2f}, load time x{load:.2f}, "
                  f"rank-0 peak memory while saving x{memory:.1f}")
    if 1 in table and len(table) > 1:
        print("Sharded, against 1 rank (same total state): time x, max peak RSS added per rank MB, "
              ".metadata KB, files")
        for world, ranks in table.items():
            peak = {phase: max(r['results'][phase]['peak_mb'] for r in ranks) for phase in phases}
            save, load = (slowest(world, phase) / slowest(1, phase) for phase in ('sharded save', 'sharded load'))
            files = ranks[0]['files']
            print(f"  {world:>2} rank(s): save x{save:.2f} (peak {peak['sharded save']:.0f}), "
                  f"load x{load:.2f} (peak {peak['sharded load']:.0f}); "
                  f".metadata {files['metadata_kb']:.0f} KB, {files['count']} files")
    return 0


if __name__ == '__main__':
    sys.exit(main())
