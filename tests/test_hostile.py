"""Hostile input: every place that deserialises something read from disk, fed a payload that
would create a marker file if it ran; and the faults a hostile user found (issue 15).

Each payload is known to work: `test_the_payloads_really_run_code_when_loaded_unsafely` runs
them through the unsafe loaders. Every other test checks that the marker never appears. The
list of places, and how each is made safe, is docs/security.md.

Already covered elsewhere, kept there: damaged and truncated files, pickles needing globals,
another format version (tests/test_checkpoint.py); a full disk / file-size limit during a save
and kill -9 mid-save (tests/test_reliability.py); the experiment lock (tests/test_dora_run.py);
DCP metadata needing globals and damaged shard files (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import struct
import subprocess
import sys
import threading
import typing as tp
import warnings
from pathlib import Path

import pytest
import torch
import xxhash
import zstandard
from helpers import SOLVER

from solver.checkpointing import archive, codec, dcp_reader, envelope, faults, sharded

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Pickles to `open(marker, 'w')`: loading it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[tp.Any, ...]:
        return (open, (str(self.marker), 'w'))


def torch_payload(marker: Path) -> bytes:
    """What `torch.load(weights_only=False)` runs."""
    data = io.BytesIO()
    torch.save(RunsCode(marker), data)
    return data.getvalue()


def digest(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def forge_sharded(path: Path, files: dict[str, bytes], listed: tp.Collection[str] | None = None,
                  state: tp.Any = None) -> Path:
    """A `checkpoint.th` at `path` whose digests all match (anyone can compute them) and which
    names a shard folder holding `files`; `listed` (default: all) are the files it lists."""
    folder = path.with_name(f'{sharded.folder_prefix(path)}forged')
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listed = files if listed is None else listed
    placeholder = {sharded.MARK: 'model.w', 'shape': [3, 4], 'dtype': 'float32'}
    state = {'model': {'w': placeholder}} if state is None else state
    shards = {'folder': folder.name, 'files': {name: digest(files[name]) for name in listed}, 'world_size': 1}
    envelope._write_file(path, {'meta': {'epoch': 1}, 'state': state, 'shards': shards})
    return path


def honest_metadata_and_data() -> tuple[bytes, bytes]:
    """The `.metadata` and `__0_0.distcp` DCP writes for a 3x4 tensor named `model.w`."""
    import tempfile

    import torch.distributed.checkpoint as dcp
    with tempfile.TemporaryDirectory() as tmp:
        dcp.save({'model.w': torch.arange(12.).reshape(3, 4)}, storage_writer=dcp.FileSystemWriter(tmp), no_dist=True)
        return (Path(tmp) / '.metadata').read_bytes(), (Path(tmp) / '__0_0.distcp').read_bytes()


def rank_local_fallback(path: Path, marker: Path, listed_payload: bool = False) -> Path:
    """Attack 1 of issue 15: a `.metadata` that is a harmless pickle (no globals) DCP cannot use,
    and a `__0.metadata` payload that DCP's fallback reads with plain pickle."""
    files = {'.metadata': pickle.dumps(42), '__0.metadata': pickle.dumps(RunsCode(marker))}
    return forge_sharded(path, files, listed=None if listed_payload else ['.metadata'])


