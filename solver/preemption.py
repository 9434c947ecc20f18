"""Preemption: turn SIGTERM/SIGUSR1 into "save at the next step boundary, then leave".

Slurm sends SIGTERM before it stops a job (and a configurable signal before its time limit);
torchrun forwards SIGTERM to its workers. Stopping in the middle of an optimizer step or a save
would lose or damage work, so the handler only records the request; the training loop checks
`requested` between steps, saves a checkpoint and calls `leave()`. The other stages (valid,
evaluate, generate) check it between batches (`StandardSolver.check_stop`, which raises
`StopRequested`): the run then saves the finished train stage and leaves within seconds.

`leave()` hands the signal to the handler that was installed before ours, if any: under
submitit (Dora's Slurm launcher) that is the handler which requeues the job, so the job comes
back and resumes from the checkpoint just saved. Otherwise it exits with 128 + the signal number
(143 for SIGTERM), the code of a process stopped by that signal, which schedulers and `dora grid`
report as interrupted rather than done.
"""

from __future__ import annotations

import logging
import signal
import sys
import types
import typing as tp

from . import distrib

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """Raised between batches of valid/evaluate/generate when a preemption signal asks to stop."""


class PreemptionHandler:
    """Install with `with PreemptionHandler() as stop:`; check `stop.requested` between steps."""

    def __init__(self, signals: tp.Sequence[signal.Signals] = SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, tp.Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
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
        previous = self._previous.get(sig)
        self.__exit__()
        if callable(previous):
            logger.info("Passing %s on to the previous handler (e.g. submitit's requeue).", sig.name)
            previous(sig, None)
        logger.info("Stopped by %s after saving; rerun the same command to resume.", sig.name)
        sys.exit(128 + sig)
