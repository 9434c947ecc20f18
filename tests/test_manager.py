"""CheckpointManager on real files: what it writes when, what it keeps, what it restores, and
that a save's `on_durable` callback (Dora's history) never runs before the save is on disk."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import typing as tp
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from solver import edit
from solver.checkpointing import envelope, listing, naming
from solver.checkpointing.config import CheckpointConfig, RollbackConfig
from solver.checkpointing.faults import CheckpointError
from solver.checkpointing.manager import CheckpointManager, Moment
from solver.errors import SolverError, UserError
from solver.experiment import Experiment

STATE = {'model': {'weight': torch.arange(4.0)}, 'progress': {'step': 0}}


def config(**overrides) -> CheckpointConfig:
    return CheckpointConfig(**{'async_save': False, 'rollback': RollbackConfig(max_rollbacks=2), **overrides})


def manager(folder: Path, sig: str = 'abc123', **overrides) -> CheckpointManager:
    folder.mkdir(parents=True, exist_ok=True)
    return CheckpointManager(folder, config(**overrides), sig)


def save_epoch(m: CheckpointManager, epoch: int, scores: list[float], **kwargs) -> list[Path]:
    """What the solver does at an epoch end: plan, then save; returns the files written."""
    ctx = m.context(step=10 * epoch, epoch=epoch, epoch_end=True, scores=scores)
    targets = m.plan(ctx)
    if targets:
        m.save({**STATE, 'progress': {'step': 10 * epoch}}, targets, {'epoch': epoch, 'step': 10 * epoch}, **kwargs)
    return sorted(targets)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob('checkpoint*.th'))


# -- what is written when --------------------------------------------------------------------------

def test_by_default_the_latest_file_is_written_at_every_epoch_end_and_holds_the_signature(tmp_path):
    m = manager(tmp_path)
    assert save_epoch(m, 1, [1.0]) == [tmp_path / 'checkpoint.th']
    m.close()
    meta = envelope.read_checkpoint(tmp_path / 'checkpoint.th').meta
    assert meta['sig'] == 'abc123' and meta['epoch'] == 1 and 'torch' in meta['versions']


def test_mid_epoch_the_latest_file_is_written_only_when_a_policy_asks(tmp_path):
    m = manager(tmp_path, every_steps=4)
    due = [step for step in range(1, 10) if m.plan(m.context(step=step, epoch=0))]
    assert due == [4, 8]
    assert m.plan(m.context(step=3, epoch=0, preempted=True)) == {tmp_path / 'checkpoint.th': None}


def test_epoch_files_hold_keep_every_states_but_best_k_files_are_full(tmp_path):
    m = manager(tmp_path, save_last=False, save_every=1, keep_every_states=['model'], keep_best=1)
    first = m.plan(m.context(step=10, epoch=1, epoch_end=True, scores=[1.0]))
    second = m.plan(m.context(step=20, epoch=2, epoch_end=True, scores=[1.0, 2.0]))
    assert first == {tmp_path / 'checkpoint_1.th': None}          # the best so far: full
    assert second == {tmp_path / 'checkpoint_2.th': ['model']}    # not among the best 1


def test_without_save_last_a_latest_file_once_written_is_kept_up_to_date_at_epoch_ends(tmp_path):
    m = manager(tmp_path, save_last=False, save_every=2)
    assert save_epoch(m, 1, [1.0]) == []
    m.save(STATE, m.plan(m.context(step=15, epoch=1, preempted=True)), {'epoch': 1})  # e.g. a mid-epoch save
    assert save_epoch(m, 2, [1.0, 1.0]) == [tmp_path / 'checkpoint.th', tmp_path / 'checkpoint_2.th']
    m.close()


# -- retention -------------------------------------------------------------------------------------

LOSSES = [5.0, 1.0, 4.0, 2.0, 6.0, 7.0]  # best two: epochs 2 and 4


def test_keep_best_keeps_the_k_best_epochs_with_keep_last_and_never_the_newest_evicted(tmp_path):
    m = manager(tmp_path, save_every=1, keep_last=1, keep_best=2, keep_every_states=["model"])
    for epoch in range(1, 7):
        save_epoch(m, epoch, LOSSES[:epoch])
    m.close()
    assert names(tmp_path) == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_4.th', 'checkpoint_6.th']
    assert 'partial' not in envelope.read_checkpoint(tmp_path / 'checkpoint_2.th').meta  # best files are full


def test_a_resumed_manager_keeps_the_true_best_it_did_not_rank_itself(tmp_path):
    first = manager(tmp_path, save_every=1, keep_last=1, keep_best=1)
    for epoch in range(1, 3):
        save_epoch(first, epoch, LOSSES[:epoch])
    first.close()
    resumed = manager(tmp_path, save_every=1, keep_last=1, keep_best=1)  # a new process: history restored
    for epoch in range(3, 7):
        save_epoch(resumed, epoch, LOSSES[:epoch])
    resumed.close()
    assert names(tmp_path) == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_6.th']


def test_keep_every_keeps_its_epochs_for_good(tmp_path):
    m = manager(tmp_path, save_every=1, keep_last=1, keep_every=3)
    for epoch in range(1, 8):
        save_epoch(m, epoch, LOSSES[:epoch] + [0.0] * (epoch - len(LOSSES)))
    m.close()
    assert names(tmp_path) == ['checkpoint.th', 'checkpoint_3.th', 'checkpoint_6.th', 'checkpoint_7.th']


def test_each_file_records_the_metric_of_its_epoch_and_retention_ranks_by_it_alone(tmp_path):
    m = manager(tmp_path, save_every=1, keep_last=1, keep_best=2)
    for epoch in range(1, 7):
        save_epoch(m, epoch, LOSSES[:epoch])
    m.close()
    assert [listing.read_meta(tmp_path / f'checkpoint_{e}.th')['metric'] for e in (2, 4, 6)] == [1.0, 2.0, 7.0]
    assert m.prune(history=()) == []  # no history needed: the files say how they rank


def test_files_written_before_the_metric_was_recorded_are_ranked_by_the_history(tmp_path):
    for epoch in range(1, 5):  # as older code wrote them: no 'metric' in the metadata
        envelope.write_checkpoint(naming.epoch_checkpoint_path(tmp_path, epoch), STATE, {'epoch': epoch})
    removed = manager(tmp_path, save_every=1, keep_last=1, keep_best=1).prune(history=LOSSES[:4])
    assert sorted(p.name for p in removed) == ['checkpoint_1.th', 'checkpoint_3.th']
    assert names(tmp_path) == ['checkpoint_2.th', 'checkpoint_4.th']


def test_a_nan_epoch_is_never_kept_as_best(tmp_path):
    m = manager(tmp_path, save_every=1, keep_last=1, keep_best=1)
    for epoch, scores in enumerate(([3.0], [3.0, float('nan')], [3.0, float('nan'), 4.0]), 1):
        save_epoch(m, epoch, scores)
    m.close()
    assert names(tmp_path) == ['checkpoint.th', 'checkpoint_1.th', 'checkpoint_3.th']


WAVY = [5.0, 1.0, 4.0, 2.0, 6.0, 0.5, 7.0, 8.0, 3.0]  # best two: epochs 6 and 2
MIXED = dict(save_every=1, keep_best=2, keep_every=4)    # latest-N + best-k + every-N


def test_solver_prune_keeps_exactly_what_the_run_kept_ranking_by_the_files_not_the_history(tmp_path):
    from solver import edit, experiment
    run = manager(tmp_path / 'run', keep_last=2, **MIXED)
    for epoch in range(1, len(WAVY) + 1):
        save_epoch(run, epoch, WAVY[:epoch])
    run.close()
    kept_by_the_run = names(tmp_path / 'run')
    assert kept_by_the_run == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_4.th', 'checkpoint_6.th',
                               'checkpoint_8.th', 'checkpoint_9.th']
    everything = manager(tmp_path / 'all', keep_last=None, **MIXED)  # the same run, keeping every file
    for epoch in range(1, len(WAVY) + 1):
        save_epoch(everything, epoch, WAVY[:epoch])
    everything.close()
    (tmp_path / 'all' / '.hydra').mkdir()
    recorded = {'checkpoint': dataclasses.asdict(config(**MIXED))}  # as Hydra records the run's config
    (tmp_path / 'all' / '.hydra' / 'config.yaml').write_text(OmegaConf.to_yaml(recorded))
    misleading = [{'valid': {'loss': -float(epoch)}} for epoch in range(1, len(WAVY) + 1)]  # not what ranks
    (tmp_path / 'all' / 'history.json').write_text(json.dumps(misleading))
    removed, kept = edit.prune(experiment.Experiment(tmp_path / 'all'), keep_last=2, apply=True)
    assert names(tmp_path / 'all') == kept_by_the_run
    assert kept[tmp_path / 'all' / 'checkpoint_6.th'] == 'among the best 2 (checkpoint.keep_best)'
    assert kept[tmp_path / 'all' / 'checkpoint_4.th'] == 'a multiple of 4 epochs'


# -- durability callbacks --------------------------------------------------------------------------

@pytest.mark.parametrize('async_save', [False, True], ids=['sync', 'async'])
def test_on_durable_runs_after_the_file_is_on_disk_and_never_before(tmp_path, monkeypatch, async_save):
    written = threading.Event()
    real = envelope.write_checkpoint

    def slow_write(path: Path, state: dict, meta: dict, **kwargs: tp.Any) -> None:
        time.sleep(0.2)  # a slow disk: the async save returns long before this
        real(path, state, meta, **kwargs)
        written.set()

    monkeypatch.setattr(envelope, 'write_checkpoint', slow_write)
    m = manager(tmp_path, async_save=async_save)
    seen: list[int] = []
    save_epoch(m, 1, [1.0], on_durable=lambda: seen.append(envelope.read_checkpoint(tmp_path / 'checkpoint.th')
                                                               .meta['epoch']))
    assert written.is_set() or seen == []
    m.close()
    assert seen == [1]


def test_on_durable_callbacks_follow_their_saves_in_order(tmp_path):
    m = manager(tmp_path, async_save=True)
    seen: list[int] = []
    for epoch in (1, 2, 3):
        save_epoch(m, epoch, [1.0] * epoch, on_durable=lambda epoch=epoch: seen.append(epoch))
    m.close()
    assert seen == [1, 2, 3]


# -- restore, continue_from, rollback ---------------------------------------------------------------

def test_restore_of_an_empty_folder_finds_nothing(tmp_path):
    assert manager(tmp_path).restore() is None


def test_restore_refuses_a_checkpoint_of_another_experiment_naming_both_and_continue_from(tmp_path):
    other = manager(tmp_path / 'xps' / 'other99', sig='other99')
    save_epoch(other, 1, [1.0])
    other.close()
    mine = manager(tmp_path / 'xps' / 'mine42', sig='mine42')
    (tmp_path / 'xps' / 'mine42' / 'checkpoint.th').write_bytes((tmp_path / 'xps' / 'other99' / 'checkpoint.th')
                                                                 .read_bytes())
    with pytest.raises(UserError) as err:
        mine.restore()
    message = str(err.value)
    assert 'other99' in message and 'mine42' in message and 'continue_from=//sig/other99' in message


def test_continue_from_names_an_unknown_signature_and_a_missing_path(tmp_path):
    m = manager(tmp_path / 'xps' / 'mine42')
    with pytest.raises(SolverError, match="no experiment '0badc0de'"):
        m.resolve_continue_from('//sig/0badc0de', None, pretrained=lambda name: None)
    with pytest.raises(SolverError, match='/no/such/file'):
        m.resolve_continue_from('/no/such/file', None, pretrained=lambda name: None)


def test_continue_from_a_folder_takes_its_newest_checkpoint(tmp_path):
    other = manager(tmp_path / 'xps' / 'other99', sig='other99')
    for epoch in (1, 2):
        save_epoch(other, epoch, [1.0] * epoch)
    other.close()
    found = manager(tmp_path / 'xps' / 'mine42').resolve_continue_from('//sig/other99', None, lambda n: None)
    assert found.meta['epoch'] == 2 and found.meta['sig'] == 'other99'


def test_continue_from_reads_every_name_the_command_line_reads(tmp_path):
    """One grammar (naming.py): a signature prefix and <sig>/<file> name the same checkpoints as //sig/."""
    other = manager(tmp_path / 'xps' / 'other99', sig='other99')
    for epoch in (1, 2):
        save_epoch(other, epoch, [1.0] * epoch)
    other.close()
    mine = manager(tmp_path / 'xps' / 'mine42')
    assert mine.resolve_continue_from('oth', None, lambda n: None).meta['epoch'] == 2
    assert mine.resolve_continue_from('other99/checkpoint.th', None, lambda n: None).meta['epoch'] == 2
    assert mine.resolve_continue_from('//sig/other99/checkpoint.th', None, lambda n: None).meta['epoch'] == 2