def byte_item(path: Path, marker: Path, state: tp.Any = None) -> Path:
    """A `.metadata` of DCP's own classes only, declaring `model.w` a byte item: DCP loads byte
    items with `torch.load(weights_only=False)`, here the payload stored as the data file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
    payload = torch_payload(marker)
    metadata = Metadata(state_dict_metadata={'model.w': BytesStorageMetadata()},
                        storage_data={MetadataIndex('model.w'): _StorageInfo('__0_0.distcp', 0, len(payload))})
    return forge_sharded(path, {'.metadata': pickle.dumps(metadata), '__0_0.distcp': payload}, state=state)


ATTACKS = {'rank-local fallback': rank_local_fallback, 'byte item': byte_item}


@pytest.fixture(params=sorted(ATTACKS))
def attack(request: pytest.FixtureRequest) -> tp.Callable[[Path, Path], Path]:
    return ATTACKS[request.param]


# -- the payloads are real ---------------------------------------------------------------------------

def test_the_payloads_really_run_code_when_loaded_unsafely(tmp_path: Path):
    marker = tmp_path / 'pwned'
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(torch_payload(marker)), weights_only=False)
    assert marker.exists()


def test_dcp_own_reader_runs_the_payload_of_a_forged_folder(tmp_path: Path, attack):
    """What our reader exists for: DCP's default reader on the same folder runs the code."""
    import torch.distributed.checkpoint as dcp
    marker = tmp_path / 'pwned'
    path = attack(tmp_path / 'checkpoint.th', marker)
    folder = next(tmp_path.glob('checkpoint.th.dcp.*'))
    from torch.distributed.checkpoint.api import CheckpointException
    with warnings.catch_warnings(), contextlib.suppress(Exception, CheckpointException):  # fails after the code ran
        warnings.simplefilter('ignore')
        dcp.load({'model.w': torch.empty(3, 4)}, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    assert marker.exists()
    assert path.exists()


# -- shard folders ------------------------------------------------------------------------------------

def test_a_forged_shard_folder_is_refused_and_runs_nothing(tmp_path: Path, attack):
    marker = tmp_path / 'pwned'
    path = attack(tmp_path / 'checkpoint.th', marker)
    with pytest.raises(faults.CorruptCheckpointError, match='refused'):
        envelope.read_checkpoint(path)
    assert not marker.exists()


def test_a_listed_rank_local_metadata_is_never_read(tmp_path: Path):
    marker = tmp_path / 'pwned'
    path = rank_local_fallback(tmp_path / 'checkpoint.th', marker, listed_payload=True)
    with pytest.raises(faults.CorruptCheckpointError, match='not a DCP Metadata'):
        envelope.read_checkpoint(path)
    assert not marker.exists()


def test_an_unlisted_file_in_an_honest_shard_folder_is_refused_naming_it(tmp_path: Path):
    metadata, data = honest_metadata_and_data()
    path = forge_sharded(tmp_path / 'checkpoint.th', {'.metadata': metadata, '__0_0.distcp': data})
    assert envelope.read_checkpoint(path).state['model']['w'].sum() == 66
    folder = next(tmp_path.glob('checkpoint.th.dcp.*'))
    (folder / '__0.metadata').write_bytes(pickle.dumps(RunsCode(tmp_path / 'pwned')))
    with pytest.raises(faults.CorruptCheckpointError, match=r'does not list \(__0.metadata\)'):
        envelope.read_checkpoint(path)
    assert not (tmp_path / 'pwned').exists()


class OpenWatch:
    """Counts opens of the files of one folder (a Python audit hook) and, at the second open of
    a file, replaces it by `swaps[name]`: an attacker swapping files between two reads."""

    active: OpenWatch | None = None
    installed = False

    def __init__(self, folder: Path, swaps: dict[str, bytes]) -> None:
        self.folder, self.swaps = folder, swaps
        self.opens: dict[str, int] = {}
        self.lock = threading.Lock()
        if not OpenWatch.installed:  # audit hooks cannot be removed: one hook, switched by `active`
            sys.addaudithook(OpenWatch._hook)
            OpenWatch.installed = True

    @staticmethod
    def _hook(event: str, args: tuple[tp.Any, ...]) -> None:
        watch = OpenWatch.active
        if watch is None or event != 'open' or not isinstance(args[0], (str, os.PathLike)):
            return
        path = Path(args[0])
        if path.parent == Path('.'):  # a name opened in a folder's descriptor (`fs.open_fd`)
            path = watch.folder / path
        if path.parent != watch.folder or not path.exists():
            return
        with watch.lock:
            count = watch.opens[path.name] = watch.opens.get(path.name, 0) + 1
        if count == 2 and path.name in watch.swaps:
            OpenWatch.active = None  # our own write below opens the file too
            tmp = path.with_name('swap.tmp')
            tmp.write_bytes(watch.swaps[path.name])
            os.replace(tmp, path)
            OpenWatch.active = watch

    def __enter__(self) -> OpenWatch:
        OpenWatch.active = self
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        OpenWatch.active = None


def test_each_shard_file_is_read_once_so_a_swap_after_the_check_changes_nothing(tmp_path: Path):
    marker = tmp_path / 'pwned'
    metadata, data = honest_metadata_and_data()
    path = forge_sharded(tmp_path / 'checkpoint.th', {'.metadata': metadata, '__0_0.distcp': data})
    folder = next(tmp_path.glob('checkpoint.th.dcp.*'))
    zeros = honest_metadata_and_data()[1].replace(torch.arange(12.).numpy().tobytes(), bytes(48))
    with OpenWatch(folder, {'.metadata': pickle.dumps(RunsCode(marker)), '__0_0.distcp': zeros}) as watch:
        ckpt = envelope.read_checkpoint(path)
    assert watch.opens == {'.metadata': 1, '__0_0.distcp': 1}
    assert torch.equal(ckpt.state['model']['w'], torch.arange(12.).reshape(3, 4))
    assert not marker.exists()


def test_a_real_sharded_save_lists_every_file_of_its_folder_and_loads(tmp_path: Path):
    script = f"""
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
from solver.checkpointing import envelope, faults
dist.init_process_group('gloo', init_method='file://{tmp_path}/pg', rank=0, world_size=1)
w = distribute_tensor(torch.arange(12.).reshape(3, 4), init_device_mesh('cpu', (1,)), [Shard(0)])
envelope.write_checkpoint('{tmp_path}/checkpoint.th', {{'model': {{'w': w}}}}, {{'epoch': 1}})
dist.destroy_process_group()
"""
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    payload = torch.load(tmp_path / 'checkpoint.th', weights_only=True)
    folder = tmp_path / payload['shards']['folder']
    assert set(payload['shards']['files']) == {p.name for p in folder.iterdir()} == {'.metadata', '__0_0.distcp'}
    ckpt = envelope.read_checkpoint(tmp_path / 'checkpoint.th')
    assert torch.equal(ckpt.state['model']['w'], torch.arange(12.).reshape(3, 4))


# -- entry points fed a forged sharded checkpoint -----------------------------------------------------

def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


@pytest.mark.integration
def test_inspect_refuses_a_forged_shard_folder_in_one_line(tmp_path: Path, attack):
    marker = tmp_path / 'pwned'
    path = attack(tmp_path / 'checkpoint.th', marker)
    proc = run(sys.executable, '-m', 'solver.checkpointing.examine', str(path))
    assert proc.returncode == 1 and 'refused' in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert not marker.exists()


@pytest.mark.integration
def test_solver_export_refuses_a_forged_shard_folder(tmp_path: Path, attack):
    marker = tmp_path / 'pwned'
    path = attack(tmp_path / 'checkpoint.th', marker)
    proc = run(*SOLVER, 'export', str(path), str(tmp_path / 'out.th'))
    assert proc.returncode in (1, 2) and 'refused' in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / 'out.th').exists()


