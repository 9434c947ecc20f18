"""The learning-rate schedule (`schedule.*`): its shape, counted in training updates, and a run
that resumes mid-schedule ending exactly where the uninterrupted one did."""

from __future__ import annotations

import pytest
import torch
from helpers import REGRESSION, assert_same_run, back_to_epoch_1, copy_xp, history, run_dora, run_xp, without_durations
from omegaconf import OmegaConf

from solver import builders
from solver.checkpointing import envelope


def lrs(schedule: dict, total: int, lr: float = 1.0) -> list[float]:
    """The learning rate of each of `total` updates under `schedule`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = builders.get_lr_scheduler(optimizer, OmegaConf.create(schedule), total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    return rates


def test_no_scheduler_keeps_the_learning_rate():
    assert builders.get_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                     OmegaConf.create({'lr_scheduler': None}), 10) is None


def test_cosine_goes_from_the_learning_rate_to_zero_over_the_run():
    rates = lrs({'lr_scheduler': 'cosine'}, 100, lr=2.0)
    assert rates[0] == 2.0
    assert rates[50] == pytest.approx(1.0, abs=1e-6)  # half way: half the rate
    assert rates[99] == pytest.approx(2.0 * 0.5 * (1 + torch.cos(torch.tensor(0.99 * torch.pi)).item()))
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_cosine_warmup_rises_linearly_then_decays():
    rates = lrs({'lr_scheduler': 'cosine', 'warmup': 4}, 20)
    assert rates[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert all(a > b for a, b in zip(rates[4:], rates[5:]))


def test_step_multiplies_by_gamma_every_step_size_updates():
    assert lrs({'lr_scheduler': 'step', 'step_size': 3, 'gamma': 0.5}, 7) == \
        pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])


# -- through real runs ------------------------------------------------------------------------------

# 3 epochs of 16 updates: a cosine over 48 updates after 4 of warmup.
COSINE = (*REGRESSION, 'schedule.lr_scheduler=cosine', 'schedule.warmup=4', 'checkpoint.save_every=1')


@pytest.fixture(scope='module')
def scheduled(dora_tools, tmp_path_factory):
    return run_xp(tmp_path_factory.mktemp('cosine') / 'dora', *COSINE)


@pytest.mark.integration
def test_a_run_steps_the_schedule_once_per_update_and_saves_it(scheduled):
    assert 'Learning rate: cosine from 0.01 over 48 updates, 4 of warmup.' in scheduled.output
    for epoch, steps in ((1, 16), (3, 48)):
        state = envelope.read_checkpoint(scheduled.folder / f'checkpoint_{epoch}.th').state
        assert state['lr_scheduler']['last_epoch'] == steps
        expected = 0.01 * 0.5 * (1 + torch.cos(torch.tensor((steps - 4) / 44 * torch.pi)).item())
        assert state['optimizer']['param_groups'][0]['lr'] == pytest.approx(expected, abs=1e-9)


@pytest.mark.integration
def test_the_schedule_changes_the_training(scheduled, tmp_path):
    constant = run_xp(tmp_path / 'dora', *REGRESSION, 'checkpoint.save_every=1')
    first = [entry['train']['loss'] for entry in history(scheduled.folder)]
    assert first != [entry['train']['loss'] for entry in history(constant.folder)]


@pytest.mark.integration
def test_a_run_resumed_mid_schedule_ends_as_the_uninterrupted_run(scheduled, tmp_path):
    xp = copy_xp(scheduled, tmp_path)
    back_to_epoch_1(xp.folder)
    code, output = run_dora(xp.dora_dir, 'run', *COSINE)
    assert code == 0, output
    assert f"Resumed from {xp.folder / 'checkpoint.th'} (epoch 1," in output
    assert without_durations(history(xp.folder)) == without_durations(history(scheduled.folder))
    assert_same_run(xp.folder, scheduled.folder)


@pytest.mark.integration
def test_a_solver_without_self_optimizer_is_refused_naming_the_key(tmp_path):
    code, output = run_dora(tmp_path / 'dora', 'run', *REGRESSION, 'solver_class=faulty_solver.NoOptimizerSolver',
                            'schedule.lr_scheduler=cosine')
    assert code == 1
    assert 'schedule.lr_scheduler=cosine' in output and 'self.optimizer' in output and 'Traceback' not in output
