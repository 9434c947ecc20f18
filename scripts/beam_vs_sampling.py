"""Magenta's beam search against plain sampling on a trained drum RNN: a table.

For each (beam_size, branch_factor, steps_per_iteration) it samples the same number of tracks
from one kick at temperature 1 and prints the mean log-likelihood per generated step (under the
model, the quantity beam search maximises), the time per track, and the groove report's
distance to the experiment's evaluate split with its notes per bar (reference beside it).

    dora run solver=drum_rnn/debug                  # or any drum experiment
    python scripts/beam_vs_sampling.py <xp folder> [--samples 8] [--steps 128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from solver.checkpointing.envelope import read_checkpoint
from solver.drums import data, groove
from solver.drums.model import DrumRNN, beam_search
from solver.drums.solver import KICK, resolve_path

SEARCHES = ((1, 1, 1), (2, 2, 1), (4, 4, 1), (4, 4, 4), (8, 8, 2), (8, 8, 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('xp', type=Path, help='an experiment folder holding checkpoint.th')
    parser.add_argument('--samples', type=int, default=8)
    parser.add_argument('--steps', type=int, default=128, help='steps per track, the primer included')
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = read_checkpoint(args.xp / 'checkpoint.th')
    cfg = checkpoint.meta['config']
    model = DrumRNN(hidden_size=cfg['model']['hidden_size'], num_layers=cfg['model']['num_layers'],
                    dropout=cfg['model']['dropout'], attention_length=cfg['model']['attention_length'])
    model.load_state_dict(checkpoint.state['best_state']['states']['model'])
    dataset = cfg['dataset']
    corpus = data.load_corpus(resolve_path(dataset['path']), min_bars=dataset['min_bars'],
                              window_steps=dataset['window_steps'], fractions=tuple(dataset['splits']))
    reference = corpus.sections['evaluate']
    ref_notes = groove.groove_stats(reference)['notes_per_bar']
    print(f"{args.xp.name}: {args.samples} tracks of {args.steps} steps from one kick, T=1; "
          f"reference: {sum(len(r) for r in reference) // 16} evaluate bars, {ref_notes:.2f} notes per bar")
    print('| beam / branch / steps per iteration | log-likelihood per step | s per track | groove distance '
          '| notes per bar |')
    print('|---|---|---|---|---|')
    for search in SEARCHES:
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        tracks, scores = [], []
        for _ in range(args.samples):
            events, score = beam_search(model, torch.tensor([KICK]), args.steps, 1.0, generator, *search)
            tracks.append(events.numpy())
            scores.append(score / (args.steps - 1))
        seconds = (time.perf_counter() - start) / args.samples
        report = groove.groove_report(tracks, reference)
        print(f"| {'/'.join(map(str, search))} | {np.mean(scores):.3f} | {seconds:.2f} | {report['distance']:.3f} "
              f"| {report['samples']['notes_per_bar']:.2f} |")


if __name__ == '__main__':
    main()
