"""Dora on a real Slurm: `dora launch` and `dora grid` of CPU jobs, requests the partition cannot
hold, job states without accounting, and jobs stopped by Slurm (requeue, preemption, the signal
before a time limit) that save, come back and end as a run left alone.

The cluster is the one-node Slurm of scripts/slurm_local.sh (started here if SLURM_CONF does not
name a running one, and stopped at the end; the tests skip with the reason where it cannot start).
Nothing is mocked: jobs are real sbatch jobs of the regression solver on this machine's CPUs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import typing as tp
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import REGRESSION, SOLVER, assert_same_run, dora_env, history, run_dora, run_xp, xp_folder

pytestmark = [pytest.mark.slurm, pytest.mark.integration]
CPU = (*REGRESSION, 'slurm.gpus=0')
# 96 steps of ~10 ms per epoch, 2 epochs (as in test_reliability): long enough to stop mid-run.
EXACT = (*CPU, 'model.hidden_size=512', 'dataset.dim=256', 'dataset.batch_size=256',
         'dataset.train_size=24576', 'dataset.eval_size=256', 'optim.epochs=2', 'optim.lr=1e-3')
FINAL = ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'OUT_OF_MEMORY', 'NODE_FAIL', 'BOOT_FAIL', 'DEADLINE')


# -- the cluster and its jobs ---------------------------------------------------------------------

def squeue(job: str, field: str = '%T') -> str:
    out = subprocess.run(['squeue', '-h', '-t', 'all', '-j', job, '-o', field], capture_output=True, text=True)
    return out.stdout.strip()


def wait_state(job: str, states: tuple[str, ...], timeout: float = 120) -> str:
    """Poll squeue until job `job` is in one of `states`; its state."""
    deadline = time.monotonic() + timeout
    while (state := squeue(job)) not in states:
        assert time.monotonic() < deadline, f"job {job} still {state or 'unknown'} after {timeout}s"
        time.sleep(0.2)
    return state



def release_requeued(job: str, timeout: float = 60) -> float:
    """Wait until Slurm has requeued `job`, then let it start now: Slurm holds a requeued batch
    job for two minutes (Reason=BeginTime). The moment of the requeue (monotonic)."""
    deadline = time.monotonic() + timeout
    while not (squeue(job) == 'PENDING' and squeue(job, '%r') == 'BeginTime'):
        assert time.monotonic() < deadline, f"job {job} not requeued after {timeout}s: {squeue(job)}"
        time.sleep(0.05)
    requeued = time.monotonic()
    # slurmd refuses a credential made in the same second as the kill that revoked the job's last one
    # ("Killing non-startable batch JobId=N: Job credential revoked": it compares whole seconds), so a
    # release within that second fails the job. Wait for the next second but one.
    time.sleep(2)
    subprocess.run(['scontrol', 'update', f'jobid={job}', 'StartTime=now'], check=True)
    return requeued


def job_id(output: str) -> str:
    match = re.search(r'Scheduled job (\d+)', output)
    assert match, output
    return match.group(1)


def job_log(folder: Path, job: str) -> str:
    return re.sub(r'\x1b\[[0-9;]*m', '', (folder / 'submitit' / f'{job}_0_log.out').read_text())


def sbatch_flags(folder: Path) -> set[str]:
    script = next((folder / 'submitit').glob('*_submission.sh')).read_text()
    return set(re.findall(r'^#SBATCH (\S+)', script, re.M))


def wait_for_log(folder: Path, job: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (folder / 'submitit' / f'{job}_0_log.out').exists() or text not in job_log(folder, job):
        assert squeue(job) not in FINAL, f"job {job} ended before {text!r}:\n{job_log(folder, job)[-6000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in job {job}'s log after {timeout}s"
        time.sleep(0.05)


@pytest.fixture(scope='session')
def slurm(tmp_path_factory) -> tp.Iterator[str]:
    """A running Slurm: the one SLURM_CONF names, else one started by scripts/slurm_local.sh
    (stopped at the end); skip where neither answers."""
    def answers() -> bool:
        try:
            return subprocess.run(['sinfo', '-h', '-o', '%t'], capture_output=True, text=True,
                                  timeout=10).stdout.strip() in ('idle', 'mix', 'alloc')
        except (OSError, subprocess.SubprocessError):
            return False

    if os.environ.get('SLURM_CONF') and answers():
        yield os.environ['SLURM_CONF']
        return
    script = Path(__file__).resolve().parents[1] / 'scripts' / 'slurm_local.sh'
    start = subprocess.run(['bash', str(script), 'start'], capture_output=True, text=True, timeout=600)
    line = start.stdout.strip().splitlines()[-1] if start.stdout.strip() else ''
    if start.returncode != 0 or not line.startswith('export SLURM_CONF='):
        pytest.skip(f"no Slurm: scripts/slurm_local.sh start failed: {start.stderr.strip()[-300:]}")
    os.environ['SLURM_CONF'] = line.split('=', 1)[1]
    try:
        yield os.environ['SLURM_CONF']
    finally:
        subprocess.run(['bash', str(script), 'stop'], capture_output=True, timeout=120)



def launch(dora_dir: Path, *overrides: str) -> SimpleNamespace:
    """`dora launch --no_tail <overrides>`: the job id and the experiment's folder."""
    code, output = run_dora_cmd(dora_dir, 'launch', '--no_tail', *overrides)
    assert code == 0, output
    return SimpleNamespace(job=job_id(output), folder=xp_folder(dora_dir, *overrides), output=output)


