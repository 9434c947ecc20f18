"""Slurm through Dora: what a job asks for, checked against the partition, and job states without
Slurm's accounting.

Dora builds a job's request from its `SlurmConfig` as if every job had GPUs: with `slurm.gpus=0`
it asks `--ntasks-per-node=0 --mem=0GB --cpus-per-task=10 --gres=gpu:0`, which sbatch refuses (or
which would take the node's whole memory). It reads that config from the defaults only, so an
override such as `slurm.time=60` on the command line or in a grid changes nothing. And submitit
asks `sacct` for job states, which fails on a cluster without accounting. `install(main)`, called
by solver/train.py, adjusts the three where Dora and submitit leave a hook:

- `main.get_slurm_config` returns a `SlurmConfig` with the CPU keys (`slurm.cpu.*`) and
  `signal_delay_s` beside Dora's own;
- `Shepherd.maybe_submit_lazy` sizes each experiment's job from that experiment's config (the
  defaults, its solver config, its overrides from the command line or the grid), then applies
  what Dora's flags (`-g`, `-p`) or the grid's `launcher.slurm_()` changed;
- `Shepherd._get_submitit_executor` builds CPU jobs itself (`slurm.gpus=0`: `slurm.cpu.tasks`
  tasks of `slurm.cpu.cpus_per_task` CPUs and `slurm.cpu.mem_per_task` GB each), leaves GPU jobs
  to Dora, and stops with one line when the partition cannot hold the request;
- `submitit.SlurmJob.watcher` becomes a `SqueueWatcher`: sacct while it works, then squeue.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import typing as tp
from pathlib import Path

import dora.conf
import submitit
from dora.shep import Shepherd
from omegaconf import DictConfig
from submitit.slurm.slurm import SlurmInfoWatcher

logger = logging.getLogger(__name__)
KEYS_HINT = ("slurm.cpu.tasks / slurm.cpu.cpus_per_task / slurm.cpu.mem_per_task for a CPU job (slurm.gpus=0), "
             "slurm.gpus / slurm.cpus_per_gpu / slurm.mem_per_gpu for a GPU job, slurm.time, slurm.partition")


def _default_cpu() -> dict[str, tp.Any]:
    return {'tasks': 1, 'cpus_per_task': 1, 'mem_per_task': 2}


@dataclasses.dataclass
class SlurmConfig(dora.conf.SlurmConfig):
    """Dora's SlurmConfig and what a CPU job needs (`cpu`), plus the time between Slurm's signal
    and the time limit (`signal_delay_s`, submitit's default 90 s). See config/base.yaml."""
    cpu: dict[str, tp.Any] = dataclasses.field(default_factory=_default_cpu)
    signal_delay_s: int = 90


class SlurmRequestError(Exception):
    """The partition cannot hold what the job asks (the message names both)."""


def config_of(section: DictConfig | None) -> SlurmConfig:
    """A SlurmConfig from a config's `slurm:` section (unknown keys are an error, as in Dora)."""
    config = SlurmConfig()
    if section is not None:
        dora.conf.update_from_hydra(config, section)
        config.cpu = {**_default_cpu(), **config.cpu}
    return config


def for_xp(xp_slurm: DictConfig | None, given: SlurmConfig, default: SlurmConfig) -> SlurmConfig:
    """The request of one experiment: its own `slurm:` section (defaults, solver config, its
    overrides), then each field `given` changed from `default` (Dora's flags, `launcher.slurm_()`)."""
    config = config_of(xp_slurm)
    for field in dataclasses.fields(SlurmConfig):
        value = getattr(given, field.name, None)
        if value != getattr(default, field.name):
            setattr(config, field.name, value)
    return config


def cpu_parameters(config: SlurmConfig) -> dict[str, tp.Any]:
    """submitit's sbatch parameters of a CPU job: one node, `cpu.tasks` tasks."""
    cpu = config.cpu
    tasks, cpus, mem_gb = int(cpu['tasks']), int(cpu['cpus_per_task']), float(cpu['mem_per_task'])
    if tasks < 1 or cpus < 1 or mem_gb <= 0:
        raise SlurmRequestError(f"slurm.cpu asks {tasks} task(s) of {cpus} CPU(s) and {mem_gb} GB each: "
                                "each must be at least 1 (memory above 0).")
    params: dict[str, tp.Any] = {'nodes': 1, 'ntasks_per_node': tasks, 'cpus_per_task': cpus,
                                 'mem': f"{max(1, round(tasks * mem_gb * 1024))}MB", 'time': config.time}
    for key in ('partition', 'comment', 'setup', 'constraint', 'exclude', 'qos', 'account', 'array_parallelism'):
        value = getattr(config, key)
        if value not in (None, '', []):
            params[key] = value
    return params


# -- the partition's limits -----------------------------------------------------------------------

@dataclasses.dataclass
class Partition:
    name: str
    nodes: int
    cpus: int              # the most CPUs of one node
    mem_mb: int            # the most memory of one node
    gpus: int              # the most GPUs of one node
    time_min: float        # the partition's time limit (inf: none)


def _minutes(text: str) -> float:
    """Slurm's time format ([days-]hours:minutes:seconds, minutes:seconds, infinite) in minutes."""
    if text.strip().lower() in ('infinite', 'unlimited', 'n/a', ''):
        return float('inf')
    days, _, rest = text.rpartition('-')
    parts = [int(p) for p in rest.split(':')]
    seconds = {1: lambda: parts[0] * 60, 2: lambda: parts[0] * 60 + parts[1],
               3: lambda: parts[0] * 3600 + parts[1] * 60 + parts[2]}[len(parts)]()
    return (int(days or 0) * 86400 + seconds) / 60


def _gpus(gres: str) -> int:
    """GPUs in a node's gres string (`gpu:8`, `gpu:a100:4(S:0-1)`, `(null)`)."""
    total = 0
    for item in gres.split(','):
        match = re.match(r'gpu(?::[^:(]+)?:(\d+)', item.strip())
        if match:
            total += int(match.group(1))
    return total


def partition(name: str | None) -> Partition | None:
    """The limits of partition `name` (None: the default one) from sinfo, or None where sinfo
    cannot tell (not a Slurm machine, an unknown partition: sbatch will say)."""
    args = ['sinfo', '-h', '-N', '-o', '%P|%c|%m|%G|%l']
    try:
        out = subprocess.run(args + (['-p', name] if name else []), capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split('|') for line in out.splitlines() if line.count('|') == 4]
    if not name:
        rows = [r for r in rows if r[0].endswith('*')]
    if not rows:
        return None
    return Partition(name=rows[0][0].rstrip('*'), nodes=len(rows),
                     cpus=max(int(r[1].rstrip('+')) for r in rows), mem_mb=max(int(r[2].rstrip('+')) for r in rows),
                     gpus=max(_gpus(r[3]) for r in rows), time_min=_minutes(rows[0][4]))


def _mem_mb(mem: str) -> int:
    match = re.fullmatch(r'(\d+(?:\.\d+)?)\s*([KMGT]?)B?', str(mem).strip().upper())
    if not match:
        return 0
    return int(float(match.group(1)) * {'K': 1 / 1024, '': 1, 'M': 1, 'G': 1024, 'T': 1024 ** 2}[match.group(2)])


def check_request(params: dict[str, tp.Any], part: Partition | None) -> None:
    """Raise SlurmRequestError, in one line naming the request and the partition's limits, when
    the partition cannot run a job with sbatch parameters `params` (submitit's names)."""
    if part is None:
        return
    nodes, tasks = int(params.get('nodes', 1)), int(params.get('ntasks_per_node', 1))
    cpus = tasks * int(params.get('cpus_per_task', 1))
    mem = _mem_mb(params.get('mem', '0'))
    gpus = _gpus(str(params.get('gres', '')))
    time_min = float(params.get('time', 0))
    problems = [what for what, bad in (('nodes', nodes > part.nodes), ('CPUs', cpus > part.cpus),
                                       ('memory', mem > part.mem_mb), ('GPUs', gpus > part.gpus),
                                       ('time', time_min > part.time_min)) if bad]
    if problems:
        limit = 'no time limit' if part.time_min == float('inf') else f"{part.time_min:g} min"
        raise SlurmRequestError(
            f"Slurm cannot run this job ({', '.join(problems)}): it asks {nodes} node(s) with {tasks} task(s), "
            f"{cpus} CPU(s), {mem / 1024:.3g} GB and {gpus} GPU(s) per node for {time_min:g} min; partition "
            f"'{part.name}' has {part.nodes} node(s) of at most {part.cpus} CPUs, {part.mem_mb / 1024:.3g} GB "
            f"and {part.gpus} GPUs, {limit}. Set {KEYS_HINT}.")


# -- job states without accounting ----------------------------------------------------------------

class SqueueWatcher(SlurmInfoWatcher):
    """submitit's watcher, asking squeue where sacct does not answer (Slurm without accounting).

    sacct is tried first; if it fails, this process uses squeue from then on (said once, in the
    debug log) instead of warning on every poll. squeue knows a finished job for `MinJobAge`
    seconds (Slurm's default 300); a job it has forgotten keeps the state last seen, or UNKNOWN.
    """

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s)
        self.use_sacct = True

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None or self.use_sacct:
            return command
        return ['squeue', '--me', '-h', '-t', 'all', '-o', '%i|%T|%N']

    def update(self) -> None:
        if self.use_sacct and self._make_command() is not None:
            try:
                subprocess.run(['sacct', '-n', '-X', '-j', '1'], capture_output=True, timeout=30, check=True)
            except (OSError, subprocess.SubprocessError):
                logger.debug("sacct does not answer (no accounting): job states come from squeue.")
                self.use_sacct = False
        super().update()

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if self.use_sacct:
            return super().read_info(string)
        text = string.decode() if isinstance(string, bytes) else string
        return super().read_info('JobID|State|NodeList\n' + text)


