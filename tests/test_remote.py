"""Checkpoints mirrored to object storage (`checkpoint.remote`), against a real S3-protocol server:
moto's standalone server on a free port of 127.0.0.1, reached by s3fs through AWS_ENDPOINT_URL.

Covered: mirroring after each save (files, the commit point last, the local retention remotely),
resume on an empty local folder, continue_from a remote experiment (folder and file URLs), the
store going down mid-run and coming back (or not), kill -9 during uploads then a resume on an
empty folder, a damaged remote checkpoint skipped for the next older, credentials kept out of
every file. Each experiment uses its own prefix of the one bucket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing as tp
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import damage_a_tensor, free_port

from solver import edit
from solver.checkpointing import envelope, fetch, manager, naming, objectstore, policy, recovery, remote
from solver.checkpointing.config import CheckpointConfig
from solver.checkpointing.manager import CheckpointManager
from solver.experiment import Experiment

BUCKET = 'solver-tests'
SECRET = 'sEcReT-never-logged-7f3a'
REGRESSION = ('solver=regression', 'checkpoint.save_every=1')
# Epochs of ~1.5 s (256 steps): runs long enough to act on while they train.
SLOW = (*REGRESSION, 'dataset.train_size=8192', 'logging.log_updates=64')
# ~34 MB of state, one update per epoch: uploads of about a second against moto, to be killed in.
BIG = ('solver=regression', 'model.hidden_size=2048', 'dataset.dim=1024', 'optim.updates_per_epoch=1',
       'dataset.eval_size=32', 'optim.epochs=8')



class MotoServer:
    """moto's S3 server as a real process on 127.0.0.1:<port>, to stop and start again (empty)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f'http://127.0.0.1:{self.port}'
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(('127.0.0.1', self.port)) == 0:
                    break
            assert self.proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.05)
        import boto3
        boto3.client('s3', endpoint_url=self.endpoint).create_bucket(Bucket=BUCKET)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope='session')
def s3() -> tp.Iterator[MotoServer]:
    """One moto server for the session; the AWS variables point every process (s3fs) at it."""
    server = MotoServer()
    saved = {k: os.environ.get(k) for k in ('AWS_ENDPOINT_URL', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY',
                                            'AWS_DEFAULT_REGION')}
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID='testing',
                      AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION='us-east-1')
    server.start()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def own_server(s3, monkeypatch) -> tp.Iterator[MotoServer]:
    """A moto server of this test's own (to stop and restart), the processes it starts pointed at it."""
    server = MotoServer()
    monkeypatch.setenv('AWS_ENDPOINT_URL', server.endpoint)
    monkeypatch.setenv(remote.BACKOFF_ENV, '1')
    server.start()
    yield server
    server.stop()


def s3fs_client() -> tp.Any:
    """A fresh s3fs filesystem (no instance cache: the endpoint may have changed)."""
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True)


def remote_names(prefix: str) -> list[str]:
    """Every key under s3://BUCKET/<prefix>, relative to it."""
    fs = s3fs_client()
    return sorted(key[len(f'{BUCKET}/{prefix}/'):] for key in fs.find(f'{BUCKET}/{prefix}'))


def history(folder: Path) -> list[dict]:
    return json.loads((folder / 'history.json').read_text())


def without_durations(entries: list[dict]) -> list[dict]:
    return [{stage: {k: v for k, v in metrics.items() if k != 'duration'} for stage, metrics in entry.items()}
            for entry in entries]


def run_xp(dora_tools: tp.Any, dora_dir: Path, *overrides: str) -> SimpleNamespace:
    code, output = dora_tools.run(dora_dir, 'run', *overrides)
    assert code == 0, output
    return SimpleNamespace(dora_dir=dora_dir, folder=dora_tools.folder(dora_dir, *overrides), output=output)


def uploaded_order(output: str) -> list[str]:
    """The keys the mirror made final, in order (its debug lines, `logging.level=DEBUG`)."""
    return [line.split('Uploaded ', 1)[1].split('/', 5)[-1].strip() for line in output.splitlines()
            if 'Uploaded s3://' in line]


# -- the mirror and the fetch in this process (the server is a process: integration) -------------------

def write(folder: Path, name: str, epoch: int) -> Path:
    import torch
    path = folder / name
    envelope.write_checkpoint(path, {'model': {'w': torch.full((64,), float(epoch))}}, {'epoch': epoch})
    return path


