"""The drum RNN grid: model sizes beside sampling temperatures.

    dora grid drum_rnn --dry_run          # list the experiments and their signatures
    dora grid drum_rnn                    # submit them to Slurm
    python scripts/run_grid.py drum_rnn   # or run them one after another on this machine

Each experiment's signature depends only on its overrides, so the grid is stable: rerunning it
finds the same experiments (and resumes the unfinished ones).
"""

from dora import Explorer, Launcher


@Explorer
def explorer(launcher: Launcher) -> None:
    launcher.bind_({'solver': 'drum_rnn'})
    for hidden_size, num_layers in [(128, 2), (256, 3)]:
        sub = launcher.bind({'model.hidden_size': hidden_size, 'model.num_layers': num_layers})
        for temperature in [0.8, 1.0]:
            sub({'generate.temperature': temperature})
