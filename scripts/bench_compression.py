"""Compressed checkpoints (issue 24, point 5): candidate codecs measured standalone, then the
real writer and reader on a full file against its bf16 weights-only form (`checkpoint.keep_dtype`).

    python scripts/bench_compression.py                    # the drum RNN's state and 1 GiB of float32
    python scripts/bench_compression.py --big-mib 256      # a smaller big state
    python scripts/bench_compression.py --checkpoint outputs/xps/<sig>/checkpoint.th   # a real one
    python scripts/bench_compression.py --codecs no --repeats 5   # only the writer/reader part

For each state (the tensors' raw bytes, concatenated): zlib and lzma from the standard library and
zstandard (if installed: `pip install zstandard`), each on the plain bytes and on byte-shuffled
float32 (the 4 bytes of each float split into 4 planes, so that the exponents, which vary little,
sit together); printed: bytes, ratio, compress and decompress MB/s (of the uncompressed size,
shuffling included), every round trip checked. zlib and lzma are slow: on a big state they run on
a prefix of `--prefix-mib` (named in the row). Then bf16 rounding (half the bytes; lossy): its error against float32.

The drum RNN's state is Magenta's default model and its Adam moments after a few steps on random
batches (or `--checkpoint`, read with the project's verified reader); the big state is
`torch.randn * 0.02` (an initialisation's values: random mantissas, as trained weights have).

The writer/reader part builds a checkpoint-shaped state from the same floats (a model, its Adam
moments, its best state: 1/4, 1/2, 1/4 of the bytes) and, `--repeats` times in alternating order,
writes it with `envelope.write_checkpoint` (the run's writer: O_DIRECT, digests) as a full file,
compressed (`compress='zstd'`, what `checkpoint.compress=zstd` writes: `codec`) and as the
weights-only file `weights.reduce_file` makes of it (the best state alone, bf16), and reads each
back with `envelope.read_checkpoint` (digests verified), cold (the file evicted from the page
cache first); printed: bytes and median times, `uptime`'s load, and the bf16 file's
max and RMS relative error against its float32 source, read back through the verified reader.
"""

from __future__ import annotations

import argparse
import lzma
import os
import statistics
import subprocess
import tempfile
import time
import typing as tp
import zlib
from pathlib import Path

import numpy as np
import torch

Codec = tuple[tp.Callable[[bytes], bytes], tp.Callable[[bytes], bytes]]


def codecs() -> dict[str, Codec]:
    found: dict[str, Codec] = {
        'zlib-1': (lambda b: zlib.compress(b, 1), zlib.decompress),
        'zlib-6': (lambda b: zlib.compress(b, 6), zlib.decompress),
        'lzma-0': (lambda b: lzma.compress(b, preset=0), lzma.decompress),
    }
    try:
        import zstandard
    except ImportError:
        print("zstandard is not installed: its rows are left out (pip install zstandard)")
        return found
    for level in (1, 3, 9):
        found[f'zstd-{level}'] = (lambda b, lv=level: zstandard.ZstdCompressor(level=lv).compress(b),
                                  lambda b: zstandard.ZstdDecompressor().decompress(b))
    return found


def shuffle(data: np.ndarray) -> bytes:
    return np.ascontiguousarray(data.view(np.uint8).reshape(-1, 4).T).tobytes()


def unshuffle(data: bytes) -> np.ndarray:
    return np.ascontiguousarray(np.frombuffer(data, np.uint8).reshape(4, -1).T).reshape(-1).view(np.float32)


