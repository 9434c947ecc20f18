"""The `solver` command: look at experiments and checkpoints, compare, export, roll back, prune.

Works on the Dora folder of the project ($SOLVER_DORA_DIR or <root>/outputs), an experiment
folder, a signature, or a checkpoint file; sharded checkpoints are read in this one process.
The logic lives in `solver.experiment`; this module parses and prints.
Exit codes: 0 done (identical, intact); 1 a difference, damage, or an experiment in use; 2 an
argument that cannot be served (unknown signature, no such checkpoint or point, not a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing as tp
from pathlib import Path

from . import locations
from .checkpointing.lock import ExperimentLockedError
from .errors import UserError

if tp.TYPE_CHECKING:
    from . import compare, edit, export
    from . import experiment as xps
    from .checkpointing import objectstore
    from .experiment import Experiment
else:
    class _Lazy:
        """A module of this package imported on first use: the experiment modules need torch,
        which `solver --help` and `solver new` do not (the command line starts in a fraction of
        the time)."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, name: str) -> tp.Any:
            import importlib
            return getattr(importlib.import_module(f'{__package__}.{self._name}'), name)

    xps, compare, edit, export, objectstore = (
        _Lazy(name) for name in ('experiment', 'compare', 'edit', 'export', 'checkpointing.objectstore'))

EXAMPLES = {
    'ls': "solver ls                  # every experiment\n  solver ls 8f56f142 --verify  # its checkpoints",
    'show': "solver show 8f56f142\n  solver show outputs/xps/8f56f142/checkpoint_3.th --json",
    'verify': "solver verify 8f56f142 && echo intact",
    'diff': "solver diff 8f56f142/checkpoint_2.th 8f56f142/checkpoint_3.th --states model",
    'export': "solver export 8f56f142 model.safetensors --format safetensors --dtype bf16\n"
              "  solver export 8f56f142 pretrained/drums.th   # then continue_from=//pretrained/drums",
    'rollback': "solver rollback 8f56f142 --to epoch:3   # then `dora run` goes on from epoch 4\n"
                "  solver rollback 8f56f142 --to epoch:3 --only model.layers.2,model.output\n"
                "  solver rollback 8f56f142 --to start       # a fine-tune: back to what continue_from gave it",
    'prune': "solver prune 8f56f142 --keep-last 2        # dry run; add --yes to delete",
    'new': "solver new my_task --dir ~/code   # then: cd ~/code/my_task && pip install -e . && dora run solver=my_task",
}
DTYPES = ('float32', 'bf16', 'fp16')  # weights.DTYPES' names, here so that --help needs no torch


def _dora_dir() -> Path:
    return locations.dora_dir()


def _target(name: str) -> Experiment | Path:
    return xps.resolve(name, _dora_dir())