def test_urls_with_credentials_are_refused_and_logs_show_urls_without_them():
    assert objectstore.redact('s3://key:secret@bucket/runs?token=x') == 's3://bucket/runs'
    with pytest.raises(objectstore.RemoteError, match='environment variables'):
        objectstore.check_url('s3://key:secret@bucket/runs')
    with pytest.raises(objectstore.RemoteError, match='not a URL'):
        objectstore.check_url('/local/path')
    assert naming.is_url('s3://b/x') and naming.is_url('gs://b') and not naming.is_url('//sig/abc')


@pytest.mark.integration
def keep_last(n: int) -> policy.Retention:
    return policy.retention_from_config(CheckpointConfig(save_every=1, keep_last=n))


def test_mirror_uploads_each_save_commit_point_last_and_applies_keep_last(s3, tmp_path):
    folder = tmp_path / 'xp'
    folder.mkdir()
    url = f's3://{BUCKET}/unit-mirror'
    mirror = remote.RemoteMirror(url, folder, keep_last(2), max_backoff=1)
    for epoch in (1, 2, 3):
        saved = [write(folder, f'checkpoint_{epoch}.th', epoch), write(folder, naming.LATEST, epoch)]
        manager.prune(folder, keep_last(2))
        mirror.notify(saved)
        assert mirror.flush(30)  # this save mirrored on its own (coalescing is tested below)
    assert mirror.close() == []
    # Per save, the epoch file before checkpoint.th, which names the newest checkpoint.
    assert mirror.uploaded[:2] == ['checkpoint_1.th', 'checkpoint.th']
    assert mirror.uploaded[-1] == 'checkpoint.th'
    assert remote_names('unit-mirror') == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_3.th']
    fs = s3fs_client()
    for name in remote_names('unit-mirror'):
        assert fs.cat_file(f'{BUCKET}/unit-mirror/{name}') == (folder / name).read_bytes()


@pytest.mark.integration
@pytest.mark.parametrize('when', ['during the upload', 'right after the upload'])
def test_a_file_pruned_locally_while_it_uploads_leaves_no_temporary_key(s3, tmp_path, monkeypatch, when: str):
    # The race behind a flaky run: keep_last prunes checkpoint_1.th locally while the mirror
    # uploads it. The upload is superseded, its temporary key removed, and nothing fails.
    folder = tmp_path / 'xp'
    folder.mkdir()
    mirror = remote.RemoteMirror(f's3://{BUCKET}/unit-pruned-{when[0]}', folder, keep_last(1), max_backoff=1)
    put_file = mirror.fs.put_file

    def pruning_put_file(local: str, key: str, **kwargs: tp.Any) -> None:
        if Path(local).name == 'checkpoint_1.th':
            if when == 'during the upload':
                with open(local, 'rb') as opened:
                    Path(local).unlink()
                    mirror.fs.pipe_file(key, opened.read()[:100])  # a partial object, then the error
                raise FileNotFoundError(local)
            put_file(local, key, **kwargs)
            Path(local).unlink()
            return
        put_file(local, key, **kwargs)
    monkeypatch.setattr(mirror.fs, 'put_file', pruning_put_file)
    mirror.notify([write(folder, 'checkpoint_1.th', 1)])
    assert mirror.flush(30)
    mirror.notify([write(folder, 'checkpoint_2.th', 2), write(folder, naming.LATEST, 2)])
    assert mirror.flush(30)
    assert mirror.close() == [] and mirror.failures == 0
    assert remote_names(f'unit-pruned-{when[0]}') == ['checkpoint.th', 'checkpoint_2.th']


WAVY = [5.0, 1.0, 4.0, 2.0, 6.0, 0.5, 7.0, 8.0, 3.0]  # the metric of each epoch: best two 6 and 2
MIXED = dict(save_every=1, keep_last=1, keep_best=2, keep_every=4, async_save=False)  # latest + best + every-N


def run_epochs(m: CheckpointManager, epochs: range) -> None:
    """What the solver does at epoch ends: plan and save, the metric of each epoch in the history."""
    import torch
    for epoch in epochs:
        ctx = m.context(step=epoch, epoch=epoch, epoch_end=True, scores=WAVY[:epoch])
        m.save({'model': {'w': torch.full((64,), float(epoch))}}, m.plan(ctx), {'epoch': epoch, 'step': epoch})


