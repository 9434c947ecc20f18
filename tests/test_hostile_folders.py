"""Hostile folders and files (issue 22): an experiment folder, a blob store, a shard folder or a
checkpoint from elsewhere is input. Links, FIFOs, devices, oversized files, crafted tensors and
fields a verified file may still hold cost no data, no memory, no hang and no traceback.

Each finding of the issue is one test here (numbered as there), through the `solver` command
in-process (`cli.main`, output captured) where it can be, through real processes where the
entry point is `dora run` or the bound is the process's own memory (marked integration). A hang
is turned into a failure by `deadline`; memory bounds are the peak resident size of a process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import typing as tp
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import DORA, REGRESSION, SOLVER, dora_env, xp_folder
from omegaconf import OmegaConf
from test_hostile import _forged_archive, _global, _ints, _str, _tensor, forge_sharded, honest_metadata_and_data

from solver import cli, validation
from solver.checkpointing import archive, envelope, faults, naming, objectstore, recovery, remote, store, unpickler
from solver.checkpointing.fs import UnsafeFileError, open_fd, read_file, unlink
from solver.errors import ConfigError

SIG = 'feedbeef'
META = {'epoch': 1, 'step': 16, 'sig': SIG}


@contextlib.contextmanager
def deadline(seconds: float) -> tp.Iterator[None]:
    """Fail (TimeoutError) instead of hanging: a blocked `open` of a FIFO is interrupted."""
    def expire(signum: int, frame: tp.Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def state(seed: int = 0) -> dict[str, tp.Any]:
    generator = torch.Generator().manual_seed(seed)
    return {'model': {'w': torch.randn(32, 32, generator=generator), 'b': torch.randn(4, generator=generator)},
            'history': [{'train': {'loss': 1.0}}]}


def experiment(dora_dir: Path, sig: str = SIG, epochs: int = 2, incremental: bool = False) -> Path:
    """A Dora folder's experiment holding `checkpoint.th` and `checkpoint_<epoch>.th` files."""
    folder = dora_dir / 'xps' / sig
    folder.mkdir(parents=True)
    (folder / '.argv.json').write_text(json.dumps(['solver=regression']))
    (folder / 'history.json').write_text(json.dumps([{'train': {'loss': 1.0}}] * epochs))
    writer = store.IncrementalStore(folder) if incremental else None
    for epoch in range(1, epochs + 1):
        for path in (folder / f'checkpoint_{epoch}.th', folder / naming.LATEST):
            meta = dict(META, epoch=epoch, sig=sig)
            if writer is not None:
                writer.write(path, state(epoch), meta)
            else:
                envelope.write_checkpoint(path, state(epoch), meta)
    return folder


@pytest.fixture
def dora_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / 'dora'
    monkeypatch.setenv('SOLVER_DORA_DIR', str(folder))
    return folder


def solver(capsys: pytest.CaptureFixture, *args: str, seconds: float = 20) -> tuple[int, str]:
    """`solver ARGS` in this process: (exit code, stdout + stderr); a hang fails the test."""
    with deadline(seconds):
        code = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    assert 'Traceback' not in out + err
    return code, out + err


# -- fs: the one way to open a file of a folder from elsewhere ------------------------------------------

def test_open_fd_refuses_a_link_a_fifo_and_a_file_over_its_bound_naming_each(tmp_path: Path):
    (tmp_path / 'real').write_bytes(b'1234')
    (tmp_path / 'link').symlink_to(tmp_path / 'real')
    os.mkfifo(tmp_path / 'fifo')
    with pytest.raises(UnsafeFileError, match=r'link is a symbolic link \(to .*real\)'):
        open_fd(tmp_path / 'link')
    with deadline(5), pytest.raises(UnsafeFileError, match='fifo is a FIFO'):
        open_fd(tmp_path / 'fifo')
    with pytest.raises(UnsafeFileError, match='holds 4 bytes, more than the 3'):
        read_file(tmp_path / 'real', 3)
    assert read_file(tmp_path / 'real', 4) == b'1234'


