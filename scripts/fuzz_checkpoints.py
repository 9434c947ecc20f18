"""Mutation fuzzer of every checkpoint reader (issue 22): damaged and forged files cost no data,
memory, time or traceback.

Starts from real checkpoints written by this code (a single file, an incremental file with its
blobs, a sharded file with its DCP folder, a compressed file: `checkpoint.compress=zstd`), mutates
a copy (bit flips, truncation, inserted and deleted bytes, swapped records, pickle opcodes replaced
or inserted, integers of the pickle -- sizes, strides, offsets, numels -- changed, files replaced
by a FIFO or a link to /dev/zero or to a sibling), with the digests recomputed for the mutated
content so that the reader cannot lean on them (tried for half the structural mutations of single
and sharded files; done where torch's own loader still loads the mutated file: `+digests` in the
report), and feeds it to `read_checkpoint`, `solver
verify` and a resume (`load_newest_intact`). Each case runs in a forked child under a memory
bound (RLIMIT_AS; peak RSS checked) and a time bound. The rule, for every case:

- `read_checkpoint` gives the state that was written (or, digests recomputed, what torch's own
  weights-only loader gives of the same file), or raises a `CheckpointError` naming the file;
- `solver verify` prints no traceback and exits 0 (intact) or 1, and says "intact" only when
  `read_checkpoint` loaded; `load_newest_intact` raises nothing but a `CheckpointError`;
- peak memory stays under the bound, nothing hangs, nothing outside the work folder changes.

    python scripts/fuzz_checkpoints.py --minutes 5          # the long run: prints the figures
    python scripts/fuzz_checkpoints.py --cases 200 --seed 1 # a fixed, short run (the test suite)

Any case that breaks the rule is saved under --out (the mutated folder and `case.json`) and
makes the exit code 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import pickletools
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import torch

from solver import cli
from solver.checkpointing import codec, envelope, faults, naming, recovery, sharded, store

MEMORY_BOUND = 512 << 20   # peak resident bytes a case may add: the seeds are a few hundred KiB
ADDRESS_SLACK = 2 << 30    # RLIMIT_AS above the child's start: the safety net under the bound
TIME_BOUND = 20.0          # seconds a case may take (reads of a few hundred KiB take milliseconds)
KINDS = ('flip', 'truncate', 'insert', 'delete', 'swap_records', 'opcode', 'integer', 'special')
INTERESTING = (0, 1, 2, 3, 4, 7, 255, 256, 1 << 16, (1 << 28), (1 << 31) - 1, 1 << 31, -1, -(1 << 31))


# -- seeds ---------------------------------------------------------------------------------------------

def seed_state() -> tuple[dict[str, tp.Any], dict[str, tp.Any]]:
    generator = torch.Generator().manual_seed(0)
    state = {
        'model': {'w': torch.randn(64, 64, generator=generator), 'b': torch.randn(64, generator=generator),
                  'steps': torch.arange(10), 'mask': torch.rand(8, generator=generator) > 0.5,
                  'half': torch.randn(3, 5, generator=generator).half()},
        'optimizer': {'state': {0: {'exp_avg': torch.randn(64, 64, generator=generator)}}, 'lr': 0.1},
        'history': [{'train': {'loss': 1.5}}, {'train': {'loss': 1.25}}],
        'empty': torch.empty(0),
    }
    meta = {'epoch': 2, 'step': 32, 'sig': 'f00dfeed', 'config': {'a': [1, 2.0, None, 'x'], 'b': {'c': True}}}
    return state, meta


def make_seeds(root: Path) -> dict[str, Path]:
    """The seed folders: 'single', 'incremental', 'sharded', 'compressed', each holding `checkpoint.th`."""
    state, meta = seed_state()
    seeds = {name: root / name for name in ('single', 'incremental', 'sharded', 'compressed')}
    for folder in seeds.values():
        folder.mkdir(parents=True)
    envelope.write_checkpoint(seeds['single'] / naming.LATEST, state, meta)
    envelope.write_checkpoint(seeds['compressed'] / naming.LATEST, state, meta, compress='zstd')
    store.IncrementalStore(seeds['incremental']).write(seeds['incremental'] / naming.LATEST, state, meta)
    _write_sharded(seeds['sharded'] / naming.LATEST, state, meta)
    return seeds


def _write_sharded(path: Path, state: dict[str, tp.Any], meta: dict[str, tp.Any]) -> None:
    """A sharded checkpoint as `sharded.save_shards` writes it, without a process group: the
    model's tensors in a DCP folder listed (with digests) by the file."""
    import warnings

    import torch.distributed.checkpoint as dcp
    folder = path.with_name(f'{sharded.folder_prefix(path)}seed')
    tensors = {f'model.{key}': value for key, value in state['model'].items()}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(folder))
    skeleton = dict(state, model={key: {sharded.MARK: f'model.{key}', 'shape': list(value.shape),
                                        'dtype': str(value.dtype).rpartition('.')[2]}
                                  for key, value in state['model'].items()})
    files = {p.name: sharded.file_digest(p) for p in folder.iterdir()}
    envelope._write_file(path, {'meta': meta, 'state': skeleton,
                                  'shards': {'folder': folder.name, 'files': files, 'world_size': 1}})