@pytest.mark.integration
@pytest.mark.parametrize('how', ['file', 'pretrained'])
def test_continue_from_a_forged_shard_folder_stops_in_one_line(dora, tmp_path: Path, how: str, monkeypatch):
    marker = tmp_path / 'pwned'
    state = {'best_state': {'states': {'model': {'0.weight': {sharded.MARK: 'model.w', 'shape': [3, 4],
                                                              'dtype': 'float32'}}}}}
    pretrained = tmp_path / 'pretrained'
    pretrained.mkdir()
    path = byte_item(pretrained / 'evil.th', marker, state=state)
    source = f'continue_from={path}' if how == 'file' else 'continue_from=//pretrained/evil'
    monkeypatch.setenv('SOLVER_PRETRAINED_DIR', str(pretrained))
    code, output = dora('run', 'solver=regression', 'optim.epochs=1', source)
    assert code == 1 and 'refused' in output and 'Traceback' not in output, output
    assert not marker.exists()


# -- a checkpoint replaced while it is read -------------------------------------------------------------

def test_a_checkpoint_replaced_atomically_while_read_is_the_old_or_the_new_never_damaged(tmp_path: Path):
    versions = []
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        source = tmp_path / f'v{epoch}.th'
        envelope.write_checkpoint(source, {'model': {'w': torch.randn(256, 256)}, 'tag': epoch}, {'epoch': epoch})
        versions.append(source.read_bytes())
    target = tmp_path / 'checkpoint.th'
    target.write_bytes(versions[0])
    stop = threading.Event()

    def replace_forever() -> None:
        index = 0
        while not stop.is_set():
            index ^= 1
            tmp = tmp_path / '.checkpoint.th.tmp'
            tmp.write_bytes(versions[index])
            os.replace(tmp, target)

    thread = threading.Thread(target=replace_forever)
    thread.start()
    try:
        seen = [envelope.read_checkpoint(target) for _ in range(400)]
    finally:
        stop.set()
        thread.join()
    assert all(ckpt.meta['epoch'] == ckpt.state['tag'] for ckpt in seen)
    assert {ckpt.meta['epoch'] for ckpt in seen} == {1, 2}