def test_a_folder_between_inside_and_the_file_that_is_a_link_is_refused(tmp_path: Path):
    (tmp_path / 'elsewhere').mkdir()
    (tmp_path / 'elsewhere' / 'f').write_bytes(b'x')
    (tmp_path / 'xp').mkdir()
    (tmp_path / 'xp' / 'blobs').symlink_to(tmp_path / 'elsewhere')
    with pytest.raises(UnsafeFileError, match='blobs is a symbolic link'):
        read_file(tmp_path / 'xp' / 'blobs' / 'f', 10, inside=tmp_path / 'xp')
    with pytest.raises(UnsafeFileError, match='blobs is a symbolic link'):
        unlink(tmp_path / 'xp' / 'blobs' / 'f', inside=tmp_path / 'xp')
    assert (tmp_path / 'elsewhere' / 'f').exists()


# -- 1. a `.lock` that is a link -------------------------------------------------------------------------

@pytest.mark.parametrize('command', [('prune', '--keep-last', '1'), ('rollback', '--to', 'epoch:1')])
def test_1_a_lock_that_is_a_link_is_refused_and_its_target_untouched(dora_dir, tmp_path, capsys, command):
    folder = experiment(dora_dir)
    victim = tmp_path / 'precious.txt'
    victim.write_text('do not truncate me\n')
    (folder / '.lock').symlink_to(victim)
    code, output = solver(capsys, command[0], folder, *command[1:])
    assert code == 1 and f"{folder / '.lock'} is a symbolic link" in output
    assert victim.read_text() == 'do not truncate me\n'


# -- 2. `blobs/` that is a link to another experiment's store ---------------------------------------------

def test_2_prune_refuses_a_blob_folder_linked_to_another_store_and_deletes_nothing(dora_dir, tmp_path, capsys):
    a = experiment(dora_dir, 'aaaa', epochs=2, incremental=True)
    b = experiment(tmp_path / 'other-dora', 'bbbb', epochs=1, incremental=True)
    theirs = store.IncrementalStore(b).blobs
    before = sorted(os.listdir(theirs))
    shutil.rmtree(dora_dir / 'blobs')
    (dora_dir / 'blobs').symlink_to(theirs)
    code, output = solver(capsys, 'prune', a, '--keep-last', '1', '--yes')
    assert code == 2 and f"{dora_dir / 'blobs'} is a symbolic link" in output
    assert sorted(os.listdir(theirs)) == before and (a / 'checkpoint_1.th').exists()
    assert envelope.read_checkpoint(b / 'checkpoint_1.th').meta['sig'] == 'bbbb'


def test_2_prune_refuses_an_experiment_blob_folder_of_the_old_layout_linked_elsewhere(dora_dir, tmp_path, capsys):
    a = experiment(dora_dir, 'aaaa', epochs=2, incremental=True)
    elsewhere = tmp_path / 'elsewhere'
    store.IncrementalStore(elsewhere).write(elsewhere / 'checkpoint.th', state(), META)
    (a / 'blobs').symlink_to(elsewhere / 'blobs')
    before = sorted(os.listdir(elsewhere / 'blobs'))
    code, output = solver(capsys, 'prune', a, '--keep-last', '1', '--yes')
    assert code == 2 and f"{a / 'blobs'} is a symbolic link" in output
    assert sorted(os.listdir(elsewhere / 'blobs')) == before and (a / 'checkpoint_1.th').exists()


