"""Preemption: turn SIGTERM/SIGUSR1 into "save at the next step boundary, then leave".

Slurm sends SIGTERM before it stops a job (and a configurable signal before its time limit);
torchrun forwards SIGTERM to its workers. Stopping in the middle of an optimizer step or a save
would lose or damage work, so the handler only records the request; the training loop checks
`requested` between steps, saves a checkpoint and calls `leave()`.

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

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
