"""Early stopping as a policy value: what `EarlyStop.decide` answers for a history of scores."""

from __future__ import annotations

from omegaconf import OmegaConf

from solver.early_stop import EarlyStop, Stop, epochs_without_improvement


def test_without_patience_the_run_never_stops_early():
    assert EarlyStop().decide([1.0, 2.0, 3.0, 4.0]) is None
    assert EarlyStop(patience=0).decide([1.0, 2.0, 3.0, 4.0]) is None


def test_it_stops_once_patience_epochs_pass_without_improvement_and_says_why():
    stop = EarlyStop(patience=2).decide([1.0, 0.5, 0.6, 0.7])
    assert stop == Stop(epochs_without_improvement=2, patience=2, min_delta=0.0)
    assert stop.record() == {'epochs_without_improvement': 2, 'patience': 2, 'min_delta': 0.0}


def test_an_improvement_resets_the_count():
    assert EarlyStop(patience=2).decide([1.0, 1.1, 0.9]) is None


def test_an_improvement_by_no_more_than_min_delta_does_not_count():
    assert EarlyStop(patience=2, min_delta=0.1).decide([1.0, 0.95, 0.92]) is not None
    assert EarlyStop(patience=2).decide([1.0, 0.95, 0.92]) is None


def test_higher_is_better_when_the_metric_says_so():
    assert EarlyStop(patience=2, lower_is_better=False).decide([0.5, 0.4, 0.3]) is not None
    assert EarlyStop(patience=2, lower_is_better=False).decide([0.5, 0.6, 0.7]) is None


def test_epochs_without_a_score_count_as_epochs_without_improvement():
    assert epochs_without_improvement([1.0, None, None]) == 2
    assert EarlyStop(patience=2).decide([1.0, None, None]) is not None


def test_it_is_built_from_the_early_stop_section_or_its_absence():
    cfg = OmegaConf.create({'patience': 3, 'min_delta': 0.01})
    assert EarlyStop.from_config(cfg, lower_is_better=False) == EarlyStop(3, 0.01, False)
    assert EarlyStop.from_config(None) == EarlyStop()
