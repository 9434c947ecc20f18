"""Training throughput of the drum RNN: the solver beside a bare PyTorch loop, in one run.

Both train the same model on the same batches (the solver's own training loader), with the
same step (forward under optim.autocast, cross-entropy, backward, clipping, Adam) and the
config's num_threads. The solver adds its bookkeeping: metrics, progress lines, EMA if on,
data position, divergence checks. The ratio of the two
rates is the framework's overhead. Variants alternate (bare, solver, bare, solver...) so that
noise from a shared machine hits both alike; medians are reported.

    python scripts/bench_training.py                      # default drum_rnn model, 20 steps x 3
    python scripts/bench_training.py --steps 50 model.hidden_size=128
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import typing as tp
from pathlib import Path

import torch
from torch.nn import functional as F

from solver import builders, threads
from solver.drums import data
from solver.drums.encoding import NUM_EVENTS


def bare_loop(solver: tp.Any, steps: int) -> float:
    """Seconds for `steps` plain training steps on the solver's model and loader."""
    model, optimizer, max_norm = solver.model, solver.optimizer, solver.cfg.optim.max_norm
    batches = iter(solver.dataloaders['train'])
    begin = time.perf_counter()
    for _ in range(steps):
        inputs, targets = data.next_step_targets(next(batches))
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=solver.cfg.optim.get('autocast') == 'bfloat16'):
            logits, _ = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, NUM_EVENTS), targets.reshape(-1), ignore_index=data.IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        loss.item()
    return time.perf_counter() - begin


def solver_loop(solver: tp.Any, steps: int) -> float:
    """Seconds for the solver's train stage over `steps` updates."""
    solver.cfg.optim.updates_per_epoch = steps
    begin = time.perf_counter()
    solver.run_stage('train', solver.train)
    elapsed = time.perf_counter() - begin
    if solver.progress.epoch_step != steps:  # the stage stopped short: the figure would mean nothing
        raise RuntimeError(f"the solver's train stage made {solver.progress.epoch_step} of {steps} steps")
    solver._start_epoch()  # forget the stage's metrics: nothing is committed here
    solver.progress.new_epoch()  # and its position in the epoch, so that the next repeat trains again
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('overrides', nargs='*', help='config overrides, e.g. model.hidden_size=128')
    args = parser.parse_args()

    from solver.train import main as dora_main
    dora_main.dora.dir = Path(os.environ.get('SOLVER_DORA_DIR') or tempfile.mkdtemp(prefix='bench-training-'))
    xp = dora_main.get_xp(['solver=drum_rnn', 'logging.log_updates=1000000', *args.overrides])
    threads.apply(xp.cfg.get('num_threads'))  # as `dora run` sets them (solver/train.py)
    with xp.enter():
        solver = builders.get_solver(xp.cfg)
        cfg = solver.cfg
        events = cfg.dataset.batch_size * (cfg.dataset.window_steps - 1)
        print(f"model {cfg.model.num_layers}x{cfg.model.hidden_size}, batch {cfg.dataset.batch_size}, "
              f"window {cfg.dataset.window_steps} steps, {torch.get_num_threads()} threads; "
              f"{args.steps} steps x {args.repeats} repeats")
        bare_loop(solver, 2)  # warm-up (allocator, lazy imports)
        times: dict[str, list[float]] = {'bare': [], 'solver': []}
        for _ in range(args.repeats):
            times['bare'].append(bare_loop(solver, args.steps))
            times['solver'].append(solver_loop(solver, args.steps))
    rates = {name: args.steps / statistics.median(values) for name, values in times.items()}
    for name, rate in rates.items():
        print(f"{name:>7}: {rate:7.3f} steps/s  {rate * events:10.0f} events/s")
    print(f"solver / bare throughput: {rates['solver'] / rates['bare']:.3f}")


if __name__ == '__main__':
    main()
