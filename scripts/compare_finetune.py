"""Fine-tuning a pretrained drum RNN against training from scratch, on a small folder: a table.

Runs (or resumes, Dora finds finished experiments and does nothing) these experiments with the
real `dora run` and prints their final evaluate metrics, with 95% bootstrap intervals, beside the
two baselines:

  pretrained   `solver=drum_rnn` on the bundled corpus, evaluated as is on the small folder
  fine-tuned   `solver=drum_rnn/finetune continue_from=//sig/<pretrained> dataset.path=<folder>`
               (until early_stop ends it)
  default      `solver=drum_rnn dataset.path=<folder>`: the default command from scratch
  scratch      with --scratch-epochs N...: from scratch for N epochs of the fine-tune's length

    python scripts/make_small_drum_set.py --out /tmp/my_drums
    python scripts/compare_finetune.py /tmp/my_drums
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ('loss', 'perplexity', 'accuracy', 'accuracy_from_bar_2', 'baseline_repeat_bar_accuracy',
           'baseline_unigram_perplexity')


def dora(*args: str) -> str:
    """Run `dora <args>` from the project root; stop with its output if it fails."""
    done = subprocess.run(['dora', *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"dora {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return re.sub(r'\x1b\[[0-9;]*m', '', done.stdout + done.stderr)


def xp_folder(*overrides: str) -> Path:
    """The experiment folder of `dora run <overrides>` (the last line of `dora info`)."""
    lines = [line for line in dora('info', *overrides).splitlines() if line.strip()]
    return Path(lines[-1].split()[-1]) if lines else Path()


def last_evaluate(folder: Path) -> dict[str, float]:
    history = json.loads((folder / 'history.json').read_text())
    return next(epoch['evaluate'] for epoch in reversed(history) if 'evaluate' in epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', type=Path, help='the small folder of drum MIDI files')
    parser.add_argument('--pretrained-sig', help='signature of a finished `solver=drum_rnn` run to start from')
    parser.add_argument('--scratch-epochs', type=int, nargs='*', default=[],
                        help='also train from scratch for these numbers of epochs (of the fine-tune length)')
    args = parser.parse_args()
    data = f'dataset.path={args.folder.resolve()}'
    pretrain = ('solver=drum_rnn',)
    if args.pretrained_sig is None:
        dora('run', *pretrain)
        sig = xp_folder(*pretrain).name
    else:
        sig = args.pretrained_sig
    finetune = ('solver=drum_rnn/finetune', f'continue_from=//sig/{sig}', data)
    updates = OmegaConf.load(ROOT / 'config' / 'solver' / 'drum_rnn' / 'finetune.yaml').optim.updates_per_epoch
    runs = {'pretrained, not fine-tuned': ('solver=drum_rnn', f'continue_from=//sig/{sig}', data,
                                            'execute_only=evaluate'),
            'fine-tuned': finetune,
            'default command from scratch': ('solver=drum_rnn', data)}
    for scratch_epochs in sorted(set(args.scratch_epochs)):
        runs[f'from scratch ({scratch_epochs * updates} updates)'] = (
            'solver=drum_rnn', data, f'optim.epochs={scratch_epochs}', f'optim.updates_per_epoch={updates}')
    rows = {}
    for name, overrides in runs.items():
        out = dora('run', *overrides)
        if 'execute_only=evaluate' in overrides:  # one stage: its metrics are only in the log
            line = next(ln for ln in out.splitlines() if 'Evaluate Summary' in ln)
            rows[name] = {k.strip(): float(v) for k, v in (p.split('=') for p in line.split('|')[2:] if '=' in p)}
        else:
            history = json.loads((xp_folder(*overrides) / 'history.json').read_text())
            rows[f'{name} ({len(history)} epochs)'] = last_evaluate(xp_folder(*overrides))
    print('| run | ' + ' | '.join(COLUMNS) + ' |')
    print('|' + '---|' * (len(COLUMNS) + 1))
    for name, metrics in rows.items():
        print(f'| {name} | ' + ' | '.join(cell(metrics, c) for c in COLUMNS) + ' |')


def cell(metrics: dict[str, float], name: str) -> str:
    """`value [low, high]` where the metric has a bootstrap interval, else the value."""
    value = f"{metrics.get(name, float('nan')):.3f}"
    if f'{name}_ci_low' in metrics:
        value += f" [{metrics[f'{name}_ci_low']:.3f}, {metrics[f'{name}_ci_high']:.3f}]"
    return value


if __name__ == '__main__':
    main()