# -- mutations -----------------------------------------------------------------------------------------

def _records(path: Path) -> dict[str, bytes]:
    reader = torch._C.PyTorchFileReader(str(path))
    return {name: bytes(reader.get_record(name)) for name in reader.get_all_records()}


def _rewrite(path: Path, records: dict[str, bytes]) -> None:
    """`path` as a torch archive holding `records` (offsets and sizes recomputed)."""
    tmp = path.with_name(path.name + '.rewrite')
    writer = torch._C.PyTorchFileWriter(str(tmp))
    for name, data in records.items():
        if name in ('version', '.data/version', '.data/serialization_id'):
            continue  # the writer adds its own
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    os.replace(tmp, path)


def _pickle_ints(data: bytes) -> list[tuple[int, int, int]]:
    """(position, length, value) of every BININT/BININT1/BININT2 argument of a pickle."""
    found = []
    widths = {'BININT': 4, 'BININT1': 1, 'BININT2': 2}
    with contextlib.suppress(Exception):
        for op, arg, pos in pickletools.genops(data):
            if op.name in widths:
                found.append((pos + 1, widths[op.name], int(arg)))
    return found


def _set_int(data: bytes, position: int, width: int, value: int) -> bytes:
    """The pickle with the integer at `position` (of `width` bytes) set to `value` (as BININT)."""
    opcode = b'J' + struct.pack('<i', max(-(1 << 31), min(value, (1 << 31) - 1)))
    return data[:position - 1] + opcode + data[position + width:]


OPCODES = b'()]}aesuRbQhqjJKMNXtcp0012\x85\x86\x87\x88\x89\x93\x94'


