"""Training steps per second of the drum RNN with and without first-layer attention, on this machine.

Magenta's drum_kit default wraps the first layer in AttentionCellWrapper (attn_length=32); here that
layer must run step by step in Python, where the plain layers use fused LSTM kernels. This measures
what the attention costs, one full training step (forward, backward, Adam) at a time. The variants
take turns for a few rounds and the best round counts: other processes on a shared machine only
ever make a round slower.

    python scripts/bench_attention.py                       # B=128, T=128, H=256, 3 layers
    python scripts/bench_attention.py --steps 5 --length 64
    python scripts/bench_attention.py --batch 64 --length 63 --threads 1 --bf16   # the default run's step
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from solver.drums.model import NUM_EVENTS, DrumRNN  # noqa: E402


def trainer(model: DrumRNN, batch: int, length: int, bf16: bool = False) -> Callable[[], None]:
    """One training step on random events (the forward under bfloat16 autocast with `bf16`, as
    the solver's optim.autocast); the first call is the untimed warm-up."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    events = torch.randint(0, NUM_EVENTS, (batch, length + 1))

    def step() -> None:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(events[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, NUM_EVENTS), events[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    return step


def steps_per_second(step: Callable[[], None], steps: int) -> float:
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--length', type=int, default=128, help='steps per training sequence')
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--layers', type=int, default=3)
    parser.add_argument('--attention_length', type=int, default=32, help="Magenta drum_kit's attn_length")
    parser.add_argument('--steps', type=int, default=2, help='timed steps per variant and round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None, help='intra-op threads (default: torch\'s)')
    parser.add_argument('--bf16', action='store_true', help='the forward under bfloat16 autocast (optim.autocast)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention_length <= 0:
        parser.error(f"--attention_length must be > 0 to compare with the plain model, got {args.attention_length}")
    torch.manual_seed(0)
    print(f"B={args.batch} T={args.length} H={args.hidden} layers={args.layers} "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'bfloat16' if args.bf16 else 'float32'}",
          flush=True)
    lengths = (0, args.attention_length)
    steps = {length: trainer(DrumRNN(args.hidden, args.layers, dropout=0.5, attention_length=length),
                             args.batch, args.length, args.bf16) for length in lengths}
    rates = {length: 0.0 for length in lengths}
    for round_ in range(args.rounds):
        for length in lengths:
            rate = steps_per_second(steps[length], args.steps)
            rates[length] = max(rates[length], rate)
            print(f"round {round_}: attention_length={length:<3d} {rate:.3f} steps/s", flush=True)
    for length in lengths:
        print(f"best: attention_length={length:<3d} {rates[length]:.3f} steps/s ({1 / rates[length]:.2f} s/step)")
    ratio = rates[0] / rates[args.attention_length]
    print(f"attention costs {ratio:.2f}x the time of a plain training step")


if __name__ == '__main__':
    main()