def _size(n: int) -> str:
    value = float(n)
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if value < 1024 or unit == 'GiB':
            return f"{value:.0f} {unit}" if unit == 'B' else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _age(mtime: float) -> str:
    seconds = max(time.time() - mtime, 0)
    for unit, span in (('d', 86400), ('h', 3600), ('m', 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _table(rows: list[list[tp.Any]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print('  '.join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _emit(data: tp.Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _fmt(value: tp.Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------

def cmd_ls(args: argparse.Namespace) -> int:
    if args.target is None:
        return _ls_all(args)
    xp = xps.as_experiment(_target(args.target))
    files = xp.checkpoints()
    if not files:
        raise xps.ExperimentError(f"{xp.folder} holds no checkpoint (checkpoint.th or checkpoint_<epoch>.th).")
    damage = dict(xps.verify(xp)) if args.verify else {}
    records: list[dict[str, tp.Any]] = [
        {'file': c.path.name, 'epoch': c.epoch, 'step': c.step, 'size': c.size, 'mtime': c.mtime, 'holds': c.holds,
         **({'damage': damage[c.path]} if args.verify else {})} for c in files]
    if args.json:
        _emit(records)
    else:
        header = ['FILE', 'EPOCH', 'STEP', 'SIZE', 'AGE', 'HOLDS'] + (['STATUS'] if args.verify else [])
        _table([[r['file'], _fmt(r['epoch'] if r['epoch'] is not None else '?'),
                 _fmt(r['step'] if r['step'] is not None else '?'), _size(r['size']), _age(r['mtime']), r['holds']]
                + (['intact' if r['damage'] is None else f"DAMAGED: {r['damage']}"] if args.verify else [])
                for r in records], header)
    return 1 if any(damage.values()) else 0


def _ls_all(args: argparse.Namespace) -> int:
    records: list[dict[str, tp.Any]] = []
    experiments = xps.experiments(_dora_dir())
    states = _job_states(experiments)
    depth: dict[str, int] = {}
    if args.tree:  # parents before their children (lineage.json of each)
        from . import lineage
        ordered = lineage.forest(experiments)
        experiments, depth = [xp for _, xp in ordered], {xp.sig: d for d, xp in ordered}
    for xp in experiments:
        best = xp.best()
        metric, _ = xp.best_metric()
        records.append({'sig': xp.sig, 'overrides': objectstore.redact_overrides(xp.argv), 'epochs': len(xp.history),
                        'planned': xp.planned_epochs, 'best': {'metric': f'valid.{metric}', 'value': best[1],
                                                               'epoch': best[0]} if best else None,
                        'state': xp.state, 'pid': xp.holder, 'size': xp.size, 'updated': xp.updated,
                        'job': _job(xp, states), **({'depth': depth[xp.sig]} if args.tree else {})})
    if args.json:
        _emit(records)
        return 0
    if not records:
        print(f"No experiment in {_dora_dir() / 'xps'}.")
        return 0
    jobs = any(r['job'] for r in records)  # the JOB column only where Slurm ran some
    _table([[_indent(r.get('depth', 0)) + r['sig'],
             f"{r['epochs']}/{r['planned'] if r['planned'] is not None else '?'}",
             f"{r['best']['metric']} {r['best']['value']:.4g} (ep {r['best']['epoch']})" if r['best'] else '-',
             r['state'] + (f" (pid {r['pid']})" if r['pid'] else '')]
            + ([f"{r['job']['id']} {r['job']['state']}" if r['job'] else '-'] if jobs else [])
            + [_size(r['size']), _age(r['updated']), ' '.join(r['overrides']) or '(defaults)'] for r in records],
           ['SIG', 'EPOCHS', 'BEST', 'STATE'] + (['JOB'] if jobs else []) + ['SIZE', 'UPDATED', 'OVERRIDES'])
    return 0


def _indent(depth: int) -> str:
    """The SIG column's prefix of `solver ls --tree` at this depth of the forest."""
    return '   ' * (depth - 1) + '└─ ' if depth else ''


def _job_states(experiments: list[Experiment]) -> dict[str, str]:
    """The Slurm state of each experiment's newest job, asked once for all ({} if none has a job)."""
    ids = [job for xp in experiments if (job := xp.job)]
    if not ids:
        return {}
    from .slurm import job_states  # imports submitit and Dora's scheduler: only where jobs exist
    return job_states(ids)


def _job(xp: Experiment, states: dict[str, str]) -> dict[str, str] | None:
    """{'id', 'state'} of the experiment's newest Slurm job (state '?' where Slurm has forgotten it)."""
    job = xp.job
    return {'id': job, 'state': states.get(job, '?')} if job else None


def _defaults() -> dict[str, tp.Any]:
    """The project's default config (what `dora run` with no override composes), or {}."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=str(locations.config_dir(locations.project_package())),
                                   version_base='1.3'):
            container = OmegaConf.to_container(compose('config'), resolve=True)
    except Exception:  # an installed copy without config/: show the config without a comparison
        return {}
    return tp.cast(dict, container) if isinstance(container, dict) else {}


def cmd_show(args: argparse.Namespace) -> int:
    target = _target(args.target)
    xp = target if isinstance(target, xps.Experiment) else None
    ckpt = xp.newest() if xp else xps.load(tp.cast(Path, target))
    meta = {k: v for k, v in ckpt.meta.items() if k != 'config'}
    history = ckpt.state.get('history') or (xp.history if xp else [])
    last: dict[str, tp.Any] = {}
    for stages in history:
        last.update(stages)
    data: dict[str, tp.Any] = {'checkpoint': str(ckpt.path), 'meta': meta,
            'config_overrides': objectstore.redact_overrides(xps.overrides(ckpt.meta.get('config') or {}, _defaults())),
            'last_metrics': last, 'states': sorted(ckpt.state)}
    if xp:
        data.update({'sig': xp.sig, 'folder': str(xp.folder), 'dora_overrides': objectstore.redact_overrides(xp.argv),
                     'state': xp.state, 'pid': xp.holder, 'epochs': len(xp.history), 'planned': xp.planned_epochs,
                     'job': _job(xp, _job_states([xp])), 'ancestors': _ancestors(xp)})
    if args.json:
        _emit(data)
        return 0
    if xp:
        print(f"experiment {xp.sig}  {xp.folder}")
        print(f"  {xp.state}{f' (pid {xp.holder})' if xp.holder else ''}, "
              f"{len(xp.history)}/{xp.planned_epochs} epochs; dora overrides: "
              f"{' '.join(data['dora_overrides']) or '(none)'}")
        if data['job']:
            print(f"  slurm job {data['job']['id']}: {data['job']['state']}")
        for up in data['ancestors']:
            print(f"  started from {up['sig'] or '?'}{'' if up['found'] else ' (not in this Dora folder)'}: "
                  f"{up['continue_from']}, epoch {up['epoch']} ({up['checkpoint']}), {up['taken']} entries taken, "
                  f"digest {up['digest']}")
            if up['found']:
                print(f"    config against {up['sig']}: {' '.join(up['config_changes']) or '(same)'}")
    versions = meta.pop('versions', {}) or {}
    meta.pop('param_names', None)  # a name per optimizer entry (for partial rollback): --json shows them
    print(f"checkpoint {ckpt.path} (intact)")
    print('  ' + ', '.join(f"{k} {v}" for k, v in meta.items()))
    print(f"  git {versions.get('git', '?')}; " + ', '.join(f"{k} {v}" for k, v in versions.items() if k != 'git'))
    print(f"  states: {', '.join(data['states'])}")
    print("config against the defaults:")
    for line in data['config_overrides'] or ['(same as the defaults)']:
        print(f"  {line}")
    print("last metrics:")
    for stage, metrics in last.items():
        print(f"  {stage}: " + ' '.join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    return 0


def _ancestors(xp: Experiment) -> list[dict[str, tp.Any]]:
    """The sources of `xp`, nearest first (`lineage.ancestors`), each with the config differences
    along its edge (`experiment.overrides`: the child's keys against its parent's)."""
    from . import lineage
    out = []
    child = xp
    for entry, parent in lineage.ancestors(xp, xps.experiments(_dora_dir())):
        changes = xps.overrides(child.config, parent.config) if parent is not None else []
        out.append({'sig': entry.get('sig'), 'found': parent is not None,
                    'continue_from': entry.get('continue_from'), 'checkpoint': entry.get('checkpoint'),
                    'epoch': entry.get('epoch'), 'taken': entry.get('taken'), 'digest': entry.get('digest'),
                    'config_changes': objectstore.redact_overrides(changes)})
        child = parent if parent is not None else child
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        results = xps.verify(_target(args.target))
    except xps.ExperimentError as err:
        if args.json:
            _emit({'intact': False, 'error': str(err), 'files': []})
        else:
            print(f"error: {err}", file=sys.stderr)
        return 1
    intact = all(damage is None for _, damage in results)
    if args.json:
        _emit({'intact': intact, 'files': [{'path': str(p), 'damage': d} for p, d in results]})
    else:
        for path, damage in results:
            print(f"{path}: {'intact' if damage is None else 'DAMAGED: ' + damage}")
    return 0 if intact else 1


def cmd_diff(args: argparse.Namespace) -> int:
    a, b = (xps.load(t if isinstance(t, Path) else t.folder) for t in (_target(args.a), _target(args.b)))
    states = [s for s in args.states.split(',') if s] if args.states else None
    found = compare.diff(a.state, b.state, states)
    counts = {status: sum(d.status == status for d in found)
              for status in ('equal', 'differs', 'mismatch', 'only_a', 'only_b')}
    summary = (f"{len(found)} entries: {counts['equal']} equal, {counts['differs']} differ, "
               f"{counts['mismatch']} shape/dtype/type mismatch, {counts['only_a']} only in A, "
               f"{counts['only_b']} only in B")
    if args.json:
        _emit({'a': str(a.path), 'b': str(b.path), 'identical': counts['equal'] == len(found),
               'counts': counts, 'entries': [vars(d) for d in found]})
    else:
        print(f"A: {a.path}\nB: {b.path}")
        for d in found:
            if d.status == 'equal' and not args.all:
                continue
            detail = {'differs': f"max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}" if d.max_abs is not None
                      else d.detail, 'mismatch': d.detail, 'only_a': 'only in A', 'only_b': 'only in B',
                      'equal': 'equal'}[d.status]
            print(f"  {d.name}: {detail}")
        print(summary)
    return 0 if counts['equal'] == len(found) else 1


def cmd_export(args: argparse.Namespace) -> int:
    target = _target(args.source)
    ckpt = xps.load(target if isinstance(target, Path) else target.folder)
    provenance = export.export(ckpt, Path(args.target), 'latest' if args.latest else 'best', args.format, args.dtype)
    print(f"wrote {args.target}: {provenance['exported']} state of {provenance['exported_from']} "
          f"(sig {provenance['sig']}, epoch {provenance['epoch']}), {args.format}, {args.dtype}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    xp = xps.as_experiment(_target(args.target))
    if args.only is not None:
        return _rollback_partial(xp, args)
    from . import rewind
    if args.to == 'start':
        done = rewind.rollback_to_start(xp)
        print(f"{xp.sig} returned to its start, the state continue_from gave it (start.th, checked against the "
              f"digest of lineage.json), as {done.checkpoint.name}; the next `dora run` goes on from epoch 1.")
    else:
        done = edit.rollback(xp, args.to)
        print(f"{xp.sig} rolled back to the end of epoch {done.epoch} ({done.checkpoint.name}); "
              f"the next `dora run` goes on from epoch {done.epoch + 1}.")
    if done.moved_to:
        print(f"moved {len(done.moved)} item(s) of the abandoned branch to {done.moved_to}")
    return 0


def _rollback_partial(xp: Experiment, args: argparse.Namespace) -> int:
    from . import rewind
    done = rewind.rollback_partial(xp, args.to, args.only)
    point = 'its start' if args.to == 'start' else f"the end of epoch {done.epoch}"
    print(f"{xp.sig}: {args.only} returned to {point} ({done.source.name}), the rest kept at "
          f"the newest checkpoint; written as {done.newest.name}: {done.report.summary()}. The next `dora run` goes "
          f"on from it; the replaced file is in {done.moved_to}; the entries are listed in "
          f"{xp.folder / 'load_report.json'}.")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    xp = xps.as_experiment(_target(args.target))
    removed, kept = edit.prune(xp, args.keep_last, apply=args.yes)
    for path, why in kept.items():
        print(f"keep    {path.name} ({why})")
    for path in removed:
        print(f"{'removed' if args.yes else 'remove '} {path.name}")
    if removed and not args.yes:
        print(f"dry run: {len(removed)} file(s) would be removed; add --yes to remove them.")
    return 0


# ---------------------------------------------------------------------------------------------

def cmd_new(args: argparse.Namespace) -> int:
    from .scaffold import write_project
    root = write_project(args.name, Path(args.dir))
    print(f"wrote project {args.name} in {root}. Next:\n  cd {root}\n  pip install -e .\n"
          f"  dora run solver={args.name}        # experiments in {root / 'outputs'}\n  python -m pytest -q")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of `solver` and its subcommands."""
    top = argparse.ArgumentParser(prog='solver', description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name: str, func: tp.Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.set_defaults(func=func)
        return cmd

    target = 'experiment folder, signature, or checkpoint file'
    ls = command('ls', cmd_ls, 'list experiments, or the checkpoints of one')
    ls.add_argument('target', nargs='?', help='experiment folder or signature (none: every experiment)')
    ls.add_argument('--verify', action='store_true',
                    help='check every digest of every file (reads them all); exit 1 if one is damaged')
    ls.add_argument('--tree', action='store_true',
                    help='experiments as a forest: each under the one its continue_from started it from')
    show = command('show', cmd_show, 'metadata, config against the defaults, last metrics')
    show.add_argument('target', help=target)
    verify = command('verify', cmd_verify, 'check every digest; exit 0 if intact, 1 if anything is damaged')
    verify.add_argument('target', help=target)
    diff = command('diff', cmd_diff, 'compare two checkpoints tensor by tensor; exit 0 if identical')
    diff.add_argument('a', help=target)
    diff.add_argument('b', help=target)
    diff.add_argument('--states', help='comma-separated states to compare (e.g. model,optimizer)')
    diff.add_argument('--all', action='store_true', help='also list the equal entries')
    for cmd in (ls, show, verify, diff):
        cmd.add_argument('--json', action='store_true', help='print JSON for scripts')
    export_cmd = command('export', cmd_export, 'write the best (or latest) model alone, as .th or .safetensors')
    export_cmd.add_argument('source', help=target)
    export_cmd.add_argument('target', help='file to write')
    which = export_cmd.add_mutually_exclusive_group()
    which.add_argument('--best', action='store_true', help='the best state (default)')
    which.add_argument('--latest', action='store_true', help='the live state of the checkpoint')
    export_cmd.add_argument('--format', choices=['th', 'safetensors'], default='th')
    export_cmd.add_argument('--dtype', choices=DTYPES, default='float32',
                            help='floating-point tensors are cast to this')
    rollback = command('rollback', cmd_rollback, 'return an experiment to a kept point; later files move aside')
    rollback.add_argument('target', help='experiment folder or signature')
    rollback.add_argument('--to', required=True,
                          help='epoch:N, best, or start (a fine-tune: the state continue_from gave it)')
    rollback.add_argument('--only', metavar='PREFIX[,PREFIX...]',
                          help='roll back only these entries (model.layers.2: its parameters, their optimizer, '
                               'EMA and best-state entries); the rest stays at the newest checkpoint')
    prune = command('prune', cmd_prune, 'delete old checkpoint_<epoch>.th files (dry run unless --yes)')
    prune.add_argument('target', help='experiment folder or signature')
    prune.add_argument('--keep-last', type=int, required=True, help='epoch files to keep, newest first')
    prune.add_argument('--yes', action='store_true', help='really delete')
    new = command('new', cmd_new, 'write a project of your own: a task solver, its config, a grid, a test')
    new.add_argument('name', help='the package name (a lowercase Python identifier)')
    new.add_argument('--dir', default='.', help='the folder to create the project in (default: here)')
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `solver` console script."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ExperimentLockedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `solver ls | head`
        return 0


if __name__ == '__main__':
    sys.exit(main())