def mutate(rng: random.Random, folder: Path) -> dict[str, tp.Any]:
    """Mutate one file of `folder` in place; what was done (for the report and a replay)."""
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    archive_file = folder / naming.LATEST
    kind = rng.choice(KINDS)
    if kind in ('swap_records', 'opcode', 'integer'):
        target = archive_file
    else:
        target = archive_file if rng.random() < 0.6 else rng.choice(files)
    case: dict[str, tp.Any] = {'kind': kind, 'file': str(target.relative_to(folder)), 'recomputed': False}
    data = target.read_bytes()
    if kind == 'flip':
        buffer = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(buffer))
            buffer[at] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(buffer))
    elif kind == 'truncate':
        target.write_bytes(data[:rng.randrange(len(data) + 1)])
    elif kind == 'insert':
        at = rng.randrange(len(data) + 1)
        target.write_bytes(data[:at] + rng.randbytes(rng.choice((1, 4, 64, 4096))) + data[at:])
    elif kind == 'delete':
        at = rng.randrange(len(data))
        target.write_bytes(data[:at] + data[at + rng.choice((1, 4, 64, 4096)):])
    elif kind == 'special':
        target.unlink()
        what = rng.choice(('fifo', 'dev_zero', 'sibling'))
        case['special'] = what
        if what == 'fifo':
            os.mkfifo(target)
        elif what == 'dev_zero':
            target.symlink_to('/dev/zero')
        else:
            target.symlink_to(rng.choice([f for f in files if f != target] or [Path('/etc/hostname')]))
    else:
        records = _records(target)
        pickled = records['data.pkl']
        if kind == 'swap_records':
            names = [name for name in records if name.startswith('data/')]
            a, b = rng.sample(names, 2) if len(names) > 1 else (names[0], 'data.pkl')
            records[a], records[b] = records[b], records[a]
            case['swapped'] = [a, b]
        elif kind == 'opcode':
            at = rng.randrange(2, len(pickled))
            op = bytes([rng.choice(OPCODES)])
            replace = rng.random() < 0.5
            records['data.pkl'] = pickled[:at] + op + pickled[at + (1 if replace else 0):]
            case['opcode'] = [at, op.hex(), 'replaced' if replace else 'inserted']
        else:
            ints = _pickle_ints(pickled)
            position, width, old = rng.choice(ints)
            value = rng.choice(INTERESTING + (old + 1, old - 1, old * 2, old * 4096))
            records['data.pkl'] = _set_int(pickled, position, width, value)
            case['integer'] = [position, old, value]
        _rewrite(target, records)
        if 'blobs' not in {p.name for p in folder.iterdir()} and rng.random() < 0.5:
            case['recomputed'] = recompute_digests(target)
    return case


def torch_reads(path: Path) -> tp.Any:
    """What torch's weights-only loader reads from `path`, a compressed file's tensors decoded."""
    payload = torch.load(path, map_location='cpu', weights_only=True)
    return codec.decode(path, payload) if codec.is_compressed(payload) else payload


def recompute_digests(path: Path) -> bool:
    """Rewrite the digests recorded in `path` as those of what torch's loader reads from it
    (strings of the same length replaced in the pickle): a forgery a reader cannot tell by its
    digests. False when torch's loader does not load it (or its frames do not decode)."""
    try:
        payload = torch_reads(path)
        recorded = payload['digests']
        actual = envelope.digests(envelope._covered(payload))
    except Exception:
        return False
    records = _records(path)
    pickled = records['data.pkl']
    pairs = list(zip(recorded.get('tensors', []), actual['tensors'])) + [(recorded.get('skeleton'), actual['skeleton'])]
    for old, new in pairs:
        if isinstance(old, str) and len(old) == len(new) and old != new:
            pickled = pickled.replace(old.encode(), new.encode(), 1)
    records['data.pkl'] = pickled
    _rewrite(path, records)
    return True


# -- one case, in a child ----------------------------------------------------------------------------------

