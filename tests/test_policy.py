"""Save-decision and keep policies, each alone and combined, and the ones a config asks for."""

from __future__ import annotations

import pytest

from solver.checkpointing import policy
from solver.checkpointing.config import CheckpointConfig
from solver.checkpointing.policy import (
    AnySave,
    BestEpochs,
    EpochFile,
    EveryEpoch,
    EveryMinutes,
    EveryNEpochs,
    EverySteps,
    KeepBest,
    KeepContext,
    KeepEveryN,
    KeepLatest,
    OnPreemption,
    OverheadBudget,
    Retention,
    SaveContext,
    best_epochs,
    rank,
    retention_from_config,
)


def ctx(**fields) -> SaveContext:
    return SaveContext(**{'step': 1, 'epoch': 1, **fields})


# -- save decisions ------------------------------------------------------------------------------

def test_every_epoch_saves_at_epoch_ends_only():
    assert EveryEpoch().should_save(ctx(epoch_end=True))
    assert not EveryEpoch().should_save(ctx(epoch_end=False))


def test_every_n_epochs_saves_at_the_ends_of_multiples_of_n():
    saved = [e for e in range(1, 10) if EveryNEpochs(3).should_save(ctx(epoch=e, epoch_end=True))]
    assert saved == [3, 6, 9]
    assert not EveryNEpochs(3).should_save(ctx(epoch=3, epoch_end=False))


def test_every_steps_saves_at_multiples_of_n():
    assert [s for s in range(1, 13) if EverySteps(4).should_save(ctx(step=s))] == [4, 8, 12]


def test_every_minutes_saves_once_the_interval_has_passed():
    assert not EveryMinutes(2).should_save(ctx(since_last_save=119.0))
    assert EveryMinutes(2).should_save(ctx(since_last_save=120.0))


def test_overhead_budget_waits_for_a_known_cost_then_saves_every_cost_over_share():
    budget = OverheadBudget(0.01)
    assert not budget.should_save(ctx(since_last_save=1e6, save_cost=0.0))  # no cost measured yet
    assert not budget.should_save(ctx(since_last_save=9.9, save_cost=0.1))  # interval 0.1 / 0.01 = 10 s
    assert budget.should_save(ctx(since_last_save=10.0, save_cost=0.1))


def test_on_preemption_saves_when_a_signal_asks():
    assert OnPreemption().should_save(ctx(preempted=True))
    assert not OnPreemption().should_save(ctx())


def test_best_epochs_saves_an_epoch_among_the_best_k_so_far():
    policy_ = BestEpochs(2)
    # losses 3, 1, 2, 5: epochs 1, 2, 3 were among the best 2 when they ended; 4 was not
    scores = [3.0, 1.0, 2.0, 5.0]
    saved = [e for e in range(1, 5) if policy_.should_save(ctx(epoch=e, epoch_end=True, scores=scores[:e]))]
    assert saved == [1, 2, 3]


def test_best_epochs_follows_the_direction_of_the_metric():
    scores = [0.5, 0.9, 0.7]
    assert BestEpochs(1).should_save(ctx(epoch=2, epoch_end=True, scores=scores[:2], lower_is_better=False))
    assert not BestEpochs(1).should_save(ctx(epoch=2, epoch_end=True, scores=scores[:2]))


def test_any_save_saves_when_one_policy_does_and_not_when_none_does():
    combined = AnySave((EverySteps(4), OnPreemption()))
    assert combined.should_save(ctx(step=3, preempted=True))
    assert combined.should_save(ctx(step=8))
    assert not combined.should_save(ctx(step=3))
    assert not AnySave(()).should_save(ctx(epoch_end=True, preempted=True))


# -- keep decisions ------------------------------------------------------------------------------

EPOCHS = [1, 2, 3, 4, 5, 6]
SCORES = [5.0, 2.0, 4.0, 1.0, 3.0, 6.0]  # best: 4, then 2, then 5


def files(epochs=EPOCHS, scores=SCORES) -> list[EpochFile]:
    """The epoch files there are, each with the metric its metadata records (its epoch's score)."""
    return [EpochFile(epoch, scores[epoch - 1]) for epoch in epochs]


def keep(policy_, epochs=EPOCHS, scores=SCORES) -> set[int]:
    return policy_.keep(KeepContext(files(epochs, scores)))


def test_keep_latest_keeps_the_newest_n():
    assert keep(KeepLatest(2)) == {5, 6}
    assert keep(KeepLatest(0)) == set()


def test_keep_every_n_keeps_multiples_of_n_for_good():
    assert keep(KeepEveryN(3)) == {3, 6}


def test_keep_best_keeps_the_k_best_epochs_that_have_a_file():
    assert keep(KeepBest(2)) == {2, 4}
    assert keep(KeepBest(2, lower_is_better=False)) == {1, 6}


def test_keep_best_ranks_the_files_there_are_by_the_metric_each_records():
    # the metric travels with its file (as Orbax's BestN): a resumed run, or `solver prune`,
    # ranks the same files the same way, whatever history it holds
    assert keep(KeepBest(1), epochs=[4, 5, 6]) == {4}
    assert keep(KeepBest(2), epochs=[1, 2, 3, 5, 6]) == {2, 5}  # epoch 4's file is gone: the next best stays