def test_rollback_gives_the_newest_checkpoint_then_refuses_past_max_rollbacks(tmp_path):
    m = manager(tmp_path)
    with pytest.raises(SolverError, match='before any checkpoint'):
        m.rollback('loss is nan', step=3)
    save_epoch(m, 1, [1.0])
    assert m.rollback('loss is nan', step=12).meta['epoch'] == 1  # the second of max_rollbacks=2
    with pytest.raises(SolverError, match='checkpoint.rollback.max_rollbacks'):
        m.rollback('loss is nan', step=12)
    m.close()


def test_describe_names_what_is_saved_and_kept(tmp_path):
    line = manager(tmp_path, save_every=2, keep_last=3, keep_best=1, every_steps=50).describe()
    assert 'checkpoint_<epoch>.th every 2 epochs (newest 3 kept)' in line
    assert 'best 1' in line and 'every 50 steps' in line and 'up to 2 times' in line


# -- the name and direction of the metric travel with each file ---------------------------------------

def test_each_file_records_the_name_and_direction_of_its_metric(tmp_path):
    m = CheckpointManager(tmp_path, config(save_every=1), 'abc123', lower_is_better=False, metric_name='accuracy')
    save_epoch(m, 1, [0.5])
    m.close()
    meta = envelope.read_checkpoint(tmp_path / 'checkpoint_1.th').meta
    assert (meta['metric'], meta['metric_name'], meta['lower_is_better']) == (0.5, 'accuracy', False)