def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def _same(a: tp.Any, b: tp.Any) -> bool:
    """Equal states: same structure, types, dtypes, shapes and bytes (NaN equal to itself)."""

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.numel() * a.element_size() <= (1 << 30)
                and torch.equal(_bytes(a), _bytes(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class _Never:
    """Equal to nothing: what a shard placeholder the mutation changed must not load as."""

    def __eq__(self, other: object) -> bool:
        return False


def _placed(state: tp.Any, written: dict[str, tp.Any]) -> tp.Any:
    """`state` (as torch reads a sharded checkpoint file) with each shard placeholder that is
    still as written replaced by the tensor written; a changed one by `_Never`."""
    def place(value: tp.Any) -> tp.Any:
        if isinstance(value, dict) and sharded.MARK in value:
            name = str(value[sharded.MARK]).partition('.')[2]
            tensor = written['model'].get(name)
            same = (tensor is not None and value.get('shape') == list(tensor.shape)
                    and value.get('dtype') == str(tensor.dtype).rpartition('.')[2] and len(value) == 3)
            return tensor if same else _Never()
        if isinstance(value, dict):
            return {key: place(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(place(item) for item in value)
        return value
    return place(state)


def _resident() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _address_space() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')


def check(folder: Path, case: dict[str, tp.Any], expected: tuple[tp.Any, tp.Any]) -> dict[str, tp.Any]:
    """Read the mutated folder three ways; the outcome, and the rule it broke (if any)."""
    path = folder / naming.LATEST
    reference = expected
    if case.get('recomputed'):
        try:
            payload = torch_reads(path)
            reference = (_placed(payload['state'], expected[0]), payload['meta'])
        except Exception:
            reference = None
    outcome: dict[str, tp.Any] = {}
    try:
        ckpt = envelope.read_checkpoint(path)
    except faults.CheckpointError as err:
        message = str(err)
        outcome['outcome'] = f"refused: {type(err).__name__}"
        outcome['message'] = message[:300]
        if str(folder) not in message:
            outcome['broke'] = 'a CheckpointError that does not name the file'
        if _allocation_failed(err):
            outcome['broke'] = 'an allocation beyond the memory bound was tried'
    except BaseException as err:  # the rule: nothing else
        outcome['outcome'] = f"other: {type(err).__name__}"
        outcome['broke'] = f"raised {type(err).__name__}: {str(err)[:300]}"
        return outcome
    else:
        outcome['outcome'] = 'loaded'
        if reference is None or not (_same(ckpt.state, reference[0]) and _same(ckpt.meta, reference[1])):
            outcome['broke'] = 'loaded a state other than the one written (or than torch reads)'
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(['verify', str(path)])
    except BaseException as err:
        outcome.setdefault('broke', f"solver verify raised {type(err).__name__}: {str(err)[:200]}")
        return outcome
    printed = stdout.getvalue() + stderr.getvalue()
    if 'Traceback' in printed or code not in (0, 1) or (code == 0) != (outcome['outcome'] == 'loaded'):
        outcome.setdefault('broke', f"solver verify exited {code}: {printed[-300:]}")
    try:
        recovery.load_newest_intact(folder)
    except faults.CheckpointError:
        pass
    except BaseException as err:
        outcome.setdefault('broke', f"load_newest_intact raised {type(err).__name__}: {str(err)[:200]}")
    return outcome


def _allocation_failed(err: BaseException | None) -> bool:
    """Whether `err` or what caused it is a failed allocation (RLIMIT_AS reached)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError) or "can't allocate memory" in str(err) or 'bad_alloc' in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def run_case(seed_folder: Path, work: Path, rng_seed: int, expected: tuple[tp.Any, tp.Any]) -> dict[str, tp.Any]:
    """Copy the seed, mutate and check it in a forked child under the bounds; the result."""
    folder = work / 'xp'
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(seed_folder, folder, symlinks=True)
    outside = _listing(work.parent)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: mutate, check, report on the pipe, exit without cleanup
        os.close(read_fd)
        result: dict[str, tp.Any] = {}
        try:
            resource.setrlimit(resource.RLIMIT_AS, (_address_space() + ADDRESS_SLACK,) * 2)
            start = _resident()
            case = mutate(random.Random(rng_seed), folder)
            result = {'case': case}
            result.update(check(folder, case, expected))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            result['memory'] = peak - start
            if peak - start > MEMORY_BOUND:
                result.setdefault('broke', f"peak memory {(peak - start) >> 20} MiB over the bound")
        except BaseException as err:
            result.setdefault('outcome', 'fuzzer error')
            result['error'] = f"{type(err).__name__}: {err}"
        os.write(write_fd, json.dumps(result, default=str).encode())
        os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + TIME_BOUND
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.002)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        return {'case': {'rng_seed': rng_seed}, 'outcome': 'hang', 'broke': f'still running after {TIME_BOUND} s'}
    with os.fdopen(read_fd, 'rb') as f:
        raw = f.read()
    result = json.loads(raw) if raw else {}
    result.setdefault('case', {})['rng_seed'] = rng_seed
    if status and os.WIFSIGNALED(status):
        result.update(outcome='crash', broke=f'killed by signal {os.WTERMSIG(status)}')
    elif not raw:
        result.update(outcome='crash', broke='the child reported nothing')
    if _listing(work.parent) != outside:
        result.setdefault('broke', 'something outside the work folder changed')
    return result


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `folder`, the work folders (`work-*`) excepted."""
    found = {}
    for path in folder.rglob('*'):
        if 'work-' in str(path.relative_to(folder)).split('/')[0] or path.is_symlink() or not path.is_file():
            continue
        info = path.stat()
        found[str(path)] = (info.st_size, info.st_mtime_ns)
    return found


# -- the run -------------------------------------------------------------------------------------------------

def fuzz(seconds: float | None, cases: int | None, seed: int, out: Path | None) -> tuple[dict[str, tp.Any], int]:
    """Run the fuzzer; (report, number of rule-breaking cases)."""
    import torch.distributed.checkpoint  # noqa: F401  imported once here, not in every child
    rng = random.Random(seed)
    broken = 0
    counts: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    peak_memory = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix='fuzz-checkpoints-') as tmp:
        root = Path(tmp)
        seeds = make_seeds(root / 'seeds')
        expected = seed_state()
        works = {name: root / f'work-{name}' for name in seeds}
        for name, work in works.items():
            work.mkdir()
            # The unmutated seed must load as written (the fuzzer's own check); this also makes
            # the imports and first-use work once, here, not in every forked child.
            shutil.copytree(seeds[name], work / 'xp', symlinks=True)
            first = check(work / 'xp', {}, expected)
            assert first['outcome'] == 'loaded' and 'broke' not in first, f"seed {name}: {first}"
        tried = 0
        while (cases is None or tried < cases) and (seconds is None or time.monotonic() - started < seconds):
            name = rng.choice(sorted(seeds))
            result = run_case(seeds[name], works[name], rng.randrange(1 << 62), expected)
            tried += 1
            case = result.get('case', {})
            kinds[f"{name}/{case.get('kind', '?')}{'+digests' if case.get('recomputed') else ''}"] += 1
            counts[result.get('outcome', '?')] += 1
            peak_memory = max(peak_memory, int(result.get('memory', 0)))
            if 'error' in result:
                print(f"fuzzer error ({name}): {result['error']}\n  case: {json.dumps(case)}", file=sys.stderr)
            if 'broke' in result:
                broken += 1
                counts['RULE BROKEN'] += 1
                print(f"RULE BROKEN ({name}): {result['broke']}\n  case: {json.dumps(case)}", file=sys.stderr)
                if out is not None:
                    saved = out / f"{name}-{case.get('rng_seed')}"
                    shutil.rmtree(saved, ignore_errors=True)
                    shutil.copytree(works[name] / 'xp', saved, symlinks=True)
                    (saved / 'case.json').write_text(json.dumps({'seed': name, **result}, indent=2, default=str))
    elapsed = time.monotonic() - started
    report = {'mutations': tried, 'seconds': round(elapsed, 1), 'per_second': round(tried / max(elapsed, 1e-9), 1),
              'outcomes': dict(counts.most_common()), 'by_seed_and_kind': dict(sorted(kinds.items())),
              'rule_broken': broken, 'peak_memory_added_mib': round(peak_memory / 2**20, 1),
              'bounds': {'memory_mib': MEMORY_BOUND >> 20, 'seconds_per_case': TIME_BOUND}}
    return report, broken


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--minutes', type=float, help='run this long (default: 1 minute unless --cases)')
    parser.add_argument('--cases', type=int, help='run this many cases')
    parser.add_argument('--seed', type=int, default=int(time.time()), help='random seed (printed; replays a run)')
    parser.add_argument('--out', type=Path, default=Path('fuzz-failures'), help='where rule-breaking inputs go')
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # "Skipping damaged checkpoint ..." for nearly every case
    seconds = args.minutes * 60 if args.minutes is not None else (None if args.cases else 60.0)
    print(f"fuzz_checkpoints: seed {args.seed}", file=sys.stderr)
    report, broken = fuzz(seconds, args.cases, args.seed, args.out)
    print(json.dumps(report, indent=2))
    return 1 if broken else 0


if __name__ == '__main__':
    sys.exit(main())