def test_keep_best_never_ranks_a_file_without_a_finite_metric():
    nan, inf = float('nan'), float('inf')
    assert keep(KeepBest(2), scores=[nan, 2.0, None, 1.0, -inf, 3.0]) == {2, 4}
    assert keep(KeepBest(2, lower_is_better=False), scores=[nan, 2.0, None, 1.0, inf, 3.0]) == {6, 2}


def test_a_file_stays_if_any_keep_policy_keeps_it():
    assert keep(Retention((KeepLatest(1), KeepBest(2), KeepEveryN(5)))) == {2, 4, 5, 6}


def test_best_epochs_prefers_the_earlier_epoch_on_a_tie_and_skips_missing_scores():
    assert best_epochs([1.0, None, 1.0, 2.0], 1) == {1}
    assert best_epochs([1.0, None, 1.0, 2.0], 3) == {1, 3, 4}


def test_one_ranking_drops_nan_for_saving_keeping_and_the_command_line_alike():
    # a diverged epoch's NaN is never "best": not for BestEpochs, KeepBest, nor `rollback --to best`
    scores = [2.0, float('nan'), 1.0]
    assert rank(enumerate(scores, 1)) == [(3, 1.0), (1, 2.0)]
    assert best_epochs(scores, 2) == {1, 3}
    assert not BestEpochs(2).should_save(ctx(epoch=2, epoch_end=True, scores=scores[:2]))


def test_retention_says_why_each_file_stays_and_lists_the_rest():
    retention = Retention((KeepLatest(1), KeepLatest(2), KeepBest(1), KeepEveryN(3)))
    decision = retention.decide(reversed(files()))  # in any order
    assert decision.kept == {6: 'newest', 5: 'among the newest 2', 4: 'among the best 1 (checkpoint.keep_best)',
                             3: 'a multiple of 3 epochs'}
    assert decision.removed == [1, 2]


def test_files_kept_for_good_are_those_only_keep_every_or_keep_best_keep():
    # checkpoint.keep_dtype reduces these: no run goes on from them again
    retention = Retention((KeepLatest(1), KeepLatest(2), KeepBest(1), KeepEveryN(3)))
    assert retention.for_good(KeepContext(files())) == {3, 4}
    # the scheduled files of save_every without keep_last are points a run goes on from
    assert Retention((KeepLatest(1), KeepEveryN(2, for_good=False))).for_good(KeepContext(files())) == set()
    assert retention_from_config(checkpoint_cfg(save_every=2)).for_good(KeepContext(files())) == set()
    assert retention_from_config(checkpoint_cfg(keep_every=2, keep_last=1)).for_good(KeepContext(files())) == {2, 4}


# -- from the config -----------------------------------------------------------------------------

def checkpoint_cfg(**overrides) -> CheckpointConfig:
    return CheckpointConfig(**overrides)


def test_the_default_config_saves_the_latest_every_epoch_and_on_preemption():
    policies = policy.from_config(checkpoint_cfg())
    assert policies.latest.policies == (OnPreemption(), EveryEpoch())
    assert policies.epoch_file.policies == ()
    assert policies.periodic


def test_a_config_without_any_periodic_save_saves_only_on_preemption():
    policies = policy.from_config(checkpoint_cfg(save_last=False))
    assert policies.latest.policies == (OnPreemption(),) and not policies.periodic


def test_mid_epoch_keys_become_policies_of_the_latest_file():
    policies = policy.from_config(checkpoint_cfg(every_steps=5, every_minutes=2, max_overhead=0.01))
    assert policies.latest.policies[2:] == (EverySteps(5), EveryMinutes(2.0), OverheadBudget(0.01))


@pytest.mark.parametrize('keys, kept', [
    ({'save_every': 1}, {1, 2, 3, 4, 5, 6}),                         # keep_last null: all kept
    ({'save_every': 1, 'keep_last': 2}, {5, 6}),
    ({'save_every': 1, 'keep_last': 1, 'keep_best': 2}, {2, 4, 6}),
    ({'save_every': 1, 'keep_last': 1, 'keep_every': 3}, {3, 6}),
    ({'keep_best': 1}, {4, 6}),                                      # the newest epoch file always stays
])
def test_keep_policies_from_the_config_are_a_union_that_always_keeps_the_newest(keys, kept):
    assert keep(policy.from_config(checkpoint_cfg(**keys)).retention) == kept
    assert set(policy.retention_from_config(CheckpointConfig.parse(keys)).decide(files()).kept) == kept


def test_best_k_files_hold_every_state_and_others_may_not():
    policies = policy.from_config(checkpoint_cfg(save_every=1, keep_best=1))
    full = [e for e in (1, 2, 3) if policies.full_file.should_save(ctx(epoch=e, epoch_end=True,
                                                                       scores=[2.0, 3.0, 1.0][:e]))]
    assert full == [1, 3]  # epoch 2 was not the best so far: its file may hold keep_every_states only


def test_keep_best_and_keep_every_write_epoch_files_of_their_own():
    policies = policy.from_config(checkpoint_cfg(keep_best=2, keep_every=4))
    losses = [float(e) for e in range(1, 9)]  # worse every epoch: the best two are epochs 1 and 2
    written = [e for e in range(1, 9)
               if policies.epoch_file.should_save(ctx(epoch=e, epoch_end=True, scores=losses[:e]))]
    assert written == [1, 2, 4, 8]