@pytest.mark.integration
def test_local_and_remote_keep_the_same_files_under_latest_best_and_every_n(s3, tmp_path):
    url = f's3://{BUCKET}/unit-same'
    (tmp_path / 'same').mkdir()
    m = CheckpointManager(tmp_path / 'same', CheckpointConfig(**MIXED, remote=url), 'same01')
    run_epochs(m, range(1, len(WAVY) + 1))
    m.close()
    local = sorted(p.name for p in naming.candidates(tmp_path / 'same'))
    assert local == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_4.th', 'checkpoint_6.th', 'checkpoint_8.th',
                     'checkpoint_9.th']
    assert remote_names('unit-same/same01') == local


@pytest.mark.integration
def test_keep_best_and_keep_every_files_survive_remotely_after_a_move_to_a_fresh_machine(s3, tmp_path):
    # Issue 22, finding 13: the mirror pruned by keep_last alone, deleting from object storage the
    # best and keep_every files. Here machine 2 has no local copy of them at all.
    url = f's3://{BUCKET}/unit-fresh'
    (tmp_path / 'machine1').mkdir()
    first = CheckpointManager(tmp_path / 'machine1', CheckpointConfig(**MIXED, remote=url), 'fresh01')
    run_epochs(first, range(1, 7))
    first.close()
    assert remote_names('unit-fresh/fresh01') == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_4.th',
                                                  'checkpoint_6.th']
    (tmp_path / 'machine2').mkdir()
    second = CheckpointManager(tmp_path / 'machine2', CheckpointConfig(**MIXED, remote=url), 'fresh01')
    assert second.restore().meta['epoch'] == 6  # the remote copy, fetched
    run_epochs(second, range(7, len(WAVY) + 1))
    second.close()
    # machine 2 keeps checkpoint_7.th (the second best of the files it has); the store, which
    # holds better ones, does not: uploaded at most once (at epoch 7, as the newest), never again
    assert (tmp_path / 'machine2' / 'checkpoint_7.th').exists() and second.remote is not None
    assert second.remote.uploaded.count('checkpoint_7.th') <= 1  # 0 if saves coalesced
    assert remote_names('unit-fresh/fresh01') == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_4.th',
                                                  'checkpoint_6.th', 'checkpoint_8.th', 'checkpoint_9.th']


@pytest.mark.integration
def test_saves_while_an_upload_is_in_flight_coalesce_into_the_newest(s3, tmp_path):
    folder = tmp_path / 'xp'
    folder.mkdir()
    mirror = remote.RemoteMirror(f's3://{BUCKET}/unit-coalesce', folder, max_backoff=1)
    for epoch in range(1, 6):
        mirror.notify([write(folder, naming.LATEST, epoch)])
    assert mirror.close() == []
    assert len(mirror.uploaded) < 5  # not one upload per save: the newest file is what matters
    fetched = fetch.download_newest_intact(f's3://{BUCKET}/unit-coalesce', tmp_path / 'fresh')
    assert fetched is not None and fetched.meta['epoch'] == 5


