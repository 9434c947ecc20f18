"""Exporting a checkpoint's model states alone (`solver export`): to share, to fine-tune from
(`continue_from=//pretrained/NAME`), or as safetensors.
"""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import torch

from .checkpointing import blobs, envelope, naming
from .checkpointing.fs import atomic_open
from .checkpointing.weights import DTYPES, cast
from .compare import flatten
from .experiment import ExperimentError


def export(source: envelope.Checkpoint, target: Path, which: str = 'best', fmt: str = 'th',
           dtype: str = 'float32') -> dict[str, tp.Any]:
    """Write the best (or latest) model states of a checkpoint alone, to share or fine-tune from.

    `th`: a checkpoint of ours holding only `{'best_state': ...}`, what `continue_from` and
    `//pretrained/NAME` read. `safetensors`: a flat `<state>.<key>` -> tensor file any
    `safetensors` reader opens, with the config and provenance as JSON strings in its metadata.
    Floating-point tensors are cast to `dtype`. Returns the provenance written.
    """
    best = source.state.get('best_state')
    if not isinstance(best, dict) or not best.get('states'):
        raise ExperimentError(f"{source.path} has no best state: nothing says which states are the model.")
    names = list(best['states'])
    missing = [name for name in names if name not in source.state]
    if which == 'latest' and missing:
        raise ExperimentError(f"{source.path} does not hold the live {missing} (a partial epoch file?): "
                              "export --best, or --latest from checkpoint.th.")
    states = best['states'] if which == 'best' else {name: source.state[name] for name in names}
    states = {name: cast(state, DTYPES[dtype]) for name, state in states.items()}
    meta = {k: v for k, v in source.meta.items() if k != 'config'}
    provenance = {
        'exported_from': str(source.path), 'exported': which, 'dtype': dtype,
        'sig': meta.get('sig'), 'epoch': meta.get('epoch'), 'step': meta.get('step'),
        'git_commit': (meta.get('versions') or {}).get('git'), 'best_metric': best.get('metric'),
    }
    target = Path(target)
    check_export_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == 'th':
        envelope.write_checkpoint(target, {'best_state': {'metric': best.get('metric'), 'states': states}},
                                    {**source.meta, **provenance})
    elif fmt == 'safetensors':
        from safetensors.torch import save
        tensors = {name: value.contiguous().clone() for name, value in flatten(states).items()
                   if isinstance(value, torch.Tensor)}
        metadata = {key: json.dumps(value) for key, value in provenance.items()}
        metadata['config'] = json.dumps(source.meta.get('config'))
        metadata['versions'] = json.dumps(meta.get('versions'))
        with atomic_open(target) as f:
            f.write(save(tensors, metadata))
    else:
        raise ExperimentError(f"--format {fmt}: expected th or safetensors.")
    return provenance


def check_export_target(target: Path) -> None:
    """Refuse to export onto a checkpoint of an experiment (`<xp>/checkpoint.th`, an epoch file,
    through a link or not): the best-state-only file would replace it, without the experiment's
    lock, and the experiment could no longer resume from it."""
    real = Path(target).resolve()
    if real.name != naming.LATEST and naming.epoch_of(real) is None:
        return
    folder = real.parent
    if any((folder / name).exists() for name in ('.argv.json', '.lock', blobs.BLOBS)) or naming.candidates(folder):
        raise ExperimentError(
            f"{target} is a checkpoint name inside the experiment folder {folder}: exporting there would replace "
            "its checkpoint with a best-state-only file, and the experiment could no longer resume. Write the "
            "export elsewhere (e.g. pretrained/NAME.th, then continue_from=//pretrained/NAME).")