def run_dora_cmd(dora_dir: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    return run_dora(dora_dir, *args, timeout=timeout)


# -- launching ------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def launched(slurm, tmp_path_factory) -> SimpleNamespace:
    """A CPU job of the regression solver by `dora launch`, with its request set on the command
    line, run to its end; and the same experiment by `dora run`."""
    dora_dir = tmp_path_factory.mktemp('launch') / 'dora'
    job = launch(dora_dir, *CPU, 'slurm.cpu.mem_per_task=1.5', 'slurm.time=30')
    job.state = wait_state(job.job, FINAL)
    job.reference = run_xp(tmp_path_factory.mktemp('launch_ref') / 'dora', *CPU).folder
    job.dora_dir = dora_dir
    return job


def test_a_launched_cpu_job_asks_the_cpus_memory_and_time_of_its_config(launched):
    flags = sbatch_flags(launched.folder)
    assert {'--nodes=1', '--ntasks-per-node=1', '--cpus-per-task=1', '--mem=1536MB', '--time=30'} <= flags
    assert not any(flag.startswith('--gres') for flag in flags), flags


def test_a_launched_job_ends_with_the_folder_and_weights_of_dora_run(launched):
    assert launched.state == 'COMPLETED', job_log(launched.folder, launched.job)
    assert_same_run(launched.folder, launched.reference)
    ours = {p.name for p in launched.folder.iterdir()} - {'submitit', 'job.pkl', 'latest'}
    assert ours == {p.name for p in launched.reference.iterdir()}


def test_solver_ls_and_show_name_the_job_and_its_state(launched):
    env = dora_env(launched.dora_dir)
    ls = subprocess.run([*SOLVER, 'ls'], env=env, capture_output=True, text=True)
    assert re.search(rf'{launched.folder.name} .* complete\s+{launched.job} COMPLETED ', ls.stdout), ls.stdout
    show = subprocess.run([*SOLVER, 'show', launched.folder.name], env=env, capture_output=True, text=True)
    assert f"slurm job {launched.job}: COMPLETED" in show.stdout, show.stdout + show.stderr


def test_without_accounting_job_states_come_from_squeue_without_a_warning(launched, caplog):
    from submitit.slurm.slurm import SlurmInfoWatcher

    from solver.slurm import SqueueWatcher
    assert subprocess.run(['sacct', '-j', launched.job], capture_output=True).returncode != 0  # no accounting
    for watcher in (SlurmInfoWatcher(), SqueueWatcher()):
        for _ in range(3):
            time.sleep(0.01)  # a forced poll within 1 ms of the last is skipped
            watcher.get_state(launched.job, mode='force')
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 3 and all('sacct' in w for w in warnings)  # submitit's own: one per poll
    assert watcher.get_state(launched.job, mode='force') == 'COMPLETED'


def test_a_request_the_partition_cannot_hold_is_refused_in_one_line_before_submitting(slurm, tmp_path):
    dora_dir = tmp_path / 'dora'
    for overrides, what in [(('slurm.cpu.cpus_per_task=64',), 'CPUs'), (('slurm.cpu.mem_per_task=100000',), 'memory'),
                            (('slurm.gpus=1',), 'CPUs, memory, GPUs')]:
        code, output = run_dora_cmd(dora_dir, 'launch', '--no_tail', *CPU, *overrides)
        assert code == 1, output
        error = [line for line in output.splitlines() if line.startswith('error:')]
        assert len(error) == 1 and f"Slurm cannot run this job ({what})" in error[0], output
        assert "partition 'debug' has 1 node(s) of at most" in error[0] and 'Traceback' not in output
        assert 'Scheduled job' not in output


def test_dora_grid_runs_a_small_grid_to_completion_and_stops_following_it(slurm, tmp_path):
    dora_dir = tmp_path / 'dora'
    code, output = run_dora_cmd(dora_dir, 'grid', 'regression_slurm', '--interval', '0.02', timeout=180)
    assert code == 0, output
    assert 'Bypassing sacct error' not in output
    folders = sorted((dora_dir / 'grids' / 'regression_slurm').iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert len(history(folder)) == 3 and (folder / 'checkpoint.th').is_file()
        assert {'--cpus-per-task=1', '--mem=2048MB', '--time=10'} <= sbatch_flags(folder)


# -- stopped by Slurm, requeued, resumed ---------------------------------------------------------

@pytest.fixture(scope='module')
def exact_reference(tmp_path_factory) -> Path:
    return run_xp(tmp_path_factory.mktemp('slurm_reference') / 'dora', *EXACT).folder


def stop_and_resume(dora_dir: Path, stop: tp.Callable[[str], None], *extra: str) -> SimpleNamespace:
    """Launch an EXACT job, stop it with `stop(job)` early in epoch 2, let the requeued job start
    at once, wait for its end. The log, final state, and the moments measured."""
    job = launch(dora_dir, *EXACT, *extra)
    wait_for_log(job.folder, job.job, 'Train | epoch 2 | 8/96')
    signalled = time.monotonic()
    stop(job.job)
    wait_for_log(job.folder, job.job, 'Passing ')  # after the save, before submitit's requeue
    saved = time.monotonic()
    requeued = release_requeued(job.job)
    wait_for_log(job.folder, job.job, 'Resuming the train stage at step')
    resumed = time.monotonic()
    job.state = wait_state(job.job, FINAL)
    job.log = job_log(job.folder, job.job)
    job.seconds = {'signal to saved': saved - signalled, 'requeue to resumed': resumed - requeued}
    print(f"job {job.job}: " + ', '.join(f"{k} {v:.2f}s" for k, v in job.seconds.items()))
    return job


@pytest.mark.parametrize('how', ['scontrol requeue', 'scancel --signal USR2', 'preempted'])
def test_a_job_stopped_by_slurm_saves_is_requeued_and_ends_as_a_run_left_alone(slurm, tmp_path, exact_reference, how):
    def stop(job: str) -> None:
        if how == 'scontrol requeue':
            subprocess.run(['scontrol', 'requeue', job], check=True)
        elif how == 'preempted':  # what submitit's own tests send: SIGTERM, then the time signal
            subprocess.run(['scancel', '--signal', 'TERM', job], check=True)
            subprocess.run(['scancel', '--signal', 'USR2', job], check=True)
        else:
            subprocess.run(['scancel', '--signal', 'USR2', job], check=True)

    job = stop_and_resume(tmp_path / 'dora', stop, 'slurm.time=5')
    assert job.state == 'COMPLETED', job.log
    saved = re.search(r'Checkpoint checkpoint\.th \(epoch 1, step (\d+)\)', job.log.split('Received SIG', 1)[1])
    assert saved and 96 < int(saved.group(1)) < 192, job.log
    assert f'Resuming the train stage at step {int(saved.group(1)) - 96} of 96.' in job.log
    assert 'started again after 1 requeue(s)' in job.log
    if how != 'scontrol requeue':  # submitit requeued it, and counted it: time=5 min is a time limit
        assert re.search(r'Requeued job \d+ \(19 remaining timeouts\)', job.log), job.log
    assert_same_run(job.folder, exact_reference)


def test_a_job_past_max_num_timeout_is_not_requeued_again(slurm, tmp_path):
    job = launch(tmp_path / 'dora', *EXACT, 'slurm.time=5', 'slurm.max_num_timeout=0')
    wait_for_log(job.folder, job.job, 'Train | epoch 2 | 8/96')
    subprocess.run(['scancel', '--signal', 'USR2', job.job], check=True)
    assert wait_state(job.job, FINAL) == 'FAILED'
    log = job_log(job.folder, job.job)
    assert 'Job not requeued because: timed-out too many times.' in log
    assert re.search(r'Checkpoint checkpoint\.th \(epoch 1, step \d+\)', log.split('Received SIGUSR2')[1])


@pytest.mark.slow  # about 90 s; CI covers the same signal and handler with `scancel --signal USR2` above
def test_a_job_reaching_its_time_limit_saves_is_requeued_and_resumes(slurm, tmp_path):
    """slurm.time=2 with the signal 95 s before: Slurm itself signals the job 25-55 s after it
    starts (slurmctld looks at time limits every 30 s); the job saves and submitit requeues it,
    counting a timeout. The requeued job is given 10 minutes, so that it finishes."""
    overrides = (*EXACT[:-2], 'optim.epochs=60', 'slurm.time=2', 'slurm.signal_delay_s=95')
    job = launch(tmp_path / 'dora', *overrides)
    release_requeued(job.job, timeout=150)
    subprocess.run(['scontrol', 'update', f'jobid={job.job}', 'TimeLimit=10'], check=True)
    state = wait_state(job.job, FINAL, timeout=240)
    log = job_log(job.folder, job.job)
    assert state == 'COMPLETED', log
    assert 'Caught signal SIGUSR2 on vm: this job is timed-out.' in log or 'this job is timed-out' in log
    assert re.search(r'\[submitit\]\[INFO\] - Requeued job \d+ \(19 remaining timeouts\)', log), log
    saved = re.search(r'Checkpoint checkpoint\.th \(epoch \d+, step (\d+)\)', log.split('Received SIGUSR2', 1)[1])
    assert saved and 'started again after 1 requeue(s)' in log
    assert f'Resuming the train stage at step {int(saved.group(1)) % 96} of 96.' in log or int(saved.group(1)) % 96 == 0
    assert len(history(job.folder)) == 60


# -- several tasks ---------------------------------------------------------------------------------

@pytest.mark.slow  # CI time: DDP and FSDP themselves are tested in test_distributed; `-m slurm` runs these
def test_a_two_task_job_trains_with_ddp_and_a_one_task_rerun_resumes_its_checkpoint(slurm, tmp_path):
    dora_dir = tmp_path / 'dora'
    job = launch(dora_dir, *CPU, 'slurm.cpu.tasks=2')
    assert wait_state(job.job, FINAL) == 'COMPLETED', job_log(job.folder, job.job)
    assert '--ntasks-per-node=2' in sbatch_flags(job.folder)
    assert 'Distributed: rank 0 of 2 (local rank 0, from submitit), backend gloo' in job_log(job.folder, job.job)
    assert len(history(job.folder)) == 3 and sorted(p.name for p in job.folder.glob('checkpoint*')) == ['checkpoint.th']
    # The same experiment again (-D: replace the completed job), as one task: it resumes the checkpoint.
    code, output = run_dora_cmd(dora_dir, 'launch', '--no_tail', '-D', *CPU, 'slurm.cpu.tasks=1')
    assert code == 0, output
    rerun = job_id(output)
    assert wait_state(rerun, FINAL) == 'COMPLETED'
    log = job_log(job.folder, rerun)
    assert f"Resumed from {job.folder / 'checkpoint.th'} (epoch 3, step 48)" in log and 'Distributed:' not in log


@pytest.mark.slow
def test_a_two_task_fsdp_job_writes_a_sharded_checkpoint(slurm, tmp_path):
    job = launch(tmp_path / 'dora', *CPU, 'slurm.cpu.tasks=2', 'fsdp.use=true', 'optim.epochs=1')
    assert wait_state(job.job, FINAL) == 'COMPLETED', job_log(job.folder, job.job)
    folders = list(job.folder.glob('checkpoint.th.dcp.*'))
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == [
        '.metadata', '__0_0.distcp', '__1_0.distcp']


@pytest.mark.slow
def test_a_two_task_job_signalled_saves_is_requeued_by_rank_0_and_resumes(slurm, tmp_path):
    def stop(job: str) -> None:
        subprocess.run(['scancel', '--signal', 'USR2', job], check=True)

    job = stop_and_resume(tmp_path / 'dora', stop, 'slurm.time=5', 'slurm.cpu.tasks=2')
    assert job.state == 'COMPLETED', job.log
    assert 'started again after 1 requeue(s)' in job.log and len(history(job.folder)) == 2
    assert 'waiting for rank 0 to requeue the Slurm job' in job_log_of_rank(job.folder, job.job, 1)


def job_log_of_rank(folder: Path, job: str, rank: int) -> str:
    return re.sub(r'\x1b\[[0-9;]*m', '', (folder / 'submitit' / f'{job}_{rank}_log.out').read_text())
