"""What a Slurm job asks for, without a cluster: the CPU request built from `slurm.cpu`, the
per-experiment merge of `slurm.*`, and the check against a partition's limits (tests/test_slurm.py
runs the same against a real Slurm)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from solver import slurm

DEBUG = slurm.Partition(name='debug', nodes=1, cpus=2, mem_mb=23895, gpus=0, time_min=float('inf'))


def test_a_cpu_job_asks_its_tasks_cpus_and_memory_on_one_node_and_no_gpu():
    config = slurm.config_of(OmegaConf.create({'gpus': 0, 'time': 30, 'partition': None,
                                               'cpu': {'tasks': 2, 'mem_per_task': 1.5}}))
    params = slurm.cpu_parameters(config)
    assert params == {'nodes': 1, 'ntasks_per_node': 2, 'cpus_per_task': 1, 'mem': '3072MB', 'time': 30,
                      'array_parallelism': 256}
    slurm.check_request(params, DEBUG)


def test_an_experiments_own_slurm_overrides_apply_and_dora_flags_win_over_them():
    default = slurm.config_of(OmegaConf.create({'gpus': 1, 'time': 1440}))
    given = slurm.config_of(OmegaConf.create({'gpus': 1, 'time': 1440, 'partition': 'big'}))  # `-p big`
    xp = OmegaConf.create({'gpus': 0, 'time': 60, 'partition': 'small', 'cpu': {'cpus_per_task': 4}})
    config = slurm.for_xp(xp, given, default)
    assert (config.gpus, config.time, config.partition, config.cpu['cpus_per_task'], config.cpu['tasks']) == \
        (0, 60, 'big', 4, 1)


@pytest.mark.parametrize('params, what', [
    ({'nodes': 1, 'ntasks_per_node': 1, 'cpus_per_task': 10, 'mem': '40GB', 'gres': 'gpu:1', 'time': 1440},
     'CPUs, memory, GPUs'),
    ({'nodes': 2, 'ntasks_per_node': 1, 'cpus_per_task': 1, 'mem': '1GB', 'time': 10}, 'nodes'),
])
def test_a_request_over_the_partitions_limits_is_one_line_naming_both(params, what):
    with pytest.raises(slurm.SlurmRequestError) as err:
        slurm.check_request(params, DEBUG)
    message = str(err.value)
    assert message.startswith(f"Slurm cannot run this job ({what}): it asks ") and '\n' not in message
    assert "partition 'debug' has 1 node(s) of at most 2 CPUs, 23.3 GB and 0 GPUs, no time limit" in message


def test_a_time_over_the_partitions_limit_is_refused():
    part = slurm.Partition('short', 4, 64, 256000, 8, slurm._minutes('1-00:00:00'))
    with pytest.raises(slurm.SlurmRequestError, match=r'\(time\).*1440 min'):
        slurm.check_request({'nodes': 1, 'time': 2880}, part)
    assert slurm._minutes('30:00') == 30 and slurm._minutes('2:00:00') == 120
    assert slurm._gpus('gpu:a100:4(S:0-1),gpu:2') == 6 and slurm._gpus('(null)') == 0