def drum_state(checkpoint: Path | None) -> list[torch.Tensor]:
    """The float32 tensors of a drum RNN's model and Adam state."""
    if checkpoint is not None:
        from solver.checkpointing.envelope import read_checkpoint
        found: list[torch.Tensor] = []

        def walk(value: tp.Any) -> None:
            if isinstance(value, torch.Tensor):
                if value.dtype == torch.float32:
                    found.append(value)
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    walk(item)

        walk(read_checkpoint(checkpoint).state)
        return found
    from solver.drums.model import DrumRNN, sequence_metrics
    torch.manual_seed(0)
    model = DrumRNN(hidden_size=256, num_layers=3, dropout=0.5, attention_length=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        events = torch.randint(0, 512, (8, 33))
        logits, _ = model(events[:, :-1])
        sums = sequence_metrics(logits, events[:, 1:])
        optimizer.zero_grad()
        (sums['loss_sum'] / sums['count']).backward()
        optimizer.step()
    moments = [t for s in optimizer.state.values() for t in s.values() if t.dtype == torch.float32 and t.dim()]
    return [p.detach() for p in model.parameters()] + moments


def flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([t.reshape(-1) for t in tensors]).numpy()


def measure(name: str, data: np.ndarray, table: dict[str, Codec], prefix_bytes: int) -> None:
    print(f"\n{name}: {data.nbytes / 2**20:.1f} MiB of float32")
    print(f"| {'codec':<15} | {'shuffled':<8} | {'bytes':>13} | {'ratio':>6} | {'compress MB/s':>13} | "
          f"{'decompress MB/s':>15} |")
    print(f"|{'-' * 17}|{'-' * 10}|{'-' * 15}|{'-' * 8}|{'-' * 15}|{'-' * 17}|")
    for codec, (compress, decompress) in table.items():
        slow = codec.startswith(('lzma', 'zlib')) and data.nbytes > prefix_bytes
        part = data[:prefix_bytes // 4] if slow else data
        for shuffled in (False, True):
            start = time.perf_counter()
            packed = compress(shuffle(part) if shuffled else part.tobytes())
            middle = time.perf_counter()
            raw = decompress(packed)
            back = unshuffle(raw) if shuffled else np.frombuffer(raw, np.float32)
            end = time.perf_counter()
            assert np.array_equal(back.view(np.uint32), part.view(np.uint32)), f"{codec} round trip differs"
            label = codec + (f' ({part.nbytes >> 20} MiB)' if part is not data else '')
            mb = part.nbytes / 1e6
            print(f"| {label:<15} | {'yes' if shuffled else 'no':<8} | {len(packed):>13,} | "
                  f"{part.nbytes / len(packed):>6.3f} | {mb / (middle - start):>13.1f} | "
                  f"{mb / (end - middle):>15.1f} |")
    rounded = torch.from_numpy(data).to(torch.bfloat16).float().numpy()
    error = np.abs(rounded - data)
    relative = error / np.maximum(np.abs(data), np.finfo(np.float32).tiny)
    print(f"bf16 rounding: {data.nbytes // 2:,} bytes (ratio 2.000); abs error max {error.max():.3g}, "
          f"mean {error.mean():.3g}; relative error max {relative[data != 0].max():.3g}, "
          f"RMS {np.sqrt(np.mean(relative[data != 0] ** 2)):.3g} (8 significant bits: at most 2^-8 = 0.0039 relative)")


def checkpoint_state(data: np.ndarray) -> dict[str, tp.Any]:
    """A checkpoint-shaped state of `data`'s floats: model, Adam moments, best state (1:2:1)."""
    quarter = len(data) // 4
    tensors = [torch.from_numpy(data[i * quarter:(i + 1) * quarter]).clone() for i in range(4)]
    model = {'weight': tensors[0]}
    return {'model': model, 'optimizer': {'state': {0: {'exp_avg': tensors[1], 'exp_avg_sq': tensors[2]}}},
            'best_state': {'metric': 1.0, 'states': {'model': {'weight': tensors[3]}}}}


def measure_archive(name: str, data: np.ndarray, repeats: int, folder: Path) -> None:
    """Full file against its bf16 weights-only form, through the real writer and reader (see the doc)."""
    from solver.checkpointing import envelope, fs, weights

    state = checkpoint_state(data)
    meta = {'epoch': 1, 'step': 1}
    full, reduced, packed = folder / 'full.th', folder / 'reduced.th', folder / 'zstd.th'
    times: dict[str, list[float]] = {key: [] for key in ('save full', 'save full, compress=zstd',
                                                         'save weights-only bf16',
                                                         'reduce (read full, cast, write)',
                                                         'load full, cold', 'load full, compress=zstd, cold',
                                                         'load weights-only bf16, cold')}

    def timed(key: str, action: tp.Callable[[], tp.Any]) -> tp.Any:
        start = time.perf_counter()
        result = action()
        times[key].append(time.perf_counter() - start)
        return result

    def reduce() -> None:
        envelope.write_checkpoint(reduced, state, meta)  # the full file the run wrote...
        fs.evict(reduced)
        start = time.perf_counter()
        weights.reduce_file(reduced, 'bf16')              # ...made weights-only, as retention does
        times['reduce (read full, cast, write)'].append(time.perf_counter() - start)

    for repeat in range(repeats):
        steps = [lambda: timed('save full', lambda: envelope.write_checkpoint(full, state, meta)),
                 lambda: timed('save full, compress=zstd', lambda: envelope.write_checkpoint(
                     packed, state, meta, compress='zstd')),
                 lambda: timed('save weights-only bf16', lambda: envelope.write_checkpoint(
                     reduced, {'best_state': {'metric': 1.0, 'states': weights.cast(
                         state['best_state']['states'], torch.bfloat16)}}, {**meta, 'weights_only': 'bf16'}))]
        for step in steps if repeat % 2 == 0 else steps[::-1]:
            step()
        fs.evict(full, reduced, packed)
        loads = [lambda: timed('load full, cold', lambda: envelope.read_checkpoint(full)),
                 lambda: timed('load full, compress=zstd, cold', lambda: envelope.read_checkpoint(packed)),
                 lambda: timed('load weights-only bf16, cold', lambda: envelope.read_checkpoint(reduced))]
        for step in loads if repeat % 2 == 0 else loads[::-1]:
            step()
    sizes = {'full': full.stat().st_size, 'full, compress=zstd': packed.stat().st_size}
    for _ in range(max(1, repeats // 2)):
        reduce()
    sizes['weights-only bf16'] = reduced.stat().st_size
    back = envelope.read_checkpoint(reduced).state['best_state']['states']['model']['weight'].float().numpy()
    source = state['best_state']['states']['model']['weight'].numpy()
    nonzero = source != 0
    relative = np.abs(back[nonzero] - source[nonzero]) / np.abs(source[nonzero])
    print(f"\n{name}, through envelope.write_checkpoint / read_checkpoint: medians of {repeats} "
          f"(alternating), uptime: {uptime()}")
    print(f"| {'file':<34} | {'bytes':>15} | {'x full':>6} |\n|{'-' * 36}|{'-' * 17}|{'-' * 8}|")
    for key, size in sizes.items():
        print(f"| {key:<34} | {size:>15,} | {size / sizes['full']:>6.3f} |")
    print(f"| {'operation':<34} | {'median s':>15} | {'x full':>6} |\n|{'-' * 36}|{'-' * 17}|{'-' * 8}|")
    base = {'save': statistics.median(times['save full']), 'load': statistics.median(times['load full, cold'])}
    for key, values in times.items():
        median = statistics.median(values)
        ratio = median / base['load' if key.startswith('load') else 'save']
        print(f"| {key:<34} | {median:>15.4f} | {ratio:>6.3f} |")
    print(f"bf16 weights-only file against its float32 source ({source.size:,} values read back through the "
          f"verified reader): relative error max {relative.max():.3g}, RMS {np.sqrt(np.mean(relative ** 2)):.3g}")


def uptime() -> str:
    """What `uptime` says (the load averages: the timings are only as good as the machine was idle)."""
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--big-mib', type=int, default=1024, help='size of the big float32 state (0: skip it)')
    parser.add_argument('--prefix-mib', type=int, default=128, help='zlib and lzma run on at most this prefix')
    parser.add_argument('--checkpoint', type=Path, help='a drum RNN checkpoint instead of a fresh state')
    parser.add_argument('--codecs', choices=['yes', 'no'], default='yes', help='measure the codecs standalone')
    parser.add_argument('--repeats', type=int, default=3, help='alternating saves and loads of the real writer')
    parser.add_argument('--folder', type=Path, default=None, help='where the files go (default: a temporary '
                        'folder beside this repository, on its disk)')
    args = parser.parse_args()
    table = codecs() if args.codecs == 'yes' else {}
    states = [('drum RNN: model + Adam moments', flat(drum_state(args.checkpoint)))]
    if args.big_mib:
        torch.manual_seed(0)
        states.append((f'{args.big_mib} MiB: randn * 0.02', (torch.randn(args.big_mib << 18) * 0.02).numpy()))
    root = args.folder or Path(__file__).resolve().parent.parent
    for name, data in states:
        if table:
            measure(name, data, table, args.prefix_mib << 20)
        with tempfile.TemporaryDirectory(prefix='.bench_compression.', dir=root) as folder:
            measure_archive(name, data, args.repeats, Path(folder))


if __name__ == '__main__':
    main()
