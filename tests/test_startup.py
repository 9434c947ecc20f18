"""Specification of the start-up breakdown (solver/startup.py): phases that sum to the whole, from
the process's start, logged once at the first step."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from solver import startup

IMPORTED = time.monotonic()


def test_phases_add_up_to_the_time_since_the_process_started_and_are_logged_once(monkeypatch, caplog):
    begin = time.monotonic() - 2.0  # as if the process had started two seconds ago
    monkeypatch.setattr(startup, '_last', begin)
    monkeypatch.setattr(startup, '_phases', {})
    monkeypatch.setattr(startup, '_done', False)
    startup.reached('imports')
    startup.reached('data')
    startup.reached('imports')  # a phase met twice adds up
    with caplog.at_level(logging.INFO, logger='solver.startup'):
        startup.first_step()
        startup.first_step()
    phases = startup.phases()
    assert list(phases) == ['imports', 'data', 'first step'] and phases['imports'] >= 2.0
    assert abs(sum(phases.values()) - (startup._last - begin)) < 1e-9
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(startup.LINE_PREFIX) and 'imports ' in line and 'first step ' in line


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='the process start is read from /proc')
def test_the_clock_starts_at_the_process_start_not_at_the_first_import():
    age = time.monotonic() - startup._process_start()  # the fallback (now) would give 0
    assert age > time.monotonic() - IMPORTED > 0  # the interpreter and pytest ran before this module


def test_dora_composes_each_set_of_overrides_once_and_hands_out_copies(monkeypatch):
    import dora.hydra

    from solver.train import main
    calls = []
    compose = dora.hydra.compose

    def counted(name, overrides):
        calls.append(overrides)
        return compose(name, overrides)

    monkeypatch.setattr(dora.hydra, 'compose', counted)
    argv = ['solver=drum_rnn/debug', 'optim.lr=0.00123']  # not composed by any other test
    first = main.get_xp(argv)
    composed = len(calls)
    second = main.get_xp(argv)
    assert 1 <= composed <= 2 and len(calls) == composed  # the config, and the groups alone
    assert second.sig == first.sig and second.cfg == first.cfg and second.cfg.optim.lr == 0.00123
    second.cfg.optim.lr = 1.0
    assert main.get_xp(argv).cfg.optim.lr == 0.00123  # a copy each time
