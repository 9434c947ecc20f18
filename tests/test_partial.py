"""`checkpointing.partial`: which entries a prefix names (a module's entries, their best-state
and EMA copies, their optimizer entries matched by parameter name, not index), merging them from
an older state, the refusals, and the report of a load that takes what fits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from solver.best_state import BestState, copy_state
from solver.checkpointing import partial
from solver.checkpointing.partial import LoadReport, PartialError
from solver.ema import ModuleDictEMA


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 1))


class Run:
    """A model, an Adam whose param groups list the parameters in another order than the model
    does (so that an optimizer index is not a position in `named_parameters`), EMA, best state."""

    def __init__(self, reverse: bool = True) -> None:
        self.model = model()
        params = list(self.model.parameters())
        groups = [params[4:], params[:4]] if reverse else [params]
        self.optimizer = torch.optim.Adam([{'params': g} for g in groups], lr=0.01)
        self.ema = ModuleDictEMA({'model': self.model}, 0.9)
        self.best = BestState()
        self.best.register('model', self.model)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            loss = self.model(torch.randn(16, 4)).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.ema.step()
            self.best.update(loss.item())

    def state(self) -> dict:
        return copy_state({'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                           'ema': self.ema.state_dict(), 'best_state': self.best.state_dict(), 'history': [{}]})

    def names(self) -> partial.ParamNames:
        return partial.param_names({'model': self.model, 'optimizer': self.optimizer})


def test_param_names_follow_the_param_groups_not_the_model_order():
    run = Run(reverse=True)
    assert run.names() == {'optimizer': ['model.3.weight', 'model.3.bias', 'model.0.weight', 'model.0.bias',
                                         'model.2.weight', 'model.2.bias']}


def test_a_frozen_parameter_has_no_index_and_the_others_keep_their_names():
    net = model()
    net[0].weight.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad])
    assert partial.param_names({'model': net, 'optimizer': optimizer})['optimizer'][:2] == ['model.0.bias',
                                                                                          'model.2.weight']


def test_merge_takes_the_named_entries_and_their_optimizer_ema_and_best_entries_from_the_older_state():
    run = Run()
    run.step(3)
    older, older_names = run.state(), run.names()
    run.step(3)
    newest = run.state()
    merged, report = partial.merge(newest, older, ['model.2'], run.names(), older_names, 'checkpoint_1.th')
    for key in ('2.weight', '2.bias', '0.weight', '3.bias'):
        want = older if key.startswith('2.') else newest
        assert torch.equal(merged['model'][key], want['model'][key]), key
        assert torch.equal(merged['ema']['state']['model'][key], want['ema']['state']['model'][key]), key
        assert torch.equal(merged['best_state']['states']['model'][key], want['best_state']['states']['model'][key])
    for index, name in enumerate(run.names()['optimizer']):
        want = older if name.startswith('model.2.') else newest
        for moment in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(merged['optimizer']['state'][index][moment], want['optimizer']['state'][index][moment])
    assert merged['optimizer']['param_groups'] == newest['optimizer']['param_groups']
    assert merged['history'] is newest['history'] and newest['model']['2.weight'] is not merged['model']['2.weight']
    assert len(report.loaded) == 6 + 2 and report.kept == 4 * 3 + 4  # module entries in model, EMA, best; optimizer


def test_optimizer_entries_are_matched_by_parameter_name_when_the_two_points_number_them_differently():
    old, new = Run(reverse=False), Run(reverse=True)
    old.step(2)
    new.model.load_state_dict(old.model.state_dict())
    new.step(5)
    merged, _ = partial.merge(new.state(), old.state(), ['model.0'], new.names(), old.names(), 'old')
    assert torch.equal(merged['optimizer']['state'][2]['exp_avg'], old.state()['optimizer']['state'][0]['exp_avg'])
    assert torch.equal(merged['optimizer']['state'][0]['exp_avg'], new.state()['optimizer']['state'][0]['exp_avg'])


def test_a_prefix_matches_whole_components_only_and_one_matching_nothing_is_refused():
    run = Run()
    run.step()
    state = run.state()
    with pytest.raises(PartialError, match=r"--only model.2\.w: matches nothing in 'model'"):
        partial.merge(state, state, ['model.2.w'], run.names(), run.names(), 'old')
    with pytest.raises(PartialError, match=r"'optimizer' is not a module state.*\['model'\]"):
        partial.merge(state, state, ['optimizer'], run.names(), run.names(), 'old')


def test_a_shape_that_differs_is_refused_naming_the_entry_and_nothing_is_changed():
    run = Run()
    run.step()
    newest = run.state()
    older = copy.deepcopy(newest)
    older['model']['2.weight'] = torch.zeros(4, 8)
    before = newest['model']['2.weight'].clone()
    with pytest.raises(PartialError, match=r"model.2.weight: shape differs: \[4, 8\] in checkpoint_1.th, \[8, 8\]"):
        partial.merge(newest, older, ['model.2'], run.names(), run.names(), 'checkpoint_1.th')
    assert torch.equal(newest['model']['2.weight'], before)


def test_a_file_without_parameter_names_cannot_give_optimizer_entries():
    run = Run()
    run.step()
    state = run.state()
    with pytest.raises(PartialError, match=r"checkpoint_1.th records no parameter names for 'optimizer'"):
        partial.merge(state, state, ['model.0'], run.names(), None, 'checkpoint_1.th')


def test_fit_module_lists_each_entry_loaded_or_skipped_with_why():
    here = {'a': torch.zeros(2), 'b': torch.zeros(3), 'c': torch.zeros(2), 'd': torch.zeros(2, dtype=torch.int64),
            'e': torch.zeros(2), 'head.w': torch.zeros(1)}
    source = {'a': torch.ones(2), 'b': torch.ones(4), 'c': torch.ones(2, dtype=torch.bfloat16), 'd': torch.ones(2),
              'f': torch.ones(1), 'head.w': torch.ones(1)}
    report = LoadReport('src.th')
    taken = partial.fit_module('model', here, source, ['model.head'], report)
    assert sorted(taken) == ['a', 'c'] and sorted(report.loaded) == ['model.a', 'model.c']
    assert report.cast == {'model.c': 'bfloat16 -> float32'}
    assert report.skipped['model.b'] == 'shape differs: [4] in the source, [3] here'
    assert report.skipped['model.d'].startswith('dtype differs: float32 in the source, int64 here')
    assert report.skipped['model.e'].startswith('missing in the source')
    assert report.skipped['model.f'].startswith('missing here')
    assert report.skipped['model.head.w'] == partial.IGNORED
    assert report.summary() == ("2 entries loaded from src.th (1 cast to this model's dtype), 5 skipped (1 shape "
                                "differs, 1 dtype differs, 1 missing in the source, 1 ignored, 1 missing here)")