@pytest.mark.integration
def test_damaged_remote_checkpoint_is_skipped_for_the_next_older(s3, tmp_path, caplog):
    folder = tmp_path / 'xp'
    folder.mkdir()
    url = f's3://{BUCKET}/unit-damaged'
    mirror = remote.RemoteMirror(url, folder, max_backoff=1)
    mirror.notify([write(folder, 'checkpoint_1.th', 1), write(folder, 'checkpoint_2.th', 2),
                   write(folder, naming.LATEST, 2)])
    assert mirror.close() == []
    fs = s3fs_client()
    good = fs.cat_file(f'{BUCKET}/unit-damaged/checkpoint.th')
    fs.pipe_file(f'{BUCKET}/unit-damaged/checkpoint.th', good[:len(good) // 2])       # truncated
    damaged = tmp_path / 'damaged.th'
    damaged.write_bytes(fs.cat_file(f'{BUCKET}/unit-damaged/checkpoint_2.th'))
    damage_a_tensor(damaged)                                                           # a flipped byte
    fs.pipe_file(f'{BUCKET}/unit-damaged/checkpoint_2.th', damaged.read_bytes())
    target = tmp_path / 'fresh'
    target.mkdir()
    found = fetch.download_newest_intact(url, target)
    assert found is not None and found.meta['epoch'] == 1 and found.path == target / 'checkpoint_1.th'
    assert sorted(p.name for p in target.iterdir()) == ['checkpoint_1.th']  # nothing damaged lands
    assert caplog.text.count('Skipping damaged remote checkpoint') == 2


@pytest.mark.integration
def test_fetch_source_gives_a_local_file_or_folder_for_a_url(s3, tmp_path):
    folder = tmp_path / 'xp'
    folder.mkdir()
    url = f's3://{BUCKET}/unit-fetch'
    mirror = remote.RemoteMirror(url, folder, max_backoff=1)
    mirror.notify([write(folder, 'checkpoint_1.th', 1), write(folder, naming.LATEST, 1)])
    assert mirror.close() == []
    path = fetch.fetch_source(f'{url}/checkpoint_1.th', tmp_path / 'cache1')
    assert path == tmp_path / 'cache1' / 'checkpoint_1.th' and envelope.read_checkpoint(path).meta['epoch'] == 1
    path = fetch.fetch_source(url, tmp_path / 'cache2')
    assert path == tmp_path / 'cache2' and recovery.load_source(path).path.name == naming.LATEST
    with pytest.raises(objectstore.RemoteError, match='neither a checkpoint file'):
        fetch.fetch_source(f's3://{BUCKET}/nothing-here', tmp_path / 'cache3')


@pytest.mark.integration
def test_mirror_thread_runs_at_low_priority(s3, tmp_path):
    """Like the writer's thread: uploads mostly run when a core is idle (`background_priority`)."""
    mirror = remote.RemoteMirror(f's3://{BUCKET}/unit-nice', tmp_path, max_backoff=1)
    mirror.notify([write(tmp_path, naming.LATEST, 1)])
    assert mirror._thread.native_id is not None
    assert os.getpriority(os.PRIO_PROCESS, mirror._thread.native_id) == 19  # Linux: per thread
    assert mirror.close() == []


# -- real `dora run` processes ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def mirrored(s3, dora_tools, tmp_path_factory) -> SimpleNamespace:
    """A finished 3-epoch run mirrored to s3://BUCKET/mirrored (keep_last=2), with debug logs."""
    xp = run_xp(dora_tools, tmp_path_factory.mktemp('mirrored'), *REGRESSION, 'checkpoint.keep_last=2',
                f'checkpoint.remote=s3://{BUCKET}/mirrored', 'logging.level=DEBUG')
    xp.prefix = f'mirrored/{xp.folder.name}'
    return xp


@pytest.mark.integration
def test_run_mirrors_every_save_to_url_sig_with_the_keep_policy(mirrored):
    local = sorted(p.name for p in naming.candidates(mirrored.folder))
    assert local == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_3.th']
    assert remote_names(mirrored.prefix) == local  # checkpoint_1.th pruned remotely too; no stray keys
    fs = s3fs_client()
    for name in local:  # the last save of each is the mirrored one
        assert fs.cat_file(f'{BUCKET}/{mirrored.prefix}/{name}') == (mirrored.folder / name).read_bytes()
    # Saves made during an upload coalesce (checkpoint_1.th may be pruned before its turn came);
    # each round uploads checkpoint.th last.
    order = uploaded_order(mirrored.output)
    assert order[-1] == 'checkpoint.th' and order.index('checkpoint_3.th') < len(order) - 1
    assert {'checkpoint.th', 'checkpoint_2.th', 'checkpoint_3.th'} <= set(order) <= {*local, 'checkpoint_1.th'}
    assert 'up to date' in mirrored.output and 'NOT mirrored' not in mirrored.output


@pytest.mark.integration
def test_the_mirror_url_is_not_part_of_the_signature(mirrored, dora_tools):
    assert dora_tools.folder(mirrored.dora_dir, *REGRESSION, 'checkpoint.keep_last=2').name == mirrored.folder.name


@pytest.mark.integration
def test_credentials_appear_in_no_log_checkpoint_or_history(mirrored):
    assert SECRET not in mirrored.output
    for path in mirrored.folder.rglob('*'):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.integration
def test_continue_from_a_remote_experiment_folder_or_file_works_like_the_local_form(mirrored, dora_tools,
                                                                                    tmp_path):
    url = f's3://{BUCKET}/{mirrored.prefix}'
    local = run_xp(dora_tools, tmp_path / 'local', *REGRESSION, f'continue_from={mirrored.folder}')
    from_folder = run_xp(dora_tools, tmp_path / 'folder', *REGRESSION, f'continue_from={url}')
    from_file = run_xp(dora_tools, tmp_path / 'file', *REGRESSION, f'continue_from={url}/checkpoint.th')
    assert f'Downloaded {url}/checkpoint.th (epoch 3)' in from_folder.output
    for xp in (from_folder, from_file):
        assert 'Continuing from the best state of' in xp.output
        assert without_durations(history(xp.folder)) == without_durations(history(local.folder))
        assert not list(xp.folder.glob('.continue_from.*'))  # the downloaded copy is gone


@pytest.mark.integration
def test_fresh_machine_resumes_from_the_remote_copy_without_retraining(s3, dora_tools, tmp_path):
    overrides = (*SLOW, f'checkpoint.remote=s3://{BUCKET}/fresh')
    with dora_tools.start(tmp_path / 'machine1', *overrides) as run:
        run.wait_for_line('Mirrored checkpoint.th')  # epoch 1 is remote
        run.kill()                                   # the machine is gone, its disk with it
    code, output = dora_tools.run(tmp_path / 'machine2', 'run', *overrides)
    assert code == 0, output
    assert 'Fetched s3://' in output and 'from object storage' in output
    assert '[replay] epoch 1' in output and 'Train | epoch 1 |' not in output
    reference = run_xp(dora_tools, tmp_path / 'reference', *SLOW)  # never interrupted, no mirror
    folder = dora_tools.folder(tmp_path / 'machine2', *overrides)
    assert folder.name == reference.folder.name
    assert without_durations(history(folder)) == without_durations(history(reference.folder))


@pytest.mark.integration
def test_unreachable_store_with_nothing_local_refuses_to_start_over(dora_tools, tmp_path, monkeypatch):
    monkeypatch.setenv('AWS_ENDPOINT_URL', f'http://127.0.0.1:{free_port()}')  # nothing listens
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')  # our retries only: botocore's would add half a minute
    code, output = dora_tools.run(tmp_path / 'dora', 'run', *REGRESSION, f'checkpoint.remote=s3://{BUCKET}/down')
    assert code == 1, output
    assert f'Listing s3://{BUCKET}/down/' in output and 'set checkpoint.remote=null' in output
    assert 'Traceback' not in output


@pytest.mark.integration
@pytest.mark.slow
def test_store_down_mid_run_and_back_leaves_training_unaffected(own_server, dora_tools, tmp_path):
    overrides = (*SLOW, f'checkpoint.remote=s3://{BUCKET}/outage')
    with dora_tools.start(tmp_path / 'dora', *overrides) as run:
        run.wait_for_line('(epoch 1, step')  # epoch 1 saved: two saves still to come
        own_server.stop()
        run.wait_for_line('retrying in')
        own_server.start()  # back on the same port, empty: everything is uploaded again
        code, output = run.finish()
    assert code == 0, output
    assert 'failed attempts retried' in output and 'NOT mirrored' not in output
    reference = run_xp(dora_tools, tmp_path / 'reference', *SLOW)
    assert without_durations(history(run.folder)) == without_durations(history(reference.folder))
    s3fs_client().get_file(f'{BUCKET}/outage/{run.folder.name}/checkpoint.th', str(tmp_path / 'mirrored.th'))
    assert envelope.read_checkpoint(tmp_path / 'mirrored.th').meta['epoch'] == 3  # the last save


@pytest.mark.integration
def test_store_that_never_comes_back_is_summed_up_and_the_run_succeeds(own_server, dora_tools, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv(remote.CLOSE_TIMEOUT_ENV, '2')
    with dora_tools.start(tmp_path / 'dora', *SLOW, f'checkpoint.remote=s3://{BUCKET}/gone') as run:
        run.wait_for_line('(epoch 1, step')  # epoch 1 saved: two saves still to come
        own_server.stop()
        code, output = run.finish()
    assert code == 0, output
    summary = next((line for line in output.splitlines() if 'NOT mirrored' in line), output)
    assert 'NOT mirrored' in summary and 'checkpoint.th' in summary and 'local copies are intact' in summary
    assert envelope.read_checkpoint(run.folder / 'checkpoint.th').meta['epoch'] == 3


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_during_uploads_then_resume_on_an_empty_folder(s3, dora_tools, tmp_path):
    overrides = (*BIG, f'checkpoint.remote=s3://{BUCKET}/killed', 'logging.level=DEBUG')
    with dora_tools.start(tmp_path / 'machine1', *overrides) as run:
        run.wait_for_line('Mirrored checkpoint.th')
        run.wait_for(lambda: run.output().count('Mirroring checkpoint.th') >= 2, 'a second upload')
        run.send(signal.SIGKILL)  # in the middle of that upload
        run.kill()
        killed_output = run.output()
    assert killed_output.count('Mirrored checkpoint.th') == 1, killed_output  # the kill cut an upload
    prefix = f'killed/{run.folder.name}'
    left = remote_names(prefix)
    assert 'checkpoint.th' in left
    # Whatever the kill left, the final key resolves to a complete, verified checkpoint.
    fetched = fetch.download_newest_intact(f's3://{BUCKET}/{prefix}', tmp_path / 'check')
    assert fetched is not None and fetched.meta['epoch'] >= 1
    assert f'(epoch {fetched.meta["epoch"]}' in killed_output  # a save the first machine made durable
    code, output = dora_tools.run(tmp_path / 'machine2', 'run', *overrides, timeout=300)
    assert code == 0, output
    assert f'Fetched s3://{BUCKET}/{prefix}/checkpoint.th (epoch {fetched.meta["epoch"]}' in output
    assert 'Train | epoch 1 |' not in output
    assert not [name for name in remote_names(prefix) if '.tmp.' in name]  # stray keys cleaned


@pytest.mark.integration
@pytest.mark.slow
def test_sharded_checkpoint_uploads_its_shards_before_the_file_that_names_them(s3, dora_tools, tmp_path):
    overrides = ('solver=regression', 'fsdp.use=true', f'checkpoint.remote=s3://{BUCKET}/sharded',
                 'logging.level=DEBUG')
    code, output = dora_tools.run(tmp_path / 'dora', 'run', '-d', '--ddp_workers', '2', *overrides, timeout=300)
    assert code == 0, output
    folder = dora_tools.folder(tmp_path / 'dora', *overrides)
    shards = objectstore.named_shard_folder(folder / naming.LATEST)
    assert shards is not None
    files = sorted(f'{shards}/{p.name}' for p in (folder / shards).iterdir())
    order = uploaded_order(output)
    commit = len(order) - 1 - order[::-1].index(naming.LATEST)
    assert set(files) <= set(order[:commit])  # every shard of the newest commit before it
    assert remote_names(f'sharded/{folder.name}') == sorted([naming.LATEST, *files])  # superseded: gone
    fetched = fetch.download_newest_intact(f's3://{BUCKET}/sharded/{folder.name}', tmp_path / 'fresh')
    assert fetched is not None and fetched.meta['epoch'] == 3  # shards downloaded and verified


# -- rollback ----------------------------------------------------------------------------------------

@pytest.mark.integration
def test_after_a_rollback_the_next_sync_leaves_the_remote_holding_the_files_local_holds(s3, tmp_path):
    url = f's3://{BUCKET}/unit-rollback'
    folder = tmp_path / 'rollb01'
    folder.mkdir()
    config = CheckpointConfig(save_every=1, async_save=False, remote=url)
    first = CheckpointManager(folder, config, 'rollb01')
    run_epochs(first, range(1, 5))
    first.close()
    assert remote_names('unit-rollback/rollb01') == ['checkpoint.th', *(f'checkpoint_{e}.th' for e in range(1, 5))]
    (folder / 'history.json').write_text(json.dumps([{'valid': {'loss': score}} for score in WAVY[:4]]))
    (folder / '.hydra').mkdir()
    (folder / '.hydra' / 'config.yaml').write_text(f'checkpoint:\n  remote: {url}\n')
    edit.rollback(Experiment(folder), 'epoch:2')  # epochs 3 and 4 abandoned
    second = CheckpointManager(folder, config, 'rollb01')  # the next run: one epoch of the new branch
    assert second.restore().meta['epoch'] == 2
    run_epochs(second, range(3, 4))
    second.close()
    local = sorted(path.name for path in naming.candidates(folder))
    assert local == ['checkpoint.th', 'checkpoint_1.th', 'checkpoint_2.th', 'checkpoint_3.th']
    assert remote_names('unit-rollback/rollb01') == local  # not checkpoint_4.th of the abandoned branch
    assert not (folder / remote.ABANDONED).exists()


def test_a_record_of_abandoned_checkpoints_that_is_not_ours_is_refused_naming_it(tmp_path):
    remote.record_abandoned(tmp_path, ['checkpoint_4.th'])
    remote.record_abandoned(tmp_path, [naming.LATEST])
    assert remote.read_abandoned(tmp_path) == {'checkpoint_4.th', naming.LATEST}
    (tmp_path / remote.ABANDONED).write_text(json.dumps(['../../etc/passwd']))
    with pytest.raises(objectstore.RemoteError, match=remote.ABANDONED):
        remote.read_abandoned(tmp_path)
