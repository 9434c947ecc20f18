"""What the remote mirror costs, against moto's S3 server on loopback (started here, nice 19: it
stands in for a store on another machine).

1. Throughput: a checkpoint of `--size-mib` uploaded by the mirror (temporary key, then moved to
   its final key) and fetched back by `download_newest_intact` (listing, download, verification),
   beside a plain fsspec `put_file` / `get_file` of the same bytes. One run each.
2. `--train`: the drum RNN (scaled up by the overrides) trains epochs of `--steps` updates, saving
   after each; every other save is mirrored, so that every other epoch trains while an upload
   runs. The train stage's time of epochs with and without an upload in flight (medians of the
   pairs, alternating) gives the loop's slowdown; the save itself is the same in both.

    python scripts/bench_remote.py --size-mib 256
    python scripts/bench_remote.py --size-mib 0 --train --pairs 4 --steps 20 model.hidden_size=512
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

from solver.checkpointing import envelope, fetch, naming, remote  # noqa: E402

BUCKET = 'bench'


def start_server() -> tuple[subprocess.Popen, str]:
    from test_remote import MotoServer
    server = MotoServer()
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID='bench', AWS_SECRET_ACCESS_KEY='bench',
                      AWS_DEFAULT_REGION='us-east-1')
    server.start()
    assert server.proc is not None
    os.setpriority(os.PRIO_PROCESS, server.proc.pid, 19)
    import boto3
    boto3.client('s3', endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
    return server.proc, server.endpoint


def throughput(size_mib: int, work: Path) -> None:
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    folder = work / 'xp'
    folder.mkdir()
    tensors = {f't{i}': torch.randn(size_mib * 2**20 // 4 // 64) for i in range(64)}
    path = folder / naming.LATEST
    envelope.write_checkpoint(path, {'model': tensors}, {'epoch': 1})
    size = path.stat().st_size / 2**20

    fs.ls(BUCKET)  # a connection made, as the mirror's first save makes one
    begin = time.perf_counter()
    fs.put_file(str(path), f'{BUCKET}/plain/checkpoint.th')
    plain_put = time.perf_counter() - begin
    begin = time.perf_counter()
    fs.get_file(f'{BUCKET}/plain/checkpoint.th', str(work / 'plain.th'))
    plain_get = time.perf_counter() - begin

    mirror = remote.RemoteMirror(f's3://{BUCKET}/mirror', folder)
    mirrored = []
    for _ in range(2):  # the first save of a run also cleans stray keys; the second is every later one
        begin = time.perf_counter()
        mirror.notify([path])
        assert mirror.flush(600)
        mirrored.append(time.perf_counter() - begin)
    ours_put = mirrored[1]
    mirror.close()
    fresh = work / 'fresh'
    fresh.mkdir()
    begin = time.perf_counter()
    found = fetch.download_newest_intact(f's3://{BUCKET}/mirror', fresh)
    ours_get = time.perf_counter() - begin
    assert found is not None and (fresh / naming.LATEST).read_bytes() == path.read_bytes()

    print(f"checkpoint of {size:.0f} MiB, moto server on loopback; one run each")
    print(f"{'':34} {'time':>8} {'MiB/s':>8} {'plain / ours':>13}")
    for label, plain, ours in (('upload', plain_put, ours_put), ('download', plain_get, ours_get)):
        print(f"{'fsspec ' + ('put_file' if label == 'upload' else 'get_file'):34} {plain:7.2f}s {size / plain:8.1f}")
        what = ('mirror (tmp key + move, commit last)' if label == 'upload'
                else 'fetch (list, download, verify)')
        print(f"{what:34} {ours:7.2f}s {size / ours:8.1f} {plain / ours:13.2f}")
    print(f"(the mirror's first save of a run: {mirrored[0]:.2f}s; plain move of the file to another key, "
          "which the mirror's commit adds, is part of its time)")


def training(args: argparse.Namespace, work: Path) -> None:
    from solver import builders
    from solver.checkpointing.manager import Moment
    from solver.train import main as dora_main
    dora_main.dora.dir = work / 'dora'
    overrides = ['solver=drum_rnn', 'logging.log_updates=1000000', *args.overrides]
    xp = dora_main.get_xp(overrides)
    with xp.enter():
        solver = builders.get_solver(xp.cfg)
        solver.cfg.optim.updates_per_epoch = args.steps
        solver.manager.prepare(solver.full_state)
        mirror = remote.RemoteMirror(f's3://{BUCKET}/train', solver.folder)
        params = sum(p.numel() for p in solver.model.parameters())

        def epoch() -> float:
            begin = time.perf_counter()
            solver.run_stage('train', solver.train)
            elapsed = time.perf_counter() - begin
            solver._start_epoch()  # nothing is committed here
            solver.progress.new_epoch()
            return elapsed

        epoch()  # warm-up
        times: dict[str, list[float]] = {'without': [], 'with': []}
        overlapped, uploads = [], []
        for _ in range(args.pairs):
            for variant in ('without', 'with'):
                solver.save_checkpoint(Moment.EPOCH_END)
                solver.manager.wait()
                begin = time.perf_counter()
                if variant == 'with':
                    mirror.notify([solver.manager.latest_path])
                times[variant].append(epoch())
                if variant == 'with':
                    overlapped.append(mirror.flush(0))
                    assert mirror.flush(600)
                    uploads.append(time.perf_counter() - begin)
        mirror.close()
        solver.manager.close()
    size = solver.manager.latest_path.stat().st_size / 2**20
    step = {k: statistics.median(v) / args.steps for k, v in times.items()}
    print(f"drum RNN {solver.cfg.model.num_layers}x{solver.cfg.model.hidden_size} ({params / 1e6:.1f}M parameters), "
          f"checkpoint {size:.0f} MiB, {args.steps} steps per epoch, {args.pairs} pairs, "
          f"{torch.get_num_threads()} torch threads")
    print(f"step time without an upload in flight: {step['without'] * 1e3:.1f} ms (epochs {fmt(times['without'])})")
    print(f"step time with an upload in flight:    {step['with'] * 1e3:.1f} ms (epochs {fmt(times['with'])})")
    print(f"upload until mirrored: {fmt(uploads)}; finished within its epoch: {sum(overlapped)}/{len(overlapped)}")
    print(f"loop slowdown: {100 * (step['with'] / step['without'] - 1):+.1f}%")


def fmt(values: list[float]) -> str:
    return ' '.join(f'{v:.2f}s' for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size-mib', type=int, default=256, help='0: skip the throughput part')
    parser.add_argument('--train', action='store_true')
    parser.add_argument('--pairs', type=int, default=4)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('overrides', nargs='*', help='config overrides for --train, e.g. model.hidden_size=512')
    args = parser.parse_args()
    proc, _ = start_server()
    work = Path(tempfile.mkdtemp(prefix='bench-remote-'))
    try:
        if args.size_mib:
            throughput(args.size_mib, work)
        if args.train:
            training(args, work)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