def test_prune_ranks_by_the_recorded_direction_not_the_solver_class_the_config_names(tmp_path):
    # The config names a solver whose metric is lower-is-better; the run recorded higher-is-better.
    m = CheckpointManager(tmp_path, config(save_every=1, keep_last=None), 'abc123',  # keeps every file
                          lower_is_better=False, metric_name='accuracy')
    scores = [0.5, 0.9, 0.7]
    for epoch in range(1, 4):
        save_epoch(m, epoch, scores[:epoch])
    m.close()
    (tmp_path / '.hydra').mkdir()
    (tmp_path / '.hydra' / 'config.yaml').write_text(
        'solver_class: solver.regression.RegressionSolver\ncheckpoint:\n  save_every: 1\n  keep_best: 1\n')
    xp = Experiment(tmp_path)
    assert xp.best_metric() == ('accuracy', False)
    removed, kept = edit.prune(xp, keep_last=1, apply=True)
    assert names(tmp_path) == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_3.th']
    assert 'best' in kept[tmp_path / 'checkpoint_2.th'] and removed == [tmp_path / 'checkpoint_1.th']


def test_files_that_record_no_metric_name_are_ranked_as_the_solver_class_says(tmp_path):
    envelope.write_checkpoint(tmp_path / 'checkpoint_1.th', STATE, {'epoch': 1, 'metric': 1.0})
    (tmp_path / '.hydra').mkdir()
    (tmp_path / '.hydra' / 'config.yaml').write_text('solver_class: solver.regression.RegressionSolver\n')
    assert Experiment(tmp_path).best_metric() == ('loss', True)


