"""Where the start of a run goes: the time from process start to the first training step, by phase.

Each phase is closed by a call to `reached(name)`: the time since the previous call (or since the
process started) is added to `name`, so the phases always sum to the whole. The entry point
closes 'imports' and 'config', the StandardSolver 'data', 'model', 'state' and 'staging' and,
after its first optimizer step, 'first step', which logs one line:

    Startup: 5.84 s from process start to the first training step: imports 3.12 s, config 0.61 s, ...

(what a resume or a rollback costs before it trains; `scripts/bench_restart.py` reads it). The
process start is the kernel's (/proc/self/stat), so the interpreter's own start-up and the
imports before any of ours are counted; where it cannot be read, the clock starts when this
module is first imported.
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)
LINE_PREFIX = 'Startup: '  # what scripts/bench_restart.py looks for in the log


def _process_start() -> float:
    """The process's start on the `time.monotonic` clock (Linux: /proc), else now."""
    now = time.monotonic()
    try:
        with open('/proc/self/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()  # after the command name, which may hold spaces
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0 <= age < 3600 else now  # a clock we cannot make sense of: count from here


_last = _process_start()
_phases: dict[str, float] = {}
_done = False


def reached(name: str) -> None:
    """Add the time since the previous call (or the process start) to phase `name`."""
    global _last
    now = time.monotonic()
    _phases[name] = _phases.get(name, 0.0) + now - _last
    _last = now


def phases() -> dict[str, float]:
    """Seconds spent in each phase closed so far, in the order they were first closed."""
    return dict(_phases)


def first_step() -> None:
    """Close 'first step' and log the breakdown, once per process (later calls do nothing)."""
    global _done
    if _done:
        return
    _done = True
    reached('first step')
    parts = ', '.join(f"{name} {seconds:.2f} s" for name, seconds in _phases.items())
    logger.info("%s%.2f s from process start to the first training step: %s.", LINE_PREFIX,
                sum(_phases.values()), parts)
