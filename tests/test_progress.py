"""The run's position (`Progress`): its steps, and the plain dict every checkpoint holds it as."""

from __future__ import annotations

from solver.progress import Progress


def test_a_step_advances_the_steps_and_the_batches_drawn_and_sets_the_epoch_step():
    progress = Progress()
    progress.stepped(1)
    progress.stepped(2)
    assert (progress.step, progress.train_batches, progress.epoch_step) == (2, 2, 2)


def test_a_rollback_skips_the_batches_up_to_the_one_that_diverged_but_not_the_steps():
    progress = Progress(step=16, train_batches=16)
    assert progress.skip_to(20) == (16, 20)
    assert (progress.step, progress.train_batches) == (16, 21)


def test_a_new_epoch_starts_its_step_and_sums_afresh():
    progress = Progress(step=5, train_batches=6, epoch_step=5, sums={'loss': 2.5})
    progress.new_epoch()
    assert progress == Progress(step=5, train_batches=6)


def test_the_state_is_the_plain_dict_checkpoints_held_before_it_was_typed():
    mid_epoch = {'step': 12, 'train_batches': 14, 'epoch_step': 4, 'sums': {'loss': 3.0}}
    progress = Progress()
    progress.load_state_dict(mid_epoch)
    assert progress == Progress(step=12, train_batches=14, epoch_step=4, sums={'loss': 3.0})
    assert progress.state_dict() == mid_epoch
