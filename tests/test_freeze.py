"""`optim.freeze=[prefix, ...]`: frozen parameters get no gradient and stay out of the optimizer,
for any task (the framework applies it in `StandardSolver.distribute`); an unknown prefix is a
clear error."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from solver import builders
from solver.checkpointing import envelope


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1)))


def test_parameters_under_a_dotted_prefix_are_frozen_and_left_out_of_the_optimizer(caplog):
    caplog.set_level('INFO', logger='solver.builders')
    module = model()
    matched = builders.freeze_parameters(module, ['0', '2.0.weight'])
    frozen = sorted(name for name, p in module.named_parameters() if not p.requires_grad)
    assert matched == {'0', '2.0.weight'} and frozen == ['0.bias', '0.weight', '2.0.weight']
    optimizer = builders.get_optimizer(module.parameters(), OmegaConf.create({'optimizer': 'adam', 'lr': 0.1}))
    assert sum(len(group['params']) for group in optimizer.param_groups) == 3
    assert "104 parameters frozen, 17 trainable" in caplog.text  # 40 + 64 frozen; 8 + 8 + 1 not


def test_a_prefix_matches_whole_names_only():
    assert builders.freeze_parameters(model(), ['2.0.w']) == set()


def test_an_unknown_prefix_is_an_error_naming_it():
    module = model()
    matched = builders.freeze_parameters(module, ['0', 'encoder'])
    with pytest.raises(builders.ConfigError, match=r"optim.freeze: \['encoder'\] match no parameter"):
        builders.check_freeze(['0', 'encoder'], matched, [name for name, _ in module.named_parameters()])


def test_freezing_everything_is_an_error_naming_the_key():
    module = model()
    builders.freeze_parameters(module, ['0', '2'])
    with pytest.raises(builders.ConfigError, match='optim.freeze'):
        builders.get_optimizer(module.parameters(), OmegaConf.create({'optimizer': 'sgd', 'lr': 0.1}))


@pytest.mark.integration
def test_a_run_with_frozen_layers_trains_only_the_others_and_logs_the_counts(dora, dora_tools, dora_dir):
    overrides = ('solver=regression', 'optim.freeze=[0]')  # the first Linear(8, 32)
    code, output = dora('run', *overrides)
    assert code == 0, output
    assert "optim.freeze=['0']: 288 parameters frozen, 33 trainable" in output
    state = envelope.read_checkpoint(dora_tools.folder(dora_dir, *overrides) / 'checkpoint.th').state
    assert len(state['optimizer']['state']) == 2  # Adam moments for 2.weight and 2.bias only
    torch.manual_seed(2036)  # the run's seed: the frozen layer is still its initial value
    assert torch.equal(state['model']['0.weight'], nn.Linear(8, 32).weight.detach())


@pytest.mark.integration
def test_a_run_with_an_unknown_freeze_prefix_stops_with_one_line_naming_it(dora):
    code, output = dora('run', 'solver=regression', 'optim.freeze=[encoder]')
    assert code == 1
    assert "optim.freeze: ['encoder'] match no parameter name" in output.strip().splitlines()[-1]
    assert 'Traceback' not in output
