"""The pieces of solver state: best state, EMA, RNG, the resumable sampler, drop_keys, the lock."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from solver.best_state import BestState, drop_keys
from solver.checkpointing import envelope
from solver.checkpointing.lock import ExperimentLock, ExperimentLockedError
from solver.ema import ModuleDictEMA
from solver.rng import RNGState
from solver.sampler import ResumableBatchSampler

# -- BestState ---------------------------------------------------------------------------------


@pytest.mark.parametrize('lower, better, worse', [(True, 0.5, 2.0), (False, 2.0, 0.5)],
                         ids=['lower is better', 'higher is better'])
def test_best_state_is_better_follows_the_direction(lower: bool, better: float, worse: float):
    best = BestState(lower_is_better=lower)
    assert best.is_better(1.0)  # anything beats no metric yet
    best.update(1.0)
    assert best.is_better(better)
    assert not best.is_better(worse)
    assert not best.is_better(1.0)  # a tie keeps the older state


def test_best_state_update_keeps_a_copy_that_later_training_does_not_touch():
    model = nn.Linear(2, 1)
    best = BestState()
    best.register('model', model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    best.update(0.5)
    with torch.no_grad():
        model.weight.fill_(7.0)
    assert torch.equal(best.states['model']['weight'], torch.ones(1, 2))
    assert best.metric == 0.5


def test_best_state_round_trips_through_its_state_dict():
    model = nn.Linear(2, 1)
    best = BestState()
    best.register('model', model)
    best.update(0.25)
    other = BestState()
    other.register('model', nn.Linear(2, 1))
    other.load_state_dict(best.state_dict())
    assert other.metric == 0.25
    assert torch.equal(other.states['model']['weight'], model.weight.detach())


# -- EMA ---------------------------------------------------------------------------------------

def one_parameter(value: float) -> nn.Module:
    module = nn.Module()
    module.w = nn.Parameter(torch.tensor([value]))
    return module


def test_ema_step_moves_the_average_by_one_minus_decay():
    module = one_parameter(0.0)
    ema = ModuleDictEMA({'m': module}, decay=0.9)
    with torch.no_grad():
        module.w.fill_(10.0)
    ema.step()
    assert ema.state['m']['w'].item() == pytest.approx(1.0)  # 0.9 * 0 + 0.1 * 10
    ema.step()
    assert ema.state['m']['w'].item() == pytest.approx(1.9)  # 0.9 * 1 + 0.1 * 10
    assert module.w.item() == 10.0  # the live weights are untouched


def test_ema_updates_only_every_n_steps():
    module = one_parameter(0.0)
    ema = ModuleDictEMA({'m': module}, decay=0.5, updates=3)
    with torch.no_grad():
        module.w.fill_(8.0)
    seen = []
    for _ in range(6):
        ema.step()
        seen.append(ema.state['m']['w'].item())
    assert seen == [0.0, 0.0, 4.0, 4.0, 4.0, 6.0]


def test_ema_copies_non_float_buffers():
    module = nn.BatchNorm1d(2)
    ema = ModuleDictEMA({'bn': module}, decay=0.9)
    module.num_batches_tracked.fill_(5)
    ema.step()
    assert ema.state['bn']['num_batches_tracked'].item() == 5


@pytest.mark.parametrize('decay, updates', [(1.0, 1), (-0.1, 1), (0.9, 0)])
def test_ema_rejects_impossible_settings_naming_the_key(decay: float, updates: int):
    with pytest.raises(ValueError, match='optim.ema'):
        ModuleDictEMA({'m': one_parameter(0.0)}, decay=decay, updates=updates)


# -- RNG ---------------------------------------------------------------------------------------

def reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), float(np.random.randn())


def test_rng_state_restores_python_numpy_and_torch_draws():
    reseed(1)
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    state = RNGState().state_dict()
    first = draws()
    RNGState().load_state_dict(state)
    assert draws() == first


def test_rng_state_survives_a_checkpoint_file(tmp_path: Path):
    state = RNGState().state_dict()
    first = draws()
    envelope.write_checkpoint(tmp_path / 'rng.th', {'rng': state}, {})
    reseed(99)
    RNGState().load_state_dict(envelope.read_checkpoint(tmp_path / 'rng.th').state['rng'])
    assert draws() == first


# -- ResumableBatchSampler ----------------------------------------------------------------------

def take(sampler: ResumableBatchSampler, count: int) -> list[list[int]]:
    stream = iter(sampler)
    return [next(stream) for _ in range(count)]


def test_sampler_is_a_function_of_the_seed():
    assert take(ResumableBatchSampler(40, 8, seed=3), 10) == take(ResumableBatchSampler(40, 8, seed=3), 10)
    assert take(ResumableBatchSampler(40, 8, seed=3), 10) != take(ResumableBatchSampler(40, 8, seed=4), 10)


def test_sampler_draws_a_new_permutation_for_each_pass():
    sampler = ResumableBatchSampler(40, 8, seed=0)
    batches = take(sampler, 3 * len(sampler))
    passes = [sum(batches[i:i + 5], []) for i in range(0, 15, 5)]
    for items in passes:
        assert sorted(items) == list(range(40))  # each pass sees every item once
    assert passes[0] != passes[1] and passes[1] != passes[2]


def test_sampler_drops_the_incomplete_last_batch():
    sampler = ResumableBatchSampler(42, 8, seed=0)
    assert len(sampler) == 5
    assert all(len(batch) == 8 for batch in take(sampler, 12))


@pytest.mark.parametrize('position', [0, 1, 4, 5, 13])
def test_sampler_resumed_at_k_continues_the_uninterrupted_stream(position: int):
    uninterrupted = take(ResumableBatchSampler(40, 8, seed=5), 20)
    resumed = ResumableBatchSampler(40, 8, seed=5)
    resumed.position = position
    assert take(resumed, 20 - position) == uninterrupted[position:]


@pytest.mark.parametrize('size', [48, 5])  # 5: a set smaller than a batch, drawn across passes
def test_sampler_ranks_partition_each_global_batch(size: int):
    single = take(ResumableBatchSampler(size, 12, seed=2), 8)
    ranks = [take(ResumableBatchSampler(size, 12, seed=2, rank=r, world_size=3), 8) for r in range(3)]
    for step, global_batch in enumerate(single):
        shares = [ranks[r][step] for r in range(3)]
        assert all(len(share) == 4 for share in shares)
        assert sorted(sum(shares, [])) == sorted(global_batch)


def test_sampler_refuses_a_batch_not_divisible_by_the_world_size():
    with pytest.raises(ValueError, match='dataset.batch_size'):
        ResumableBatchSampler(48, 10, world_size=4)


def test_sampler_stream_is_the_documented_permutations_cut_into_batches():
    # The stream of datasets of at least one batch is pinned: runs made before the small-set
    # change resume onto the same batches.
    sampler = ResumableBatchSampler(42, 8, seed=5)
    for epoch in range(3):
        permutation = torch.randperm(42, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch))
        expected = [permutation[i * 8:(i + 1) * 8].tolist() for i in range(5)]
        assert take_from(sampler, epoch * 5, 5) == expected


def take_from(sampler: ResumableBatchSampler, position: int, count: int) -> list[list[int]]:
    sampler.position = position
    return take(sampler, count)


def test_sampler_on_a_set_smaller_than_a_batch_draws_full_batches_across_passes():
    sampler = ResumableBatchSampler(5, 8, seed=1)
    assert len(sampler) == 1
    batches = take(sampler, 5)  # 40 items: exactly 8 passes over the 5
    assert all(len(batch) == 8 for batch in batches)
    items = sum(batches, [])
    passes = [items[i:i + 5] for i in range(0, 40, 5)]
    assert all(sorted(p) == list(range(5)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # each pass is a new permutation


@pytest.mark.parametrize('position', [0, 1, 3, 7])
def test_sampler_on_a_small_set_resumes_on_the_same_batches(position: int):
    uninterrupted = take(ResumableBatchSampler(3, 8, seed=9), 10)
    assert take_from(ResumableBatchSampler(3, 8, seed=9), position, 10 - position) == uninterrupted[position:]


def test_sampler_on_a_one_item_set_repeats_it():
    assert take(ResumableBatchSampler(1, 4), 2) == [[0, 0, 0, 0], [0, 0, 0, 0]]


def test_sampler_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match='training set has 0 items'):
        ResumableBatchSampler(0, 8)


# -- drop_keys (checkpoint.ignore_state_keys) -----------------------------------------------------

STATES = {'model': {'0.weight': 1, '0.bias': 2, '10.weight': 3, '2.weight': 4}, 'ema': {'x': 5}}


def test_drop_keys_with_a_state_name_drops_the_whole_state():
    assert drop_keys(STATES, ['ema']) == {'model': STATES['model']}


def test_drop_keys_with_a_dotted_key_drops_that_prefix_only():
    assert drop_keys(STATES, ['model.0']) == {'model': {'10.weight': 3, '2.weight': 4}, 'ema': {'x': 5}}


def test_drop_keys_with_an_exact_key_drops_that_key():
    assert drop_keys(STATES, ['model.2.weight'])['model'] == {'0.weight': 1, '0.bias': 2, '10.weight': 3}


def test_drop_keys_does_not_change_its_input():
    drop_keys(STATES, ['model.0', 'ema'])
    assert STATES['model']['0.weight'] == 1 and 'ema' in STATES


# -- ExperimentLock -----------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from solver.checkpointing.lock import ExperimentLock
ExperimentLock(sys.argv[1]).__enter__()
print('locked', flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """A second process that holds the lock of `tmp_path` until it is killed."""
    proc = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == 'locked'
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration
def test_lock_held_by_another_process_is_refused_naming_its_pid(tmp_path: Path, holder):
    with pytest.raises(ExperimentLockedError, match=f'pid {holder.pid}') as err:
        ExperimentLock(tmp_path).__enter__()
    assert str(tmp_path) in str(err.value)


@pytest.mark.integration
def test_lock_of_a_process_killed_with_sigkill_can_be_taken(tmp_path: Path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with ExperimentLock(tmp_path) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_lock_is_released_on_exit(tmp_path: Path):
    with ExperimentLock(tmp_path):
        pass
    with ExperimentLock(tmp_path):
        pass
