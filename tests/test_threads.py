"""torch's threads for a run (`num_threads`) and the warning on a machine too busy for them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from solver import threads


@pytest.fixture
def no_wait_policy(monkeypatch):
    monkeypatch.delenv('OMP_WAIT_POLICY', raising=False)


def test_apply_sets_the_count_or_leaves_torchs_default():
    before = torch.get_num_threads()
    try:
        assert threads.apply(None) == before
        assert threads.apply(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize('threads_, busy, cpus, warned', [
    (2, 0.1, 2, False),   # a quiet machine: both threads get a core
    (2, 0.9, 2, True),    # one core taken by another process: the two threads would spin
    (2, 1.5, 4, False),   # two of four cores taken: two free for two threads
    (4, 1.5, 4, True),
    (1, 3.0, 2, False),   # one thread never waits for another
])
def test_the_warning_comes_when_other_processes_leave_fewer_free_cpus_than_threads(
        no_wait_policy, threads_, busy, cpus, warned):
    message = threads.warn_if_busy(threads_, busy=busy, cpus=cpus)
    assert (message is not None) == warned
    if warned:
        assert 'num_threads=1' in message and 'OMP_WAIT_POLICY=PASSIVE' in message and f'{cpus} CPUs' in message


def test_no_warning_once_a_wait_policy_is_chosen(monkeypatch):
    monkeypatch.setenv('OMP_WAIT_POLICY', 'PASSIVE')
    assert threads.warn_if_busy(2, busy=2.0, cpus=2) is None


def test_busy_cpus_sees_another_process_spinning():
    spin = 'import time\nend = time.time() + 3\nwhile time.time() < end: pass'
    with subprocess.Popen([sys.executable, '-c', spin]) as other:
        try:
            threads.busy_cpus(0.2)  # let it start
            busy = threads.busy_cpus(0.5)
        finally:
            other.kill()
    assert busy is not None and busy > 0.4  # a spinning process has most of a core, whatever else runs


def test_busy_cpus_takes_this_processs_own_time_out(monkeypatch):
    # Over one second the machine was busy 1.5 CPU-seconds, 1.2 of them this process's own.
    samples = iter([(100.0, 10.0, 0.0), (101.5, 11.2, 1.0)])
    monkeypatch.setattr(threads, 'cpu_times', lambda: next(samples))
    assert threads.busy_cpus(0) == pytest.approx(0.3)


def test_busy_cpus_is_none_where_proc_stat_cannot_be_read(monkeypatch):
    def missing() -> tuple[float, float, float]:
        raise FileNotFoundError('/proc/stat')
    monkeypatch.setattr(threads, 'cpu_times', missing)
    assert threads.busy_cpus(0) is None
    assert threads.warn_if_busy(2, cpus=2) is None