def test_2_a_checkpoint_does_not_read_its_blobs_through_a_linked_blob_folder(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    for folder in (a, b):
        store.IncrementalStore(folder).write(folder / 'checkpoint.th', state(), META)
    (a / 'blobs').rename(a / 'old-blobs')
    (a / 'blobs').symlink_to(b / 'blobs')
    with pytest.raises(faults.CorruptCheckpointError, match='blobs is a symbolic link'):
        envelope.read_checkpoint(a / 'checkpoint.th')


# -- 3. a checkpoint without a signature ---------------------------------------------------------------

def test_3_a_checkpoint_without_a_signature_is_not_resumed(tmp_path):
    from test_manager import manager
    envelope.write_checkpoint(tmp_path / 'checkpoint.th', state(), {'epoch': 1})  # digests valid, no sig
    with pytest.raises(faults.CheckpointError, match='holds no experiment signature'):
        manager(tmp_path, sig=SIG).restore()


# -- 4, 5. crafted tensors in the restricted unpickler ------------------------------------------------------

BUILD_4000 = _tensor((4,), (1,)) + b'q\x00(h\x00' + _ints(0) + b'(' + _ints(4000) + b't(' + _ints(1) + b'ttb'
STRIDE_0 = _tensor((1 << 29,), (0,))


@pytest.mark.parametrize('pickled, why', [
    (BUILD_4000, 'BUILD on a tensor'),      # 4. Tensor.__setstate__ -> set_ grows the storage past the record
    (STRIDE_0, 'more elements than'),       # 5. 2 GiB of a 16-byte record once made contiguous
    (_tensor((4, 4), (1, 0)), 'more elements than'),  # overlapping strides
])
def test_4_5_a_tensor_that_would_outgrow_its_record_is_refused_before_allocating(tmp_path, pickled, why):
    path = _forged_archive(tmp_path / 'checkpoint.th', pickled)
    with pytest.raises(unpickler.Refused, match=why):
        archive.load(path)
    peak = _peak_rss()
    with pytest.raises(faults.CorruptCheckpointError, match=why):  # and not given to torch for a second try
        envelope.read_checkpoint(path)
    assert _peak_rss() - peak < 256 << 20


def test_5_a_stride_0_view_from_torchs_unpickler_is_refused_before_hashing(tmp_path, monkeypatch):
    # The fallback (a file our unpickler does not take) sees the same bound, in `format.verify`.
    placeholder = torch.zeros(4)
    payload = {'format': envelope.FORMAT, 'version': envelope.VERSION, 'meta': {}, 'state': {'w': placeholder},
               'digests': {'tensors': ['0'], 'skeleton': '0'}}
    big = torch.zeros(4).as_strided((1 << 29,), (0,))
    payload['state']['w'] = big
    torch.save(payload, tmp_path / 'checkpoint.th')
    monkeypatch.setattr(archive, 'load', lambda *a, **k: (_ for _ in ()).throw(ValueError('not ours')))
    peak = _peak_rss()
    with pytest.raises(faults.CorruptCheckpointError, match='more elements than its record'):
        envelope.read_checkpoint(tmp_path / 'checkpoint.th')
    assert _peak_rss() - peak < 256 << 20


def test_a_memo_index_far_beyond_the_pickle_is_refused_before_the_c_unpickler_fills_it(tmp_path):
    # Found by the fuzzer: LONG_BINPUT 2**27 makes CPython's C unpickler fill a memo of 2**28 entries (2 GiB).
    pickled = _tensor((4,), (1,)) + b'r' + struct.pack('<I', 1 << 27)
    path = _forged_archive(tmp_path / 'checkpoint.th', pickled)
    peak = _peak_rss()
    with pytest.raises(faults.CorruptCheckpointError, match='memo index 134217728'):
        envelope.read_checkpoint(path)
    assert _peak_rss() - peak < 256 << 20


def _good_records(tmp_path: Path) -> dict[str, bytes]:
    """The zip records of a real checkpoint, by name, to rebuild a forged archive from."""
    good = tmp_path / 'good.th'
    envelope.write_checkpoint(good, state(), META)
    reader = torch._C.PyTorchFileReader(str(good))
    return {name: bytes(reader.get_record(name)) for name in reader.get_all_records()}


def test_a_deflate_bomb_is_refused_from_the_zip_directory_before_anything_is_inflated(tmp_path):
    bomb = tmp_path / 'checkpoint.th'
    with zipfile.ZipFile(bomb, 'w') as archive_file:
        for name, data in _good_records(tmp_path).items():
            if name == 'data.pkl':  # 256 MiB of padding after the pickle's STOP, deflated to a few hundred KiB
                archive_file.writestr(f'archive/{name}', data + bytes(256 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                archive_file.writestr(zipfile.ZipInfo(f'archive/{name}'), data)
    assert bomb.stat().st_size < 2 << 20
    peak = _peak_rss()
    with pytest.raises(faults.CorruptCheckpointError, match="'archive/data.pkl' is compressed"):
        envelope.read_checkpoint(bomb)
    assert _peak_rss() - peak < 128 << 20


def test_zip_entries_named_with_dot_dots_or_twice_are_never_extracted_and_the_digests_hold(tmp_path):
    records = _good_records(tmp_path)
    forged = tmp_path / 'checkpoint.th'
    with warnings.catch_warnings(), zipfile.ZipFile(forged, 'w') as archive_file:
        warnings.simplefilter('ignore')  # "Duplicate name"
        for name, data in records.items():
            archive_file.writestr(zipfile.ZipInfo(f'archive/{name}'), data)
        archive_file.writestr(zipfile.ZipInfo('archive/../../pwned'), b'x')
        for name in records:  # a second copy of each record, zeros
            if name.startswith('data/'):
                archive_file.writestr(zipfile.ZipInfo(f'archive/{name}'), bytes(len(records[name])))
    try:  # whichever of two records the zip reader finds, the digests are checked on the bytes read
        loaded = envelope.read_checkpoint(forged)
        assert torch.equal(loaded.state['model']['w'], state()['model']['w'])
    except faults.CorruptCheckpointError as err:
        assert 'do not match their digests' in str(err)
    assert not (tmp_path.parent / 'pwned').exists() and not Path('pwned').exists()


def test_a_local_mirror_that_is_the_experiment_folder_is_refused(tmp_path):
    for url in (f'file://{tmp_path}', f'file://{tmp_path}/sub', f'file://{tmp_path.parent}'):
        with pytest.raises(objectstore.RemoteError, match='is the experiment folder'):
            remote.RemoteMirror(url, tmp_path)


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- 6. FIFOs, devices and unbounded files ----------------------------------------------------------------

def test_6_verify_names_a_fifo_checkpoint_and_goes_on_with_the_others(dora_dir, capsys):
    folder = experiment(dora_dir)
    (folder / naming.LATEST).unlink()
    os.mkfifo(folder / naming.LATEST)
    code, output = solver(capsys, 'verify', folder)
    assert code == 1
    assert f"{folder / naming.LATEST}: DAMAGED: {folder / naming.LATEST} is a FIFO" in output
    assert f"{folder / 'checkpoint_2.th'}: intact" in output


def test_6_a_fifo_blob_is_named_and_the_newest_intact_checkpoint_used(tmp_path):
    folder = tmp_path / 'xp'
    writer = store.IncrementalStore(folder)
    writer.write(folder / 'checkpoint_1.th', state(1), META)
    writer.write(folder / naming.LATEST, state(2), META)
    used = set(store._refs(folder / 'checkpoint_1.th'))
    blob = next(p for p in (folder / 'blobs').iterdir() if p.name not in used)
    blob.unlink()
    os.mkfifo(blob)
    with deadline(20), pytest.raises(faults.CorruptCheckpointError, match=f'{blob.name}.* is a FIFO'):
        envelope.read_checkpoint(folder / naming.LATEST)
    with deadline(20):
        assert recovery.load_newest_intact(folder).path.name == 'checkpoint_1.th'


def test_6_a_fifo_shard_metadata_is_refused_naming_it(tmp_path):
    metadata, data = honest_metadata_and_data()
    path = forge_sharded(tmp_path / 'checkpoint.th', {'.metadata': metadata, '__0_0.distcp': data})
    shard_folder = next(tmp_path.glob('checkpoint.th.dcp.*'))
    (shard_folder / '.metadata').unlink()
    os.mkfifo(shard_folder / '.metadata')
    with deadline(20), pytest.raises(faults.CorruptCheckpointError, match=r'\.metadata is a FIFO'):
        envelope.read_checkpoint(path)


def test_6_a_shard_file_linked_to_dev_zero_is_refused(tmp_path):
    metadata, data = honest_metadata_and_data()
    path = forge_sharded(tmp_path / 'checkpoint.th', {'.metadata': metadata, '__0_0.distcp': data})
    shard = next(tmp_path.glob('checkpoint.th.dcp.*')) / '__0_0.distcp'
    shard.unlink()
    shard.symlink_to('/dev/zero')
    with deadline(20), pytest.raises(faults.CorruptCheckpointError, match=r'symbolic link \(to /dev/zero\)'):
        envelope.read_checkpoint(path)


def test_6_ls_does_not_hang_on_fifos_nor_read_dev_zero(dora_dir, capsys):
    folder = experiment(dora_dir)
    (folder / 'history.json').unlink()
    (folder / 'history.json').symlink_to('/dev/zero')
    os.mkfifo(folder / '.lock')
    (folder / '.argv.json').unlink()
    os.mkfifo(folder / '.argv.json')
    peak = _peak_rss()
    code, output = solver(capsys, 'ls')
    assert code == 0 and SIG in output
    code, output = solver(capsys, 'ls', folder)
    assert code == 0 and 'checkpoint_2.th' in output
    assert _peak_rss() - peak < 256 << 20


# -- 7. whatever Python raises while reading is a CheckpointError naming the file -----------------------

def _checkpoint_pickle(meta: bytes) -> bytes:
    """A checkpoint payload by hand, `meta` its meta's pickle (digests: anything)."""
    return (b'}(' + _str('format') + _str(envelope.FORMAT) + _str('version') + _ints(envelope.VERSION)
            + _str('meta') + meta + _str('state') + b'}' + _str('digests') + b'}' + b'u')


DEEP = 200_000


@pytest.mark.parametrize('meta', [
    b'}' + _str('a') + _global('builtins', 'set') + b'(]' + _ints(1) + b'atR' + b's',   # a set
    b'}' + b'(' + _ints(1, 2) + b't' + _ints(3) + b's',                                  # a tuple as a key
    b'}' + _str('a') + b'(' + _str('storage') + _global('torch', 'FloatStorage') + _str('0') + _str('cpu')
    + _ints(4) + b'tQs',                                                                  # a storage marker
    b']' * DEEP + b'a' * (DEEP - 1),                                                      # nested 200,000 deep
], ids=['set', 'tuple-key', 'storage-marker', 'deep'])
def test_7_a_value_no_checkpoint_holds_is_a_checkpoint_error_and_the_next_file_is_used(tmp_path, capsys, meta):
    good = tmp_path / 'checkpoint_1.th'
    envelope.write_checkpoint(good, state(), META)
    bad = _forged_archive(tmp_path / naming.LATEST, _checkpoint_pickle(meta))
    with pytest.raises(faults.CorruptCheckpointError, match=str(bad)):
        envelope.read_checkpoint(bad)
    assert recovery.load_newest_intact(tmp_path).path == good
    code, output = solver(capsys, 'verify', bad)
    assert code == 1 and f'{bad}: DAMAGED: {bad}' in output


# -- 8. credentials in a URL ---------------------------------------------------------------------------------

def test_8_overrides_with_credentials_are_found_and_redacted():
    assert objectstore.secret_in(['solver=regression', 'checkpoint.remote=s3://KEY:SECRET@bucket/runs']) \
        == 'checkpoint.remote=s3://bucket/runs'
    assert objectstore.secret_in(['continue_from="s3://bucket/x.th?X-Amz-Signature=SECRET"']) == 'continue_from=s3://bucket/x.th'
    assert objectstore.secret_in(['checkpoint.remote=s3://bucket/runs', 'a=b@c']) is None
    assert objectstore.redact_overrides(['checkpoint.remote=s3://KEY:SECRET@bucket/runs', 'a=1']) \
        == ['checkpoint.remote=s3://bucket/runs', 'a=1']


def test_8_ls_and_show_never_print_a_secret_recorded_before(dora_dir, capsys):
    folder = experiment(dora_dir)
    (folder / '.argv.json').write_text(json.dumps(['checkpoint.remote=s3://KEY:SECRET@bucket/runs']))
    for args in (['ls'], ['ls', '--json'], ['show', folder], ['show', folder, '--json']):
        code, output = solver(capsys, *args)
        assert code == 0 and 'SECRET' not in output and 's3://bucket/runs' in output


@pytest.mark.integration
def test_8_dora_run_with_credentials_in_a_url_stops_before_any_file_holds_them(tmp_path):
    dora_dir = tmp_path / 'dora'
    result = subprocess.run([*DORA, 'run', *REGRESSION, 'checkpoint.remote=s3://KEY:SECRET@bucket/runs'],
                            env=dora_env(dora_dir), capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and 'Traceback' not in output and 'SECRET' not in output
    assert 'checkpoint.remote=s3://bucket/runs' in output
    written = [p for p in dora_dir.rglob('*') if p.is_file()] if dora_dir.exists() else []
    assert not [p for p in written if b'SECRET' in p.read_bytes()]


# -- 9. export onto an experiment's checkpoint -----------------------------------------------------------------

def test_9_export_refuses_to_replace_a_checkpoint_of_an_experiment(dora_dir, capsys):
    folder = experiment(dora_dir)
    best = {'best_state': {'states': {'model': state()['model']}}}
    envelope.write_checkpoint(folder / naming.LATEST, {**state(), **best}, META)
    before = (folder / naming.LATEST).read_bytes()
    for target in (folder / naming.LATEST, folder / 'checkpoint_7.th'):
        code, output = solver(capsys, 'export', SIG, target)
        assert code == 2 and 'could no longer resume' in output
    assert (folder / naming.LATEST).read_bytes() == before and not (folder / 'checkpoint_7.th').exists()


# -- 10. a batch that cannot fit ------------------------------------------------------------------------------

def test_10_a_batch_that_cannot_fit_memory_is_refused_naming_the_key_and_the_bound():
    with pytest.raises(ConfigError, match=r'dataset.batch_size=1000000000 cannot fit.*dataset.batch_size <= \d+'):
        validation.check_batch_fits(10**9, 100)
    validation.check_batch_fits(64, 100)


def test_10_the_train_loader_refuses_it_before_allocating_a_batch():
    from solver import builders
    cfg = OmegaConf.create({'dataset': {'batch_size': 10**9, 'num_workers': 0}})
    dataset = torch.utils.data.TensorDataset(torch.zeros(100, 8))
    with deadline(10), pytest.raises(ConfigError, match='dataset.batch_size=1000000000 cannot fit'):
        builders.get_train_loader(dataset, cfg, seed=0)


# -- 11. a URL whose file system fails on connecting ------------------------------------------------------------

def test_11_a_url_that_cannot_be_reached_is_one_line(capsys):
    code, output = solver(capsys, 'verify', 'ftp://127.0.0.1:1/x.th')
    assert code == 2 and 'Cannot open ftp://127.0.0.1:1/x.th: ConnectionRefusedError' in output
    assert len(output.strip().splitlines()) == 1


# -- 12. a pickle needing arbitrary objects --------------------------------------------------------------------

@pytest.mark.parametrize('pickled', [
    b'(' + _str('echo') + b'ios\nsystem\n',                                   # INST
    _str('os') + _str('system') + b'\x93' + b'(' + _str('echo') + b'tR',     # protocol-4 STACK_GLOBAL
], ids=['INST', 'STACK_GLOBAL'])
def test_12_a_pickle_needing_code_is_refused_as_such_never_called_damaged(tmp_path, capsys, pickled):
    path = _forged_archive(tmp_path / 'checkpoint.th', pickled)
    code, output = solver(capsys, 'verify', path)
    assert code == 1 and 'refused: needs arbitrary Python objects' in output and 'os.system' in output
    assert 'damaged' not in output and 'weights_only' not in output


# -- the bounds of real processes ------------------------------------------------------------------------------

def _run_bounded(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str, int]:
    """(exit code, output, peak resident bytes) of a process (its own rusage: `wait4`); a hang
    fails the test."""
    import tempfile
    import time
    with tempfile.TemporaryFile('w+') as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > end:
                process.kill()
                process.wait()
                pytest.fail(f"{args} still running after {timeout} s: a hang")
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        return process.returncode, log.read(), usage.ru_maxrss * 1024


@pytest.mark.integration
def test_6_solver_ls_and_verify_on_a_hostile_folder_stay_bounded_and_one_line(tmp_path):
    dora_dir = tmp_path / 'dora'
    folder = experiment(dora_dir)
    (folder / 'history.json').unlink()
    (folder / 'history.json').symlink_to('/dev/zero')
    os.mkfifo(folder / '.lock')
    (folder / naming.LATEST).unlink()
    os.mkfifo(folder / naming.LATEST)
    _forged_archive(folder / 'checkpoint_3.th', STRIDE_0)
    _forged_archive(folder / 'checkpoint_4.th', BUILD_4000)
    env = dict(os.environ, SOLVER_DORA_DIR=str(dora_dir))
    code, output, peak = _run_bounded([*SOLVER, 'ls'], env)
    assert code == 0 and SIG in output and 'Traceback' not in output
    code, output, peak = _run_bounded([*SOLVER, 'verify', str(folder)], env)
    assert code == 1 and 'Traceback' not in output, output
    assert 'is a FIFO' in output and 'more elements than' in output and 'BUILD on a tensor' in output
    assert f"{folder / 'checkpoint_2.th'}: intact" in output
    assert peak < 1 << 30, f"peak resident memory {peak >> 20} MiB"


@pytest.mark.integration
def test_1_dora_run_refuses_a_lock_that_is_a_link_and_leaves_its_target(tmp_path):
    dora_dir = tmp_path / 'dora'
    folder = xp_folder(dora_dir, *REGRESSION)
    folder.mkdir(parents=True)
    victim = tmp_path / 'precious.txt'
    victim.write_text('do not truncate me\n')
    (folder / '.lock').symlink_to(victim)
    code, output, _ = _run_bounded([*DORA, 'run', *REGRESSION], dora_env(dora_dir), timeout=120)
    assert code == 1 and 'Traceback' not in output and '.lock is a symbolic link' in output
    assert victim.read_text() == 'do not truncate me\n'


# -- the mutation fuzzer, a short run ------------------------------------------------------------------------

@pytest.mark.integration
def test_a_short_fuzz_run_finds_no_input_that_breaks_the_rule(tmp_path):
    script = Path(__file__).resolve().parents[1] / 'scripts' / 'fuzz_checkpoints.py'
    result = subprocess.run([sys.executable, str(script), '--cases', '200', '--seed', '22', '--out',
                             str(tmp_path / 'failures')], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report['mutations'] == 200 and report['rule_broken'] == 0
    assert {kind.split('/')[0] for kind in report['by_seed_and_kind']} == {'single', 'incremental', 'sharded',
                                                                              'compressed'}
    assert not (tmp_path / 'failures').exists()


FOUND_BY_FUZZING = sorted((Path(__file__).parent / 'fuzz_regressions').glob('*.th'))


@pytest.mark.parametrize('found', FOUND_BY_FUZZING, ids=lambda p: p.stem)
def test_an_input_the_fuzzer_found_is_a_checkpoint_error_naming_it(tmp_path, capsys, found):
    # zip64-end-record-bit-flip: zipfile.is_zipfile raised BadZipFile ("span multiple disks") past our checks.
    path = tmp_path / naming.LATEST
    shutil.copyfile(found, path)
    with pytest.raises(faults.CheckpointError, match=str(path)):
        envelope.read_checkpoint(path)
    code, output = solver(capsys, 'verify', path)
    assert code == 1 and f'{path}: DAMAGED' in output
