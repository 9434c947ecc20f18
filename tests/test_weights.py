"""`checkpointing.weights`: files kept for good reduced to their best state in bf16, once, and
never at the cost of a kept file."""

from __future__ import annotations

import logging

import torch
from helpers import damage_a_tensor

from solver.checkpointing import envelope, naming, policy, weights

RETENTION = policy.Retention((policy.KeepLatest(1), policy.KeepEveryN(2)))


def write_epochs(folder, epochs=(2, 3)) -> dict[int, dict]:
    states = {}
    for epoch in epochs:
        model = {'w': torch.randn(4, 4), 'steps': torch.arange(3)}
        best = {'metric': 1.0 / epoch, 'states': {'model': {key: value.clone() for key, value in model.items()}}}
        states[epoch] = {'model': model, 'optimizer': {'state': {0: {'exp_avg': torch.randn(4, 4)}}},
                         'best_state': best}
        envelope.write_checkpoint(naming.epoch_checkpoint_path(folder, epoch), states[epoch],
                                  {'epoch': epoch, 'metric': 1.0 / epoch})
    return states


def test_only_the_file_kept_for_good_is_reduced_and_only_once(tmp_path):
    states = write_epochs(tmp_path)
    assert weights.reduce_kept(tmp_path, RETENTION, 'bf16') == [naming.epoch_checkpoint_path(tmp_path, 2)]
    reduced = envelope.read_checkpoint(naming.epoch_checkpoint_path(tmp_path, 2))
    model = reduced.state['best_state']['states']['model']
    assert model['w'].dtype == torch.bfloat16 and torch.equal(model['w'], states[2]['model']['w'].bfloat16())
    assert torch.equal(model['steps'], torch.arange(3))  # integers as they are
    assert reduced.meta == {'epoch': 2, 'metric': 0.5, 'weights_only': 'bf16', 'partial': ['best_state']}
    assert 'optimizer' in envelope.read_checkpoint(naming.epoch_checkpoint_path(tmp_path, 3)).state
    assert weights.reduce_kept(tmp_path, RETENTION, 'bf16') == []


def test_a_damaged_file_kept_for_good_is_reported_and_left_as_it_is(tmp_path, caplog):
    write_epochs(tmp_path)
    path = naming.epoch_checkpoint_path(tmp_path, 2)
    damage_a_tensor(path)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING):
        assert weights.reduce_kept(tmp_path, RETENTION, 'bf16') == []
    assert path.read_bytes() == before
    assert 'Could not reduce checkpoint_2.th to weights only' in caplog.text and 'damaged' in caplog.text
