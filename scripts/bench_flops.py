"""The drum RNN's training step against the machine's practical peak, in one run.

The peak is a large square matmul (torch.mm, n=2048) in float32 and in bfloat16, at each thread
count measured. The training step is the solver's (forward, cross-entropy, backward, clipping,
Adam) on batches of random events, in float32 or under bfloat16 autocast. Variants and the
matmuls alternate round by round, so that a shared machine's noise hits them alike; medians are
reported, with the load average beside them.

FLOPs of one step, counting each matmul as 2*m*n*k and ignoring element-wise work (gates, dropout,
softmax, Adam: a few per cent). Per token (B*(W-1) of them; the model predicts W-1 steps of a window):

    forward  F = sum over layers of 8*H*(I_l + H)  +  2*H*E        (I_1 = 518, I_l = H for l > 1;
                                                                    E = 512 events; the gates are 4H)
    backward 2F - 8*H*I_1      (a weight gradient and an input gradient per matmul, but no
                                gradient for the first layer's input, which is data)
    step     3F - 8*H*I_1

The first layer's input is one-hot: the kernel multiplies it densely, so these are the FLOPs done,
not the FLOPs a lookup would need (8*H*I_1 per token of the forward would go).

    python scripts/bench_flops.py                          # the default run's step (batch 16), threads 1 and 2
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_flops.py  # idle OpenMP threads sleep, not spin
    python scripts/bench_flops.py --threads 2 --batch 64 128 --dtype float32 bfloat16
    python scripts/bench_flops.py --profile --threads 2 --batch 32 --dtype float32  # where a step's time goes
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import time
import typing as tp

import torch

from solver.drums.model import NUM_EVENTS, NUM_INPUTS, DrumRNN, sequence_metrics


def step_flops(batch: int, window: int, hidden: int, layers: int) -> float:
    """FLOPs of one training step (forward and backward), by the formula of the module docstring."""
    inputs = [NUM_INPUTS] + [hidden] * (layers - 1)
    forward = sum(8 * hidden * (size + hidden) for size in inputs) + 2 * hidden * NUM_EVENTS
    return batch * (window - 1) * (3 * forward - 8 * hidden * NUM_INPUTS)


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul (the best of `repeats`, after one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best


def _seconds(fn: tp.Callable[[], tp.Any]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


class Step:
    """A training step of DrumRNN on a fixed random batch, as the solver's `run_step` does it."""

    def __init__(self, batch: int, window: int, hidden: int, layers: int, dtype: str):
        generator = torch.Generator().manual_seed(0)
        self.model = DrumRNN(hidden_size=hidden, num_layers=layers)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        events = torch.randint(0, NUM_EVENTS, (batch, window), generator=generator)
        self.inputs, self.targets = events[:, :-1], events[:, 1:]
        self.autocast = dtype == 'bfloat16'

    def __call__(self) -> None:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.autocast):
            logits, _ = self.model(self.inputs)
        sums = sequence_metrics(logits, self.targets)
        loss = sums['loss_sum'] / sums['count']
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 3.0)
        self.optimizer.step()
        loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--batch', type=int, nargs='+', default=[16], help='batch sizes (16: the default run)')
    parser.add_argument('--dtype', nargs='+', default=['float32', 'bfloat16'], choices=['float32', 'bfloat16'])
    parser.add_argument('--window', type=int, default=64)
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--layers', type=int, default=3)
    parser.add_argument('--steps', type=int, default=5, help='timed steps per variant and round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--profile', action='store_true',
                        help="instead: where a step's CPU time goes (torch.profiler), for the first of each option")
    args = parser.parse_args()
    if args.profile:
        profile(Step(args.batch[0], args.window, args.hidden, args.layers, args.dtype[0]), args.threads[0], args.steps)
        return

    variants = list(itertools.product(args.threads, args.batch, args.dtype))
    steps = {(b, d): Step(b, args.window, args.hidden, args.layers, d) for _, b, d in variants}
    step_times: dict[tuple[int, int, str], list[float]] = {v: [] for v in variants}
    peaks: dict[tuple[int, str], list[float]] = {(t, d): [] for t in args.threads for d in args.dtype}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for threads, dtype in peaks:
            torch.set_num_threads(threads)
            peaks[threads, dtype].append(matmul_rate(getattr(torch, dtype)))
        for threads, batch, dtype in variants:
            torch.set_num_threads(threads)
            step = steps[batch, dtype]
            step()  # warm-up: the first call after a thread change reallocates
            step_times[threads, batch, dtype].append(_seconds(functools.partial(repeat, step, args.steps)) / args.steps)
        loads.append(os.getloadavg()[0])

    print(f"model {args.layers}x{args.hidden}, window {args.window}; {args.rounds} rounds x {args.steps} steps; "
          f"load average (1 min) {min(loads):.2f} to {max(loads):.2f} on {os.cpu_count()} CPUs")
    for (threads, dtype), rates in peaks.items():
        print(f"peak   {threads} thread(s) {dtype:>8}: matmul 2048^3 {statistics.median(rates) / 1e9:7.1f} GFLOP/s")
    for (threads, batch, dtype), times in step_times.items():
        seconds = statistics.median(times)
        flops = step_flops(batch, args.window, args.hidden, args.layers)
        peak_dtype = 'float32' if 'float32' in args.dtype else dtype
        peak = statistics.median(peaks[threads, peak_dtype])
        print(f"step   {threads} thread(s) {dtype:>8} batch {batch:4d}: {1 / seconds:6.2f} steps/s "
              f"{batch * (args.window - 1) / seconds:8.0f} tokens/s  {flops / 1e9:5.1f} GFLOP/step "
              f"{flops / seconds / 1e9:7.1f} GFLOP/s = {flops / seconds / peak:6.1%} of the {peak_dtype} matmul peak")


def profile(step: Step, threads: int, steps: int) -> None:
    """Print the operators of `steps` training steps by their share of the self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler
    torch.set_num_threads(threads)
    step()  # warm-up
    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        repeat(step, steps)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{steps} steps, {threads} thread(s), self CPU time {total / 1e6:.2f} s "
          f"({total / 1e6 / steps:.3f} s per step, summed over threads)")
    for event in events[:15]:
        print(f"{event.self_cpu_time_total / total:6.1%}  {event.count / steps:6.0f} calls/step  {event.key}")


def repeat(step: Step, times: int) -> None:
    for _ in range(times):
        step()


if __name__ == '__main__':
    main()
