"""The regression solver as CPU jobs on Slurm: two learning rates, seconds each.

    dora grid regression_slurm --dry_run     # the experiments and their signatures
    dora grid regression_slurm               # submit them (one task, 1 CPU, 2 GB each) and follow them

A first try of `dora grid` on a new cluster, and the grid of tests/test_slurm.py.
"""

from dora import Explorer, Launcher


@Explorer
def explorer(launcher: Launcher) -> None:
    launcher.bind_({'solver': 'regression'})
    launcher.slurm_(gpus=0, time=10)
    for lr in [3e-3, 1e-3]:
        launcher({'optim.lr': lr})