# -- user mistakes at the entry point: one line, never a traceback --------------------------------------

def one_line_failure(code: int, output: str, expected: int = 1) -> str:
    """The last line of a run that must have failed with `expected` and no traceback."""
    assert code == expected and 'Traceback' not in output, output
    return output.strip().splitlines()[-1]


@pytest.mark.integration
def test_a_dora_folder_that_is_a_file_stops_in_one_line_naming_it(dora_tools, tmp_path: Path):
    (tmp_path / 'taken').write_text('')
    code, output = dora_tools.run(tmp_path / 'taken', 'run', 'solver=regression')
    assert 'taken is a file' in one_line_failure(code, output)


@pytest.mark.integration
@pytest.mark.parametrize('value, expected', [('', '{root}/outputs'), ('  ', '{root}/outputs'),
                                             ('~/runs', '{home}/runs'), ('rel/runs', '{cwd}/rel/runs')])
def test_the_dora_folder_variable_is_expanded_and_made_absolute_once(tmp_path: Path, value: str, expected: str):
    script = ('import os; from solver.train import main; '
              'print(main.dora.dir, os.environ["SOLVER_DORA_DIR"].strip() or "-")')
    proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'SOLVER_DORA_DIR': value, 'HOME': str(tmp_path / 'home'),
                               'PYTHONPATH': str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    folder = expected.format(root=ROOT, home=tmp_path / 'home', cwd=tmp_path)
    exported = folder if value.strip() else '-'  # what distributed workers see
    assert proc.stdout.split() == [folder, exported]