def job_states(ids: tp.Iterable[str]) -> dict[str, str]:
    """The state of each Slurm job in `ids` that Slurm knows, asked once ({} without Slurm)."""
    watcher = SqueueWatcher()
    for job_id in ids:
        watcher.register_job(job_id)
    try:
        watcher.update()
    except Exception:  # noqa: BLE001 - a state is a courtesy of `solver ls`, never its failure
        return {}
    return {job_id: info['State'] for job_id, info in watcher._info_dict.items() if info.get('State')}


# -- installing into Dora -------------------------------------------------------------------------

def install(main: tp.Any) -> None:
    """Make Dora's launch and grid commands use the above for the experiments of `main`."""
    def get_slurm_config() -> SlurmConfig:
        return config_of(main._base_cfg.get('slurm'))

    main.get_slurm_config = get_slurm_config
    if getattr(Shepherd, '_solver_installed', False):
        return
    dora_submit_lazy = Shepherd.maybe_submit_lazy
    dora_executor = Shepherd._get_submitit_executor

    def maybe_submit_lazy(self: Shepherd, sheep: tp.Any, slurm_config: tp.Any, rules: tp.Any) -> None:
        if isinstance(slurm_config, SlurmConfig):
            slurm_config = for_xp(sheep.xp.cfg.get('slurm'), slurm_config, get_slurm_config())
        dora_submit_lazy(self, sheep, slurm_config, rules)

    def get_executor(self: Shepherd, name: str, folder: Path, slurm_config: tp.Any) -> submitit.SlurmExecutor:
        if not isinstance(slurm_config, SlurmConfig):
            return dora_executor(self, name, folder, slurm_config)
        config = slurm_config
        try:
            if config.gpus > 0:
                plain = dora.conf.SlurmConfig(**{f.name: getattr(config, f.name)
                                                 for f in dataclasses.fields(dora.conf.SlurmConfig)})
                executor = dora_executor(self, name, folder, plain)
            else:
                os.environ['SLURM_KILL_BAD_EXIT'] = '1'  # as Dora: a failing task ends the job
                executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=config.max_num_timeout)
                executor.update_parameters(job_name=name, stderr_to_stdout=True, **cpu_parameters(config))
            executor.update_parameters(signal_delay_s=config.signal_delay_s)
            check_request(executor.parameters, partition(executor.parameters.get('partition')))
        except SlurmRequestError as err:
            sys.exit(f"error: {err}")
        return executor

    Shepherd.maybe_submit_lazy = maybe_submit_lazy  # type: ignore[method-assign]
    Shepherd._get_submitit_executor = get_executor  # type: ignore[method-assign]
    Shepherd._solver_installed = True  # type: ignore[attr-defined]
    submitit.SlurmJob.watcher = SqueueWatcher(delay_s=600)  # submitit's own delay


def restart_count() -> int:
    """How many times Slurm has started this job before (requeues), 0 outside Slurm."""
    return int(os.environ.get('SLURM_RESTART_COUNT') or 0)


def log_job() -> None:
    """One line naming the Slurm job this process runs in, and its requeues so far."""
    job = os.environ.get('SLURM_JOB_ID')
    if not job:
        return
    restarts = restart_count()
    if restarts:
        logger.warning("Slurm job %s, started again after %d requeue(s): resuming from the newest checkpoint.",
                       job, restarts)
    else:
        logger.info("Slurm job %s (%s task(s) on %s).", job, os.environ.get('SLURM_NTASKS', '?'),
                    os.environ.get('SLURM_JOB_NODELIST', '?'))
