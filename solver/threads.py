"""torch's intra-op threads for a run, and a warning when the machine is too busy for them.

`num_threads: null` keeps torch's default, one thread per core: the fastest on cores of one's own
(the drum RNN on 2 quiet cores: 2 threads 1.3 to 1.9 times the steps/s of one). On cores that other
processes keep busy, the same threads can run several times *slower* than one: at each of the many
small parallel regions of a step (the LSTM's per-time-step matmuls), libgomp's threads spin while
they wait for each other, and a thread whose core is taken makes the others spin for its whole time
slice (measured 3 to 7 times slower, README "The default run and the machine"). The wait policy
is read when torch loads OpenMP, before any of a project's code runs under `dora run`, so it cannot
be changed from here: `OMP_WAIT_POLICY=PASSIVE` in the environment, or `num_threads=1`, is the way
out, and `warn_if_busy` says so when it sees the case at the start of a run.
"""

from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger(__name__)
SAMPLE_SECONDS = 0.2  # how long the CPU use of other processes is measured at the start


def apply(num_threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave torch's default) and return how many there are."""
    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def busy_cpus(seconds: float = SAMPLE_SECONDS) -> float | None:
    """CPUs that other processes kept busy over the next `seconds` (from /proc/stat, less this
    process's own CPU time), or None where /proc/stat cannot be read (not Linux)."""
    try:
        busy0, own0, wall0 = cpu_times()
        time.sleep(seconds)
        busy1, own1, wall1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-6)


def cpu_times() -> tuple[float, float, float]:
    """(CPU seconds the whole machine has been busy, this process's CPU seconds, a wall clock)."""
    with open('/proc/stat') as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK'), time.process_time(), time.monotonic()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, e.g. a Slurm allocation), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def warn_if_busy(threads: int, busy: float | None = None, cpus: int | None = None) -> str | None:
    """With more than one thread and libgomp's default (spinning) wait, warn when other processes
    leave fewer free CPUs than threads; return the warning (None when there is none)."""
    if threads < 2 or os.environ.get('OMP_WAIT_POLICY'):
        return None
    busy = busy_cpus() if busy is None else busy
    cpus = usable_cpus() if cpus is None else cpus
    if busy is None or cpus - busy >= threads - 0.5:
        return None
    message = (f"Other processes keep {busy:.1f} of this machine's {cpus} CPUs busy, and torch runs {threads} "
               f"threads that spin while they wait for each other: a step can be several times slower than "
               f"with one thread. Rerun with num_threads=1 (or OMP_WAIT_POLICY=PASSIVE in the environment) "
               f"if the steps/s below are low.")
    logger.warning("%s", message)
    return message