@contextlib.contextmanager
def read_only(folder: Path) -> tp.Iterator[None]:
    """`folder` made read-only for this (possibly root) user: immutable for root, mode 555 otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(['chattr', '+i', str(folder)], capture_output=True).returncode != 0:
        pytest.skip('root without chattr +i: cannot make a folder read-only')
    try:
        yield
    finally:
        subprocess.run(['chattr', '-i', str(folder)], check=True)


@pytest.mark.integration
def test_a_read_only_experiment_folder_stops_before_training_in_one_line(dora, dora_tools, dora_dir: Path):
    folder = dora_tools.folder(dora_dir, 'solver=regression')
    folder.mkdir(parents=True)
    with read_only(folder):
        code, output = dora('run', 'solver=regression')
    line = one_line_failure(code, output)
    assert f'Cannot write in {folder}' in line and 'writable' in line
    assert 'Train' not in output


@pytest.mark.integration
def test_a_full_disk_at_start_stops_in_one_line(dora_tools, tmp_path: Path):
    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(disk)], capture_output=True).returncode:
        pytest.skip('cannot mount a small tmpfs here (needs root)')
    try:
        with contextlib.suppress(OSError), open(disk / 'filler', 'wb') as f:
            while True:
                f.write(bytes(4096))
                f.flush()
        code, output = dora_tools.run(disk / 'dora', 'run', 'solver=regression')
    finally:
        subprocess.run(['umount', str(disk)], check=True)
    assert 'is full' in one_line_failure(code, output)


@pytest.mark.integration
def test_ctrl_c_stops_in_one_line_with_130_and_the_checkpoint_intact(dora_tools, dora_dir: Path):
    # 100 epochs: minutes of training, so that the signal lands mid-run even when a loaded machine
    # lets this test notice the second save late (3 epochs took 3 s, and once ended first).
    overrides = ('solver=regression', 'model.hidden_size=512', 'dataset.dim=256', 'dataset.batch_size=256',
                 'dataset.train_size=24576', 'checkpoint.every_steps=4', 'checkpoint.async_save=true',
                 'optim.epochs=100')
    with dora_tools.start(dora_dir, *overrides) as run:
        run.wait_for(lambda: run.output().count(' - Checkpoint checkpoint.th') >= 2, 'two saves')
        run.send(2)  # SIGINT, what Ctrl-C sends
        code, output = run.finish()
    line = one_line_failure(code, output, expected=130)
    assert 'Interrupted (Ctrl-C)' in line and str(run.folder) in line
    envelope.read_checkpoint(run.folder / 'checkpoint.th')
    assert not list(run.folder.glob('.checkpoint*.tmp.*'))


@pytest.mark.integration
@pytest.mark.slow
def test_a_failed_async_save_stops_training_at_the_next_step_naming_the_file(dora_tools, dora_dir: Path):
    import functools
    import resource
    import signal

    def limit_file_size(limit: int) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # 400 steps per epoch: the background write (at nice 19) has long failed before epoch 2 ends.
    overrides = ('solver=regression', 'model.hidden_size=512', 'dataset.dim=256', 'dataset.train_size=12800',
                 'dataset.eval_size=32', 'checkpoint.async_save=true')
    code, output = dora_tools.run(dora_dir, 'run', *overrides, preexec_fn=functools.partial(limit_file_size, 200_000))
    folder = dora_tools.folder(dora_dir, *overrides)
    line = one_line_failure(code, output)
    assert f"Could not write checkpoint {folder / 'checkpoint.th'}: File too large" in line
    # The save at the end of epoch 1 failed: epoch 2 stopped at its first steps, not at its save.
    assert 'Train Summary | Epoch 2' not in output
    assert not (folder / 'checkpoint.th').exists() and not list(folder.glob('.checkpoint*.tmp.*'))


# -- one test per place that deserialises (docs/security.md) --------------------------------------------

def test_torch_archive_a_checkpoint_pickle_that_would_run_code_is_refused(tmp_path: Path):
    path = tmp_path / 'checkpoint.th'
    marker = tmp_path / 'pwned'
    torch.save({'format': envelope.FORMAT, 'version': envelope.VERSION, 'state': RunsCode(marker)}, path)
    with pytest.raises(faults.UnsafeCheckpointError, match='refused: needs arbitrary Python objects'):
        envelope.read_checkpoint(path)
    assert not marker.exists()


def test_dcp_tensor_data_file_holding_a_pickle_payload_is_refused(tmp_path: Path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex
    marker = tmp_path / 'pwned'
    metadata_bytes, _ = honest_metadata_and_data()
    payload = torch_payload(marker)
    metadata = dcp_reader.parse_metadata(metadata_bytes, Path('.metadata'))
    metadata.storage_data = {MetadataIndex('model.w', (0, 0)): _StorageInfo('__0_0.distcp', 0, len(payload))}
    metadata.storage_meta = None
    path = forge_sharded(tmp_path / 'checkpoint.th', {'.metadata': pickle.dumps(metadata), '__0_0.distcp': payload})
    with pytest.raises(faults.CorruptCheckpointError, match='cannot be read|refused'):
        envelope.read_checkpoint(path)
    assert not marker.exists()


def test_safetensors_file_with_a_crafted_header_is_not_taken_for_a_checkpoint(tmp_path: Path):
    import json
    import struct
    marker = tmp_path / 'pwned'
    header = json.dumps({'__metadata__': {'payload': pickle.dumps(RunsCode(marker)).hex()}}).encode()
    path = tmp_path / 'model.safetensors'
    path.write_bytes(struct.pack('<Q', len(header)) + header)
    with pytest.raises(faults.CorruptCheckpointError, match='not a torch zip archive'):
        envelope.read_checkpoint(path)
    assert not marker.exists()


def test_yaml_config_with_a_python_tag_is_refused_by_omegaconf(tmp_path: Path):
    from omegaconf import OmegaConf
    marker = tmp_path / 'pwned'
    config = tmp_path / 'evil.yaml'
    config.write_text(f"x: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(Exception, match='python/object'):
        OmegaConf.load(config)
    assert not marker.exists()


def test_midi_parsing_of_a_payload_file_raises_a_drum_file_error(tmp_path: Path):
    from solver.drums.midi import DrumFileError, read_drum_events
    marker = tmp_path / 'pwned'
    cases = {'pickle.mid': pickle.dumps(RunsCode(marker)),
             'truncated.mid': b'MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk\xff\xff\xff\xff\x00\x99',
             'zip.mid': torch_payload(marker)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DrumFileError):
            read_drum_events(tmp_path / name)
    assert not marker.exists()


@pytest.mark.integration
def test_json_history_of_dora_holding_a_payload_runs_nothing(dora_tools, dora_dir: Path):
    marker = dora_dir.parent / 'pwned'
    folder = dora_tools.folder(dora_dir, 'solver=regression')
    folder.mkdir(parents=True)
    (folder / 'history.json').write_bytes(pickle.dumps(RunsCode(marker)))
    (folder / '.argv.json').write_text('["solver=regression"]')
    code, output = dora_tools.run(dora_dir, 'info', 'solver=regression')
    assert code == 0, output
    assert not marker.exists()


@pytest.mark.integration
@pytest.mark.xfail(strict=True, reason="known, not ours: Dora unpickles <xp>/job.pkl with plain pickle "
                   "on `dora info` and `dora run` (docs/security.md)")
def test_dora_job_pickle_in_an_experiment_folder_runs_nothing(dora_tools, dora_dir: Path):
    marker = dora_dir.parent / 'pwned'
    folder = dora_tools.folder(dora_dir, 'solver=regression')
    folder.mkdir(parents=True)
    (folder / 'job.pkl').write_bytes(pickle.dumps(RunsCode(marker)))
    dora_tools.run(dora_dir, 'info', 'solver=regression')
    assert not marker.exists()


@pytest.mark.parametrize('placeholder', [
    {sharded.MARK: 'model.w', 'shape': [3, 4], 'dtype': 'load'},           # names a function, not a dtype
    {sharded.MARK: 'model.w', 'shape': [10**6, 10**6], 'dtype': 'float32'},  # asks for terabytes
    {sharded.MARK: ['model.w'], 'shape': [3, 4], 'dtype': 'float32'},       # not a name
])
def test_a_placeholder_that_does_not_match_the_metadata_is_refused_before_allocating(tmp_path: Path, placeholder):
    metadata, data = honest_metadata_and_data()
    path = forge_sharded(tmp_path / 'checkpoint.th', {'.metadata': metadata, '__0_0.distcp': data},
                         state={'model': {'w': placeholder}})
    with pytest.raises(faults.CorruptCheckpointError, match='does not match its metadata'):
        envelope.read_checkpoint(path)


# -- the restricted unpickler of our own reader (unpickler.RestrictedUnpickler) ----------------------
# Pickles written opcode by opcode: each names only what the unpickler allows, and misuses it.

def _global(module: str, name: str) -> bytes:
    return b'c' + f'{module}\n{name}\n'.encode()


def _str(text: str) -> bytes:
    data = text.encode()
    return b'X' + struct.pack('<I', len(data)) + data


def _ints(*values: int) -> bytes:
    return b''.join(b'J' + struct.pack('<i', v) for v in values)


def _tensor(size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0, numel: int = 4,
            storage: str = 'FloatStorage', requires_grad: bool = False) -> bytes:
    """`_rebuild_tensor_v2(<storage '0' of numel floats>, offset, size, stride, requires_grad, OrderedDict())`."""
    pid = b'(' + _str('storage') + _global('torch', storage) + _str('0') + _str('cpu') + _ints(numel) + b'tQ'
    hooks = _global('collections', 'OrderedDict') + b')R'
    return (_global('torch._utils', '_rebuild_tensor_v2') + b'(' + pid + _ints(offset) + b'(' + _ints(*size)
            + b't(' + _ints(*stride) + b't' + (b'\x88' if requires_grad else b'\x89') + hooks + b'tR')


def _forged_archive(path: Path, pickled: bytes, data: bytes = struct.pack('<4f', 1, 2, 3, 4)) -> Path:
    writer = torch._C.PyTorchFileWriter(str(path))
    pickled = b'\x80\x02' + pickled + b'.'
    writer.write_record('data.pkl', pickled, len(pickled))
    writer.write_record('byteorder', sys.byteorder.encode(), len(sys.byteorder))
    writer.write_record('data/0', data, len(data))
    writer.write_end_of_file()
    return path


def test_the_opcodes_written_by_hand_make_a_tensor_that_both_unpicklers_load(tmp_path: Path):
    path = _forged_archive(tmp_path / 'a.th', _tensor((2, 2), (2, 1)))
    loaded, reading = archive.load(path)
    reading.wait()
    reading.close()
    assert torch.equal(loaded, torch.tensor([[1., 2.], [3., 4.]]))
    assert torch.equal(torch.load(path, weights_only=True), loaded)


@pytest.mark.parametrize('pickled, why', [
    (_tensor((5,), (1,)), 'past the end'),                    # reads beyond the record
    (_tensor((2,), (1,), offset=3), 'past the end'),
    (_tensor((2, 2), (3, 1)), 'past the end'),                # strides that reach out
    (_tensor((2,), (-1,)), 'not a plain tensor'),             # a negative stride
    (_tensor((2,), (1,), offset=-1), 'not a plain tensor'),
    (_tensor((2,), (1,), requires_grad=True), 'not a plain tensor'),
    (_tensor((2,), (1,), storage='Tensor'), 'not allowed'),   # not a storage class
    (_global('torch', 'FloatStorage') + b'(' + _ints(3) + b'tR', 'not callable'),  # a storage class, called
    (_global('builtins', 'open') + b'(' + _str('x') + b'tR', 'not allowed'),
    (_global('torch._utils', '_rebuild_tensor_v2') + b'}' + _str('a') + _ints(1) + b'sb', '__dict__'),  # BUILD on it
    (_global('torch._utils', '_rebuild_tensor_v2') + b'(N}' + _str('a') + _ints(1) + b'stb', 'attribute'),
    (_tensor((2,), (1,)) + b'(' + b'\x88N' + _global('collections', 'OrderedDict') + b')Rtb',
     'changed after it was built'),                            # BUILD: Tensor.__setstate__ asks for grad
    (b'(' + _str('storage') + _str('FloatStorage') + _str('0') + _str('cpu') + _ints(4) + b'tQ', 'malformed'),
])
def test_the_restricted_unpickler_refuses_every_misuse_of_what_it_allows(tmp_path: Path, pickled: bytes, why: str):
    path = _forged_archive(tmp_path / 'a.th', pickled)
    with pytest.raises(Exception, match=why):
        archive.load(path)
    # read_checkpoint then asks torch's own weights-only unpickler, which refuses or loads
    # something that is no checkpoint: either way a one-line error, nothing run, nothing read
    # outside the file's records.
    with pytest.raises(faults.CheckpointError):
        envelope.read_checkpoint(path)
    assert not (tmp_path / 'x').exists()


def test_a_solver_like_state_loads_through_the_restricted_unpickler_not_torchs(tmp_path: Path, monkeypatch):
    from solver.best_state import BestState
    from solver.rng import RNGState
    model = torch.nn.LSTM(4, 8, num_layers=2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 2, 4))[0].sum().backward()
    optimizer.step()
    best = BestState()
    best.register('model', model)
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'rng': RNGState().state_dict(),
             'best_state': best.state_dict(), 'history': [{'train': {'loss': 1.5}}], 'empty': torch.empty(0)}
    envelope.write_checkpoint(tmp_path / 'c.th', state, {'epoch': 1, 'config': {'a': [1, 2.0, None, 'x']}})

    def no_fallback(*args: tp.Any, **kwargs: tp.Any) -> tp.NoReturn:
        raise AssertionError("fell back to torch.load")
    monkeypatch.setattr(torch, 'load', no_fallback)
    live = {'model': model.state_dict(), 'optimizer': optimizer.state_dict()}
    ckpt = envelope.read_checkpoint(tmp_path / 'c.th', into=live)
    # parameters, both Adam moments and Adam's step count, for each parameter
    assert ckpt.meta['config'] == {'a': [1, 2.0, None, 'x']} and len(ckpt.live) == len(list(model.parameters())) * 4
    assert ckpt.state['rng'].keys() == state['rng'].keys()


# ---------------------------------------------------------------------------------------------
# Compressed checkpoints (checkpoint.compress=zstd): an entry or a frame that lies


def frame_with_content_size(frame: bytes, size: int) -> bytes:
    """`frame` with the content size its header declares replaced by `size` (same field width)."""
    descriptor = frame[4]
    single, dict_flag, fcs_flag = descriptor >> 5 & 1, descriptor & 3, descriptor >> 6
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    value = size - 256 if width == 2 else size
    return frame[:at] + value.to_bytes(width, 'little') + frame[at + width:]


Mutation = tp.Callable[[list[tp.Any], torch.Tensor], tuple[tp.Any, torch.Tensor]]


def forge_compressed(path: Path, mutate: Mutation) -> Path:
    """An honest compressed checkpoint of one tensor whose table entry and frame `mutate` rewrites;
    its digests left as they were (of the honest tensor)."""
    envelope.write_checkpoint(path, {'w': torch.arange(40000, dtype=torch.float32)}, {'epoch': 1}, compress='zstd')
    payload = torch.load(path, weights_only=True)
    ref, payload['state']['w'] = mutate(list(payload['compressed']['refs'][0]), payload['state']['w'])
    payload['compressed']['refs'][0] = tuple(ref)
    with open(path, 'wb') as f:
        archive.save(payload, f)
    return path


def _lie_in_header(ref, frame):  # the entry and the frame agree on half the real size
    return (ref[0], ref[1], (20000,), 80000), torch.frombuffer(
        bytearray(frame_with_content_size(frame.numpy().tobytes(), 80000)), dtype=torch.uint8)


@pytest.mark.parametrize('mutate, why', [
    (lambda ref, frame: (ref, torch.frombuffer(bytearray(frame_with_content_size(frame.numpy().tobytes(), 1000)),
                                               dtype=torch.uint8)), 'its frame declares 1000 bytes, its entry 160000'),
    (lambda ref, frame: (ref, torch.frombuffer(bytearray(zstandard.ZstdCompressor(write_content_size=False).compress(
        bytes(160000))), dtype=torch.uint8)), 'its frame declares no size, its entry 160000'),
    (_lie_in_header, 'compressed tensor 0: decompression error'),
    (lambda ref, frame: (ref, frame[:frame.numel() // 2].clone()), 'compressed tensor 0: decompression error'),
    (lambda ref, frame: ((ref[0], ref[1], (2**38,), 2**40), frame), 'more than a frame of'),
    (lambda ref, frame: ((ref[0], ref[1], (2**30,), 2**32), torch.zeros(2**32 // codec.MAX_RATIO, dtype=torch.uint8)),
     "bytes of this machine's memory"),
    (lambda ref, frame: ((ref[0], 'torch.float32', (1,), 8), frame), 'declares 8 bytes for a torch.float32'),
    (lambda ref, frame: (('zstd', ref[1], ref[2], ref[3]), frame), 'does not go with torch.float32'),
], ids=['content size lies', 'no content size', 'decodes beyond the size declared', 'truncated frame',
        'more than the file holds', 'more than memory', 'shape and size disagree', 'encoding of another dtype'])
def test_a_compressed_tensor_that_lies_is_refused_as_damaged_naming_the_file(tmp_path: Path, mutate, why,
                                                                             monkeypatch):
    monkeypatch.setattr(codec, 'physical_memory', lambda: 2**31)  # so that 'more than memory' is small to forge
    path = forge_compressed(tmp_path / 'checkpoint.th', mutate)
    with pytest.raises(faults.CorruptCheckpointError) as err:
        envelope.read_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and 'damaged' in message and why in message and '\n' not in message


def test_an_honest_compressed_file_rewritten_by_the_forger_still_loads(tmp_path: Path):
    path = forge_compressed(tmp_path / 'checkpoint.th', lambda ref, frame: (ref, frame))
    assert torch.equal(envelope.read_checkpoint(path).state['w'], torch.arange(40000, dtype=torch.float32))