# -- the save protocol: the solver tells a moment, the manager decides -------------------------------

class Snapshots:
    """The solver's side of `on_moment`: counts the snapshots taken, each of the state at a step."""

    def __init__(self) -> None:
        self.taken = 0

    def __call__(self) -> tuple[dict, dict]:
        self.taken += 1
        return STATE, {'epoch': 0, 'step': self.taken}


def test_a_moment_when_no_policy_saves_takes_no_snapshot(tmp_path):
    m, snapshot = manager(tmp_path, every_steps=4), Snapshots()
    saved = [step for step in range(1, 10) if m.on_moment(Moment.STEP, step, [], snapshot) is not None]
    m.close()
    assert saved == [4, 8] and snapshot.taken == 2


def test_a_stop_moment_saves_the_latest_file_and_an_epoch_end_the_files_its_policies_ask(tmp_path):
    m = manager(tmp_path, save_last=False, save_every=2)
    assert m.on_moment(Moment.EPOCH_END, 10, [1.0], Snapshots()) is None
    m.on_moment(Moment.STOP, 15, [1.0], Snapshots())
    assert names(tmp_path) == ['checkpoint.th']
    m.on_moment(Moment.EPOCH_END, 20, [1.0, 1.0], Snapshots())
    m.close()
    assert names(tmp_path) == ['checkpoint.th', 'checkpoint_2.th']


def test_a_stop_asked_on_another_rank_saves_the_latest_file_here_too(tmp_path):
    m = CheckpointManager(tmp_path, config(save_last=False), 'abc123', agree=lambda *flags: (True, *flags))
    m.on_moment(Moment.STEP, 3, [], Snapshots())
    m.close()
    assert names(tmp_path) == ['checkpoint.th']


def test_a_save_failed_on_another_rank_stops_the_run_before_anything_is_written(tmp_path):
    m = CheckpointManager(tmp_path, config(), 'abc123', agree=lambda latest, failed: (False, latest, True))
    snapshot = Snapshots()
    with pytest.raises(CheckpointError, match='failed on another rank'):
        m.on_moment(Moment.EPOCH_END, 10, [1.0], snapshot)
    assert snapshot.taken == 0 and names(tmp_path) == []


def test_the_durable_callback_follows_the_save_or_comes_at_once_when_nothing_saves_periodically(tmp_path):
    calls: list[str] = []
    m = manager(tmp_path / 'periodic')
    m.on_moment(Moment.EPOCH_END, 10, [1.0], Snapshots(), on_durable=lambda: calls.append('saved'))
    m.close()
    assert calls == ['saved'] and names(tmp_path / 'periodic') == ['checkpoint.th']
    m = manager(tmp_path / 'only-on-stop', save_last=False)
    m.on_moment(Moment.EPOCH_END, 10, [1.0], Snapshots(), on_durable=lambda: calls.append('at once'))
    m.close()
    assert calls == ['saved', 'at once'] and names(tmp_path / 'only-on-stop') == []
