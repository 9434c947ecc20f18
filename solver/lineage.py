"""Lineage: where an experiment started by `continue_from` came from, and the forest they make.

When a run takes its start from another checkpoint (`continue_from`), it writes two files in its
experiment folder, once, before its first step:
- `lineage.json`: the source (the `continue_from` value, URLs without credentials; the source's
  signature, checkpoint file, epoch and step), what was taken (the count, the digest of the
  taken entries as loaded here, `checkpoint.ignore_state_keys`, `checkpoint.strict`) and when;
- `start.th`: the full state the run started from (a checkpoint of this experiment at epoch 0,
  written by the verified writer): what `solver rollback <xp> --to start` returns to, checked
  against the digest in `lineage.json`.
Neither is a resume candidate nor pruned (they are not `checkpoint*.th`), so both survive every
resume, rollback and prune. The parent of an experiment is the experiment whose signature the
source checkpoint records (`meta.sig`): a `//sig/`, a folder, a file and a `//pretrained/`
export of it all lead back to it.
"""

from __future__ import annotations

import json
import time
import typing as tp
from pathlib import Path

from . import distrib
from .checkpointing import envelope, naming, objectstore
from .checkpointing.fs import atomic_open, read_file
from .checkpointing.partial import LoadReport

if tp.TYPE_CHECKING:
    from .checkpointing.store import IncrementalStore
    from .experiment import Experiment

LINEAGE = 'lineage.json'
START = 'start.th'
_RECORD_BYTES = 1 << 20


def record(continue_from: str, source: envelope.Checkpoint, report: LoadReport, state: tp.Mapping[str, tp.Any],
           ignored: tp.Sequence[str], strict: bool) -> dict[str, tp.Any]:
    """What `lineage.json` holds for a run started from `source` (`report`: what was loaded, the
    digest taken of those entries in `state`, the live state after the load)."""
    value = objectstore.redact(continue_from) if naming.is_url(continue_from) else continue_from
    where = value if naming.is_url(continue_from) else str(source.path)
    return {'continue_from': value, 'sig': source.meta.get('sig'), 'checkpoint': where,
            'epoch': source.meta.get('epoch'), 'step': source.meta.get('step'),
            'taken': len(report.loaded), 'skipped': len(report.skipped), 'digest': report.digest(state),
            'entries': sorted(report.loaded),
            'ignore_state_keys': list(ignored), 'strict': strict, 'time': time.strftime('%Y-%m-%d %H:%M:%S')}


def write_start(folder: Path, state: dict[str, tp.Any], meta: dict[str, tp.Any], entry: dict[str, tp.Any],
                store: IncrementalStore | None = None) -> None:
    """`start.th` (the state at the start, `meta` plus the lineage record), then `lineage.json`:
    both atomically; the lineage file last, so that it never names a start that is not on disk.
    With the run's blob `store` (checkpoint.incremental), `start.th` keeps its tensors there: the
    weights it took from its source are the source's blobs, not a copy."""
    write = store.write if store is not None else envelope.write_checkpoint
    write(Path(folder) / START, state, {**meta, 'lineage': entry})
    if distrib.is_rank_zero():
        with atomic_open(Path(folder) / LINEAGE) as f:
            f.write(json.dumps(entry, indent=2).encode())


def read(folder: Path) -> dict[str, tp.Any] | None:
    """The lineage record of an experiment folder, or None (not started by continue_from, or
    unreadable: a link, a pipe, not JSON)."""
    try:
        found = json.loads(read_file(Path(folder) / LINEAGE, _RECORD_BYTES, inside=Path(folder)))
    except (OSError, ValueError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def parent(xp: Experiment, known: tp.Mapping[str, Experiment]) -> Experiment | None:
    """The experiment of `known` (by signature) that `xp` started from, or None."""
    entry = read(xp.folder)
    sig = entry.get('sig') if entry else None
    return known.get(sig) if isinstance(sig, str) and sig != xp.sig else None


def forest(experiments: tp.Sequence[Experiment]) -> list[tuple[int, Experiment]]:
    """The experiments as a forest, depth first: (depth, experiment); roots are those with no
    parent among them. A cycle (folders edited by hand) is broken where it is met."""
    known = {xp.sig: xp for xp in experiments}
    children: dict[str | None, list[Experiment]] = {}
    for xp in experiments:
        up = parent(xp, known)
        children.setdefault(up.sig if up else None, []).append(xp)
    out: list[tuple[int, Experiment]] = []
    seen: set[str] = set()

    def visit(xp: Experiment, depth: int) -> None:
        if xp.sig in seen:
            return
        seen.add(xp.sig)
        out.append((depth, xp))
        for child in children.get(xp.sig, []):
            visit(child, depth + 1)
    for root in children.get(None, []):
        visit(root, 0)
    for xp in experiments:  # only in a cycle
        visit(xp, 0)
    return out


Edge = tuple[dict[str, tp.Any], 'Experiment | None']  # (lineage record of a child, its parent if found)


def ancestors(xp: Experiment, experiments: tp.Sequence[Experiment]) -> list[Edge]:
    """The chain of sources of `xp`, nearest first: (lineage record of the child, the parent
    experiment if it is among `experiments`); it stops at a source outside them or a cycle."""
    known = {x.sig: x for x in experiments}
    chain: list[Edge] = []
    seen = {xp.sig}
    current: Experiment | None = xp
    while current is not None and (entry := read(current.folder)) is not None:
        up = parent(current, known)
        chain.append((entry, up))
        if up is None or up.sig in seen:
            break
        seen.add(up.sig)
        current = up
    return chain
