"""Preemption: turn SIGTERM/SIGUSR1/SIGUSR2 into "save at the next step boundary, then leave".

Slurm sends SIGTERM before it stops a job (preemption, `scontrol requeue`, `scancel`) and the
signal the job asked for before its time limit: submitit asks for SIGUSR2 90 s before
(`--signal=USR2@90`; another with SUBMITIT_PREEMPT_SIGNAL); torchrun forwards SIGTERM to its
workers. Stopping in the middle of an optimizer step or a save would lose or damage work, so the
handler only records the request; the training loop checks `requested` between steps, saves a
checkpoint and calls `leave()`. The other stages (valid, evaluate, generate) check it between
batches (`StandardSolver.check_stop`, which raises `StopRequested`): the run then saves the
finished train stage and leaves within seconds.

`leave()` hands each signal received to the handler that was installed before ours, if any:
under submitit (Dora's Slurm launcher) SIGUSR2's is the handler which requeues the job (counting
a requeue after a time limit against `max_num_timeout`), so the job comes back and resumes from
the checkpoint just saved; its SIGTERM handler only logs (Slurm requeues a job it preempts or
that `scontrol requeue` names by itself). Otherwise it exits with 128 + the first signal's number
(143 for SIGTERM), the code of a process stopped by that signal, which schedulers and `dora grid`
report as interrupted rather than done.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import types
import typing as tp

from . import distrib

logger = logging.getLogger(__name__)
# submitit's signal before a time limit (its variable, its default)
REQUEUE_SIGNAL = getattr(signal, 'SIG' + os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2'), signal.SIGUSR2)
SIGNALS = tuple(dict.fromkeys((signal.SIGTERM, signal.SIGUSR1, REQUEUE_SIGNAL)))
REQUEUE_WAIT_S = 120  # a rank > 0 waits this long for Slurm to end the job rank 0 requeues


class StopRequested(Exception):
    """Raised between batches of valid/evaluate/generate when a preemption signal asks to stop."""


class PreemptionHandler:
    """Install with `with PreemptionHandler() as stop:`; check `stop.requested` between steps."""

    def __init__(self, signals: tp.Sequence[signal.Signals] = SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None  # the first signal
        self.all_received: list[signal.Signals] = []   # each signal once, in the order they came
        self._previous: dict[signal.Signals, tp.Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if signal.Signals(signum) not in self.all_received:
            self.all_received.append(signal.Signals(signum))
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning("Received %s: saving at the next step boundary, then stopping.",
                           self.received.name)
        else:  # Slurm may repeat the signal; a user may press Ctrl-C twice: say it is in hand
            logger.warning("Received %s again: already stopping after the save in progress "
                           "(SIGKILL stops at once, losing the work since the last checkpoint).",
                           signal.Signals(signum).name)

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """(requested, *flags), each true if true on any rank: a signal that reached one rank
        stops all at the same step, and a save one rank finds due is made by all. Ranks that
        decided apart would wait forever in each other's collectives."""
        requested, *agreed = distrib.any_rank(self.requested, *flags)
        if requested and not self.requested:
            logger.warning("Another rank was asked to stop: saving at this step, then stopping.")
            self.received = signal.SIGTERM
        return (requested, *agreed)

    def __enter__(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def leave(self) -> tp.NoReturn:
        """Stop the process after the checkpoint is durable (see the module docstring)."""
        assert self.received is not None
        sig = self.received
        previous = dict(self._previous)
        self.__exit__()
        for each in self.all_received or [sig]:  # [sig] alone: another rank's signal (`agree`)
            handler = previous.get(each)
            if callable(handler):
                logger.info("Passing %s on to the previous handler (e.g. submitit's requeue).", each.name)
                handler(each, None)
        if REQUEUE_SIGNAL in self.all_received and distrib.rank() > 0 and os.environ.get('SUBMITIT_EXECUTOR'):
            # submitit requeues from rank 0 alone. Exiting now with an error would let srun end the
            # job step (Dora sets SLURM_KILL_BAD_EXIT) before rank 0 has requeued it: wait for Slurm.
            logger.info("Saved; waiting for rank 0 to requeue the Slurm job.")
            time.sleep(REQUEUE_WAIT_S)
        logger.info("Stopped by %s after saving; rerun the same command to resume.", sig.name)
        sys.exit(128 + sig)


def ignore_requeue_signal() -> None:
    """After the run has finished: a time-limit signal that comes now has nothing left to save.
    Ignored, it can neither requeue the finished job (submitit's handler) nor kill it while the
    interpreter exits (Python then resets its handlers), which Slurm would report as FAILED."""
    signal.signal(REQUEUE_SIGNAL, signal.SIG_IGN)
