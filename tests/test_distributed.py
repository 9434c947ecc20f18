"""Beyond one machine, on CPU with gloo and two real ranks: DDP through `dora run -d` and
torchrun, FSDP2 with sharded checkpoints (save, resume on 2 ranks and on 1, continue_from,
export, damage, kill -9 of a rank mid-save), and ranks that disagree after a load.

Runs that several tests only read are module-scoped; a test that changes an experiment works on
a copy. Every run uses the regression solver (3 epochs of 16 steps, a checkpoint per epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DORA, SOLVER, TORCHRUN, free_port
from torch import nn

from solver import distrib
from solver.checkpointing import dcp_reader, envelope, faults, recovery, sharded

TRAINED = ('solver=regression', 'checkpoint.save_every=1')
FSDP = (*TRAINED, 'fsdp.use=true')
TWO_RANKS = ('-d', '--ddp_workers', '2')
# ~34 MB of state, one update per epoch: saves long enough to be killed in.
BIG_FSDP = ('solver=regression', 'fsdp.use=true', 'model.hidden_size=2048', 'dataset.dim=1024',
            'optim.updates_per_epoch=1', 'dataset.eval_size=32', 'optim.epochs=20')


def history(folder: Path) -> list[dict]:
    return json.loads((folder / 'history.json').read_text())


def losses(folder: Path) -> list[float]:
    """Train and valid loss of each epoch, in one list."""
    return [entry[stage]['loss'] for entry in history(folder) for stage in ('train', 'valid')]


def run_xp(dora_tools: tp.Any, dora_dir: Path, *overrides: str, ranks: int = 1) -> SimpleNamespace:
    args = TWO_RANKS if ranks == 2 else ()
    code, output = dora_tools.run(dora_dir, 'run', *args, *overrides)
    assert code == 0, output
    return SimpleNamespace(dora_dir=dora_dir, folder=dora_tools.folder(dora_dir, *overrides), output=output)


def cut_back_to_epoch_1(source: SimpleNamespace, tmp_path: Path) -> SimpleNamespace:
    """A copy of a finished experiment whose newest checkpoint is `checkpoint_1.th`."""
    dora_dir = tmp_path / 'dora'
    shutil.copytree(source.dora_dir, dora_dir, symlinks=True)
    folder = dora_dir / 'xps' / source.folder.name
    for name in ('checkpoint.th', 'checkpoint_2.th', 'checkpoint_3.th'):
        (folder / name).unlink()
        sharded.remove_superseded(folder / name)  # its shard folder, if any
    return SimpleNamespace(dora_dir=dora_dir, folder=folder)


def plain_model(folder: Path) -> nn.Module:
    """The regression model of an experiment, loaded in this (single, undistributed) process."""
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    model.load_state_dict(envelope.read_checkpoint(folder / 'checkpoint.th').state['model'])
    return model


def assert_close_weights(folder: Path, other: Path) -> None:
    pairs = zip(plain_model(folder).state_dict().values(), plain_model(other).state_dict().values())
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs)


@pytest.fixture(scope='module')
def ddp(dora_tools, tmp_path_factory) -> SimpleNamespace:
    return run_xp(dora_tools, tmp_path_factory.mktemp('ddp'), *TRAINED, ranks=2)


@pytest.fixture(scope='module')
def fsdp(dora_tools, tmp_path_factory) -> SimpleNamespace:
    return run_xp(dora_tools, tmp_path_factory.mktemp('fsdp'), *FSDP, ranks=2)


# -- data ------------------------------------------------------------------------------------------

def test_eval_loaders_give_every_rank_the_same_number_of_batches_covering_the_split(monkeypatch):
    from omegaconf import OmegaConf

    from solver import builders, distrib
    cfg = OmegaConf.create({'dataset': {'batch_size': 4, 'num_workers': 0}})
    dataset = torch.utils.data.TensorDataset(torch.arange(11))
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distrib, 'rank', lambda rank=rank: rank)
        monkeypatch.setattr(distrib, 'world_size', lambda: 3)
        shares.append([int(x) for (batch,) in builders.get_eval_loader(dataset, cfg) for x in batch])
    assert [len(share) for share in shares] == [4, 4, 4]  # 11 items: one read twice
    assert sorted(set(sum(shares, []))) == list(range(11))


# -- DDP ------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_ddp_run_lives_in_the_folder_of_the_single_process_signature(ddp, dora_tools):
    assert ddp.folder == dora_tools.folder(ddp.dora_dir, *TRAINED)
    assert len(history(ddp.folder)) == 3 and (ddp.folder / 'worker_1.log').exists()
    assert 'Distributed: rank 0 of 2' in ddp.output


@pytest.mark.integration
def test_ddp_writes_one_consolidated_checkpoint_without_module_prefixes(ddp):
    assert not list(ddp.folder.glob('*.dcp.*'))
    state = envelope.read_checkpoint(ddp.folder / 'checkpoint.th').state
    assert set(state['model']) == {'0.weight', '0.bias', '2.weight', '2.bias'}
    assert set(state['best_state']['states']['model']) == set(state['model'])


@pytest.mark.integration
def test_ddp_training_matches_single_process_training_on_the_global_batch(ddp, dora_tools, tmp_path):
    single = run_xp(dora_tools, tmp_path / 'dora', *TRAINED)
    assert losses(ddp.folder) == pytest.approx(losses(single.folder), rel=1e-5)
    assert_close_weights(ddp.folder, single.folder)


@pytest.mark.integration
def test_ddp_resume_matches_the_uninterrupted_run(ddp, dora_tools, tmp_path):
    xp = cut_back_to_epoch_1(ddp, tmp_path)
    code, output = dora_tools.run(xp.dora_dir, 'run', *TWO_RANKS, *TRAINED)
    assert code == 0, output
    assert f"Resumed from {xp.folder / 'checkpoint_1.th'} (epoch 1," in output
    assert losses(xp.folder) == losses(ddp.folder)


@pytest.mark.integration
def test_torchrun_resume_matches_the_uninterrupted_run(ddp, dora_tools, tmp_path):
    xp = cut_back_to_epoch_1(ddp, tmp_path)
    command = [*TORCHRUN, '--standalone', '--nproc_per_node', '2',
               '-m', 'dora', 'run', *TRAINED]
    proc = subprocess.run(command, cwd=dora_tools.root, env=dora_tools.env(xp.dora_dir), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert 'Distributed: rank 1 of 2' in proc.stdout and 'Resumed from' in proc.stdout
    assert losses(xp.folder) == losses(ddp.folder)


# -- FSDP: sharded checkpoints ----------------------------------------------------------------------

@pytest.mark.integration
def test_fsdp_writes_each_checkpoint_as_a_file_and_one_shard_folder(fsdp):
    for name in ('checkpoint.th', 'checkpoint_1.th', 'checkpoint_3.th'):
        folders = list(fsdp.folder.glob(f'{name}.dcp.*'))
        assert len(folders) == 1, folders
        assert sorted(p.name for p in folders[0].iterdir()) == ['.metadata', '__0_0.distcp', '__1_0.distcp']
    assert not list(fsdp.folder.glob('.*.tmp.*'))
    payload = torch.load(fsdp.folder / 'checkpoint.th', weights_only=True)
    assert payload['state']['model']['0.weight'][sharded.MARK] == 'model.0.weight'
    assert set(payload['shards']['files']) == {'.metadata', '__0_0.distcp', '__1_0.distcp'}


@pytest.mark.integration
def test_fsdp_training_matches_ddp_training(fsdp, ddp):
    assert losses(fsdp.folder) == pytest.approx(losses(ddp.folder), rel=1e-6)


@pytest.mark.integration
def test_a_sharded_checkpoint_loads_whole_in_one_process(fsdp, ddp):
    ckpt = envelope.read_checkpoint(fsdp.folder / 'checkpoint.th')
    assert ckpt.state['optimizer']['state'][0]['exp_avg'].shape == (32, 8)
    assert_close_weights(fsdp.folder, ddp.folder)


@pytest.mark.integration
def test_fsdp_resume_on_two_ranks_matches_the_uninterrupted_run(fsdp, dora_tools, tmp_path):
    xp = cut_back_to_epoch_1(fsdp, tmp_path)
    code, output = dora_tools.run(xp.dora_dir, 'run', *TWO_RANKS, *FSDP)
    assert code == 0, output
    assert 'Resumed from' in output
    assert losses(xp.folder) == losses(fsdp.folder)


@pytest.mark.integration
def test_fsdp_resume_in_one_process_reshards_and_matches(fsdp, dora_tools, tmp_path):
    xp = cut_back_to_epoch_1(fsdp, tmp_path)
    code, output = dora_tools.run(xp.dora_dir, 'run', *FSDP)
    assert code == 0, output
    assert 'Resumed from' in output and 'Distributed' not in output
    assert losses(xp.folder) == pytest.approx(losses(fsdp.folder), rel=1e-5)
    assert not list(xp.folder.glob('checkpoint.th.dcp.*')), 'one process writes consolidated checkpoints'


@pytest.mark.integration
def test_continue_from_a_sharded_experiment_fine_tunes_in_one_process(fsdp, dora_tools):
    xp = run_xp(dora_tools, fsdp.dora_dir, 'solver=regression', f'continue_from=//sig/{fsdp.folder.name}',
                'optim.lr=0', 'optim.epochs=1')
    assert f"Continuing from the best state of {fsdp.folder / 'checkpoint.th'}" in xp.output
    source = envelope.read_checkpoint(fsdp.folder / 'checkpoint.th').state['best_state']['states']['model']
    model = envelope.read_checkpoint(xp.folder / 'checkpoint.th').state['model']
    assert all(torch.equal(model[key], source[key]) for key in source)


@pytest.mark.integration
def test_export_of_a_sharded_experiment_is_one_consolidated_file(fsdp, dora_tools, tmp_path):
    verified = subprocess.run([*SOLVER, 'verify', str(fsdp.folder)], cwd=dora_tools.root, capture_output=True,
                              text=True, timeout=60)  # the solver command reads shards in one process
    assert verified.returncode == 0 and f"{fsdp.folder / 'checkpoint.th'}: intact" in verified.stdout, verified
    target = tmp_path / 'exported.th'
    proc = subprocess.run([*SOLVER, 'export', str(fsdp.folder), str(target)],
                          cwd=dora_tools.root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    exported = torch.load(target, weights_only=True)
    assert 'shards' not in exported and set(exported['state']) == {'best_state'}
    best = envelope.read_checkpoint(fsdp.folder / 'checkpoint.th').state['best_state']['states']['model']
    assert all(torch.equal(exported['state']['best_state']['states']['model'][k], v) for k, v in best.items())


@pytest.mark.integration
def test_a_damaged_shard_file_is_named_and_the_previous_checkpoint_used(fsdp, tmp_path, caplog):
    folder = tmp_path / 'xp'
    shutil.copytree(fsdp.folder, folder)
    shard = next(folder.glob('checkpoint.th.dcp.*')) / '__1_0.distcp'
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(faults.CorruptCheckpointError, match='__1_0.distcp does not match its digest'):
        envelope.read_checkpoint(folder / 'checkpoint.th')
    assert recovery.load_newest_intact(folder).path == folder / 'checkpoint_3.th'


@pytest.mark.integration
def test_dcp_metadata_that_would_run_code_is_refused(fsdp, tmp_path):
    folder = tmp_path / 'shards'
    folder.mkdir()
    (folder / '.metadata').write_bytes(b'cos\nsystem\n(S"true"\ntR.')  # os.system('true')
    with pytest.raises(dcp_reader.ShardError, match='not allowed'):
        dcp_reader.check_metadata(folder / '.metadata')


# -- processes dying, ranks disagreeing ---------------------------------------------------------------

def children(pid: int) -> list[int]:
    found = []
    for task in Path(f'/proc/{pid}/task').iterdir():
        found += [int(c) for c in (task / 'children').read_text().split()]
    return found


def rank_of(pid: int) -> int | None:
    environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    ranks = [int(v.split(b'=')[1]) for v in environ if v.startswith(b'RANK=')]
    return ranks[0] if ranks else None


@pytest.mark.integration
def test_kill_of_one_rank_during_a_sharded_save_leaves_the_previous_checkpoint(dora_tools, tmp_path):
    dora_dir = tmp_path / 'dora'
    dora_dir.mkdir()
    overrides = (*BIG_FSDP, 'distributed.timeout_minutes=0.5')
    folder = dora_tools.folder(dora_dir, *overrides)
    log = tmp_path / 'run.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen([*DORA, 'run', *TWO_RANKS, *overrides], cwd=dora_tools.root,
                                env=dora_tools.env(dora_dir), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not ((folder / 'checkpoint.th').exists() and list(folder.glob('.checkpoint.th.dcp.tmp.*'))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.002)
        worker = next(pid for pid in children(proc.pid) if rank_of(pid) == 1)
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(timeout=90) != 0, 'the surviving rank must fail, not hang'
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    latest = envelope.read_checkpoint(folder / 'checkpoint.th')  # verified: every shard file
    assert latest.meta['epoch'] >= 1 and latest.state['model']['0.weight'].shape == (2048, 1024)
    recovery.clean_stray_files(folder)
    assert not list(folder.glob('.*.tmp.*'))
    assert len(list(folder.glob('checkpoint.th.dcp.*'))) == 1


def _disagree(rank: int, port: int) -> None:
    """One of two ranks that load different epochs (run by `torch.multiprocessing.spawn`)."""
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        distrib.check_agreement({'epoch': 3 + rank, 'step': 48})
    except distrib.RankMismatchError as err:
        print(f"rank {rank}: {err}", flush=True)
    else:
        raise AssertionError(f"rank {rank}: no RankMismatchError")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_ranks_that_disagree_on_the_epoch_after_a_load_stop_naming_them(dora_tools):
    # This file run as a script spawns the ranks (see the end): spawned processes import their
    # function by module, and `tests` is not an importable package name here.
    proc = subprocess.run([sys.executable, __file__, 'disagree'], capture_output=True, text=True, timeout=120,
                          env=dora_tools.env(Path('unused')))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert (f"rank {rank}: Ranks [1] disagree with rank 0 after loading the checkpoint "
                "(rank 0: epoch=3, step=48; rank 1: epoch=4, step=48)") in proc.stdout


if __name__ == '__main__' and sys.argv[1:] == ['disagree']:
    mp.spawn(_disagree, args=(free_port(),), nprocs=2)
