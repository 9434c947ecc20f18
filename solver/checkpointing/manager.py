"""CheckpointManager: the one owner of an experiment's checkpoints.

The solver tells it what happened (`on_moment`: a training step, an epoch end, a stop asked) and
hands over a callable producing the state and metadata; the manager owns the rest of the save
protocol: which files (the policies, asked once), the ranks' agreement on them and on a failed
background save, writing (sync or async), pruning once a save is durable, the remote mirror, and
the durability callback (Dora's history is named only once a save holding it is on disk). It also
restores (the newest intact checkpoint of this experiment, else `continue_from`) and rolls back
(after a divergence).

It knows no solver: it saves and loads dicts of states with metadata.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import logging
import subprocess
import tempfile
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SolverError
from . import envelope, faults, fetch, fs, listing, naming, objectstore, policy, recovery, remote, sharded, weights
from .config import CheckpointConfig
from .fs import fsync_dir
from .ranks import DEFAULT_RANKS, Ranks
from .store import IncrementalStore
from .writer import CheckpointWriter, SaveMode, SaveStats

logger = logging.getLogger(__name__)
Targets = dict[Path, tp.Optional[tp.Sequence[str]]]
Snapshot = tp.Callable[[], tuple[dict[str, tp.Any], dict[str, tp.Any]]]  # () -> (state, meta), at a save
Agree = tp.Callable[..., tuple[bool, ...]]  # (latest, failed) -> (stop asked, latest, failed), over ranks


class Moment(enum.Enum):
    """What just happened in the run, as the solver tells the manager (`on_moment`)."""

    STEP = 'step'            # an optimizer step, within an epoch
    EPOCH_END = 'epoch end'  # the epoch was committed to the history
    STOP = 'stop'            # a stop was asked (preemption) after the train stage; the epoch is not committed


def _alone(*flags: bool) -> tuple[bool, ...]:
    """The agreement of a single process: no stop asked by anyone else, its own flags."""
    return (False, *flags)


class _Pending(tp.NamedTuple):
    """A save whose files are not yet durable: its callback, and the scores of the history it
    holds (the fallback metric of files that record none), handed to the listener thread."""

    on_durable: tp.Callable[[], None] | None
    scores: tuple[float | None, ...]


@dataclass(frozen=True)
class Pruned:
    """What `prune` decided: the epoch files kept (newest first, each with why) and removed."""

    kept: dict[Path, str]
    removed: list[Path]


def prune(folder: Path, retention: policy.Retention, history: tp.Sequence[float | None] = (),
          apply: bool = True) -> Pruned:
    """Ask `retention` which epoch checkpoints of `folder` stay, each ranked by the metric it
    records (else by `history`: `listing.epoch_files`), and delete the others (with `apply`).
    The run after each save and `solver prune` both prune through here."""
    found = listing.epoch_files(folder, history)
    decision = retention.decide(found.values())
    removed = [path for path, file in found.items() if file.epoch in decision.removed]
    if apply:
        for path in removed:
            remove_checkpoint(path)
        if removed:
            fsync_dir(Path(folder))
    return Pruned({path: decision.kept[file.epoch] for path, file in reversed(found.items())
                   if file.epoch in decision.kept}, removed)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file, then its shard folders: the one place a local checkpoint is
    deleted (the caller fsyncs the folder once). A link is removed, never what it points to."""
    fs.unlink(Path(path), inside=Path(path).parent)
    sharded.remove_superseded(path)


def find_pretrained(name: str, folder: Path) -> envelope.Checkpoint:
    """`<folder>/<name>.th` (written by `solver export`), verified. `folder` is the project's
    pretrained folder (`solver.locations.pretrained_dir`: $SOLVER_PRETRAINED_DIR or pretrained/)."""
    path = folder / f'{name}.th'
    if not path.exists():
        known = sorted(p.stem for p in folder.glob('*.th')) if folder.exists() else []
        raise SolverError(f"No pretrained model '{name}': looked for {path} (SOLVER_PRETRAINED_DIR sets the "
                          f"folder). Known names: {known or 'none'}.")
    return envelope.read_checkpoint(path.resolve())  # a link the user made there is followed (not a FIFO)


class CheckpointManager:
    """Save decisions, retention, restore, `continue_from` and rollback for one experiment folder.

    `cfg` is the `checkpoint` config section (a DictConfig, a dict or a `CheckpointConfig`);
    `sig` the experiment's signature, recorded in every checkpoint and checked on resume;
    `lower_is_better` the direction of the best metric (for `checkpoint.keep_best`) and
    `metric_name` its name, both recorded in every checkpoint beside its metric; `ranks` the
    ranks that save and load together (`ranks.Ranks`, from the caller: this package sets up none);
    `agree(latest, failed)` returns (stop asked, latest due, a save failed), each true if true on
    any rank (the caller's preemption handler: one collective per moment).
    """

    def __init__(self, folder: Path, cfg: tp.Any, sig: str, lower_is_better: bool = True,
                 ranks: Ranks = DEFAULT_RANKS, metric_name: str = 'loss', agree: Agree = _alone) -> None:
        self.folder = Path(folder)
        self.ranks = ranks
        self.cfg = cfg = CheckpointConfig.parse(cfg)
        self.sig = sig
        self.lower_is_better = lower_is_better
        self.metric_name = metric_name
        self.agree = agree
        self.policies = policy.from_config(cfg, lower_is_better)
        self.writer = CheckpointWriter(SaveMode.ASYNC if cfg.async_save else SaveMode.SYNC,
                                       staging_max_mb=cfg.staging_max_mb, ranks=ranks, compress=cfg.compress)
        self.writer.listeners.append(self._after_durable)
        if cfg.keep_dtype is not None:  # [keep_dtype] refused here too for a manager made without validation
            weights.check_dtype(cfg.keep_dtype)
        self.keep_dtype = cfg.keep_dtype
        self.reduced: list[Path] = []  # [keep_dtype] the files the last prune made weights-only
        if cfg.incremental:  # [incremental] equal tensors stored once (store.py)
            self.writer.store = IncrementalStore(self.folder)
        # checkpoint.remote: each durable save mirrored to <url>/<sig> off the training thread (rank 0)
        self.remote: remote.RemoteMirror | None = None
        if cfg.remote and ranks.is_rank_zero():
            self.remote = remote.RemoteMirror(f"{objectstore.check_url(str(cfg.remote))}/{sig}", self.folder,
                                              self.policies.retention)
        self.rollbacks = 0
        self._started = self._last_save = time.time()
        self._save_cost = self._total_blocked = 0.0
        self._latest_saved = False
        self._scores: list[float | None] = []  # the training thread's: set by `context`, read by `save`
        self._on_durable: collections.deque[_Pending] = collections.deque()

    @property
    def latest_path(self) -> Path:
        return self.folder / naming.LATEST

    def describe(self) -> str:
        """One line on what is saved when, what is kept, and the rollback policy, for the log."""
        cfg = self.cfg
        parts = ['latest every epoch' if cfg.save_last else 'latest only on preemption']
        if cfg.save_every:
            parts.append(f"checkpoint_<epoch>.th every {cfg.save_every} epochs"
                         + (f" (newest {cfg.keep_last} kept)" if cfg.keep_last else ''))
        if cfg.keep_every:
            parts.append(f"checkpoint_<epoch>.th every {cfg.keep_every} epochs kept for good")
        if cfg.keep_best:
            parts.append(f"the best {cfg.keep_best} epochs' checkpoints kept")
        if cfg.every_steps:
            parts.append(f"every {cfg.every_steps} steps")
        if cfg.every_minutes:
            parts.append(f"every {cfg.every_minutes} min")
        if cfg.max_overhead:
            parts.append(f"mid-epoch interval chosen for <= {cfg.max_overhead:.1%} overhead")
        rollback = cfg.rollback
        spike = f" or > {rollback.spike_factor}x running mean" if rollback.spike_factor else ''
        limit = f"up to {rollback.max_rollbacks} times" if rollback.max_rollbacks else 'off, stop at once'
        return f"{self.writer.mode.value} saves; {', '.join(parts)}. Rollback on non-finite{spike} loss: {limit}"

    # -- saving ------------------------------------------------------------------------------------

    def on_moment(self, moment: Moment, step: int, scores: tp.Sequence[float | None], snapshot: Snapshot,
                  on_durable: tp.Callable[[], None] | None = None) -> SaveStats | None:
        """`moment` happened at optimizer step `step`, after the epochs whose best metrics are
        `scores` (one per committed epoch): save what the policies ask for now (None: nothing).

        Every rank calls this. The policies are asked once; the ranks agree on the latest file
        (time policies differ; a stop asked on any rank saves it on all) and on a failed
        background save (which stops the run). `snapshot()` makes the state and metadata, only
        when something is saved. `on_durable` (Dora's history) runs once the save is durable, or
        right away at an epoch end when no policy saves periodically (no save will hold it)."""
        ctx = self.context(step, len(scores), moment is Moment.EPOCH_END, moment is Moment.STOP, scores)
        due = self.plan(ctx)
        stop, latest, failed = self.agree(self.latest_path in due, self.writer.failed())
        self.raise_if_save_failed(failed)
        if stop or latest:  # a stop asked anywhere saves the latest file (`OnPreemption`), on every rank
            due = {self.latest_path: None, **due}
        stats = None
        if due:
            state, meta = snapshot()
            stats = self.save(state, due, meta, on_durable=on_durable)
        if moment is Moment.EPOCH_END and not self.policies.periodic and on_durable is not None:
            on_durable()
        return stats

    def wait(self) -> None:
        """Block until the save in flight is durable (its error raised if it failed)."""
        self.writer.wait()

    def context(self, step: int, epoch: int, epoch_end: bool = False, preempted: bool = False,
                scores: tp.Sequence[float | None] = ()) -> policy.SaveContext:
        """This moment of the run, as the save policies see it. `scores` (the best metric of each
        epoch so far, from the history) also give each file saved next its `meta['metric']`."""
        self._scores = list(scores) or self._scores
        return policy.SaveContext(step=step, epoch=epoch, epoch_end=epoch_end, preempted=preempted,
                                  since_last_save=time.time() - self._last_save, save_cost=self._save_cost,
                                  scores=self._scores, lower_is_better=self.lower_is_better)

    def plan(self, ctx: policy.SaveContext, latest: bool = False) -> Targets:
        """The files to write at this moment (empty: none), with the states each holds (None: all).

        The latest file is written when a save policy asks, or with `latest=True`; at an epoch
        end also whenever it exists, since a stale latest file would be resumed from in place of
        a newer epoch file. Epoch files are written at epoch ends by their policies: in full
        when `keep_best` asks for them, else restricted to `checkpoint.keep_every_states`.
        """
        targets: Targets = {}
        if latest or self.policies.latest.should_save(ctx) or (
                ctx.epoch_end and (self._latest_saved or self.latest_path.exists())):
            targets[self.latest_path] = None
        if ctx.epoch_end and self.policies.epoch_file.should_save(ctx):
            names = None if self.policies.full_file.should_save(ctx) else self.cfg.keep_every_states
            targets[naming.epoch_checkpoint_path(self.folder, ctx.epoch)] = names
        return targets

    def save(self, state: dict[str, tp.Any], targets: Targets, meta: dict[str, tp.Any],
             on_durable: tp.Callable[[], None] | None = None) -> SaveStats:
        """Write `state` to `targets` (every rank calls this; see `CheckpointWriter.save`).

        `on_durable` runs once every file is durable (on the writer's listener thread, after
        retention pruned old files): never before, even with async saves. Each file records the
        metric of its epoch (`meta['metric']`, from the scores of the last `context`): what
        retention ranks it by, in this run and in `solver prune` alike.
        """
        writes = self.writer.writes(state)
        scores = tuple(self._scores)  # this save's own copy: the listener thread reads only this
        if writes:
            self._on_durable.append(_Pending(on_durable, scores))
        meta = dict(meta, sig=self.sig, versions=versions())
        meta.setdefault('metric', listing.history_metric(scores, int(meta.get('epoch') or 0)))
        meta.setdefault('metric_name', self.metric_name)  # what `metric` is and its direction: readers
        meta.setdefault('lower_is_better', self.lower_is_better)  # rank as the run did, without the config
        try:
            stats = self.writer.save(state, targets, meta)
        except BaseException:
            if writes:
                self._on_durable.pop()
            raise
        self.ranks.training_barrier()
        self._latest_saved = self._latest_saved or self.latest_path in targets
        self._last_save = time.time()
        self._save_cost = stats.blocked
        self._total_blocked += stats.blocked
        share = self._total_blocked / max(time.time() - self._started, 1e-9)
        logger.info("Checkpoint %s (epoch %d, step %d): loop blocked %.3fs; previous save durable "
                    "after %.3fs; %.2f%% of run time spent checkpointing.",
                    ', '.join(p.name for p in targets), meta.get('epoch', 0), meta.get('step', 0),
                    stats.blocked, stats.durable, 100 * share)
        return stats

    def _after_durable(self, paths: list[Path]) -> None:
        """Writer listener: prune by retention, hand the save to the remote mirror, then run the
        save's `on_durable`."""
        pending = self._on_durable.popleft() if self._on_durable else _Pending(None, ())
        if self.ranks.is_rank_zero():
            self.prune(pending.scores)
            if self.remote is not None:  # a file made weights-only is mirrored again, as it now is
                self.remote.notify(paths + self.reduced, pending.scores)
        if pending.on_durable is not None:
            pending.on_durable()

    def prune(self, history: tp.Sequence[float | None] = ()) -> list[Path]:
        """Delete the epoch checkpoints retention does not keep; return them. `history`: the
        scores of the epochs, for files that do not record their metric (`listing.epoch_files`)."""
        removed = prune(self.folder, self.policies.retention, history).removed
        for path in removed:
            logger.info("Removed old checkpoint %s (kept: %s)", path.name, self.policies.retention.why())
        if self.keep_dtype is not None:  # [keep_dtype] files kept for good: weights only (weights.py)
            self.reduced = weights.reduce_kept(self.folder, self.policies.retention, self.keep_dtype, history)
        if self.writer.store is not None:  # [incremental] blobs no checkpoint references any more
            self.writer.store.collect()
        return removed

    def raise_if_save_failed(self, on_any_rank: bool) -> None:
        """Stop when a background save failed on any rank (`writer.failed`, agreed by the caller):
        this rank's own error names the file and the cause; the others say where to look."""
        if on_any_rank:
            self.writer.raise_if_failed()
            raise faults.CheckpointError(
                "A background checkpoint save failed on another rank (its log names the file and the "
                "cause); stopping. The previous checkpoint is intact.")

    def prepare(self, full_state: tp.Callable[[], dict[str, tp.Any]]) -> None:
        """Make the async writer's staging buffers now (for `full_state()`), not at the first save."""
        if self.writer.mode is SaveMode.ASYNC:
            self.writer.prepare(full_state())

    def close(self, preempted: bool = False) -> None:
        """The last save is durable and its callbacks ran (or its error is raised); the remote
        mirror has uploaded it (a bounded wait, shorter when preempted) and summed up."""
        try:
            self.writer.close()
        finally:
            if self.remote is not None:
                self.remote.close(timeout=min(30.0, self.remote.close_timeout) if preempted else None)

    # -- loading -----------------------------------------------------------------------------------

    def restore(self, like: tp.Any = None, into: tp.Any = None) -> envelope.Checkpoint | None:
        """This experiment's newest intact checkpoint (None if it has none); `into` as in
        `read_checkpoint`: the live state the tensors are read straight into (issue 16).

        Stray temporary files of killed saves are removed first. A checkpoint of another
        experiment (another signature in its metadata) is refused: it was copied in by hand.
        """
        if self.ranks.is_rank_zero():
            recovery.clean_stray_files(self.folder)
            if self.remote is not None:  # a fresh machine: fetch the newest intact remote checkpoint
                self.remote.restore()
        self.ranks.training_barrier()
        own = recovery.load_newest_intact(self.folder, like=like, into=into, ranks=self.ranks)
        if own is not None:
            self.check_signature(own)
        return own

    def check_signature(self, ckpt: envelope.Checkpoint) -> None:
        other = ckpt.meta.get('sig')
        if other is None:  # a file of ours always holds its experiment's signature
            raise faults.CheckpointError(
                f"{ckpt.path} holds no experiment signature (meta.sig), so it was not saved by this "
                f"experiment {self.sig}: it was copied here, or forged. Move it out of {self.folder}; to "
                f"start from it, use continue_from=<path of the file>.")
        if other != self.sig:
            raise faults.CheckpointError(
                f"{ckpt.path} belongs to experiment {other}, not to this experiment {self.sig}: it "
                f"was copied or moved here. Move it out of {self.folder}; to start from it, use "
                f"continue_from=//sig/{other} (or continue_from=<path of the file>).")

    def resolve_continue_from(self, value: str, like: tp.Any, pretrained: tp.Callable[[str], envelope.Checkpoint],
                              into: tp.Any = None) -> envelope.Checkpoint:
        """A checkpoint named as `naming.parse` reads names (`//sig/SIG`, a signature or prefix in
        this experiment's Dora folder, `//pretrained/NAME` through `pretrained(NAME)`, a file or an
        XP folder, local or an fsspec URL fetched into a temporary folder, then read as the local
        form); `into` as in `read_checkpoint`."""
        try:
            name = naming.parse(value)
            if name.form is naming.Form.URL:
                with tempfile.TemporaryDirectory(prefix='.continue_from.', dir=self.folder) as tmp:
                    return self.resolve_continue_from(str(fetch.fetch_source(value, Path(tmp))), like, pretrained,
                                                      into)
            if name.form is naming.Form.PRETRAINED:
                found = pretrained(name.value)
                found.state = sharded.place_like(found.state, like)  # into shards, if sharded
                return found
            path = naming.locate(name, self.folder.parent)
        except naming.NamingError as err:
            raise SolverError(f"continue_from={value}: {err} Use //sig/<SIG>, //pretrained/<NAME>, a signature, "
                              "a path or a URL.") from None
        if path.is_dir():
            newest = recovery.load_newest_intact(path, resumable=False, like=like, into=into, ranks=self.ranks)
            if newest is None:
                raise SolverError(f"continue_from={value}: the folder {path} has no checkpoint "
                                  f"(tried {naming.LATEST} and checkpoint_<epoch>.th).")
            return newest
        return envelope.read_checkpoint(path, like, into, self.ranks)

    def rollback(self, problem: str, step: int, like: tp.Any = None, into: tp.Any = None) -> envelope.Checkpoint:
        """The checkpoint to reload after a divergence at `step`, within `rollback.max_rollbacks`;
        `into` as in `read_checkpoint`."""
        self.rollbacks += 1
        limit = self.cfg.rollback.max_rollbacks
        if self.rollbacks > limit:
            raise SolverError(f"Training diverged ({problem}) at step {step} after {limit} rollbacks "
                              "(checkpoint.rollback.max_rollbacks); stopping. Lower optim.lr or enable "
                              "gradient clipping (optim.max_norm).")
        self.writer.wait()
        begin = time.perf_counter()
        # [rollback from memory] the async writer's staged copy, when it is of the newest file
        newest = naming.candidates(self.folder)[:1]
        found = self.writer.staged_checkpoint(newest[0], into) if newest else None
        source = 'memory (the staged copy of the last save, verified against its digests)'
        if found is None:
            found = recovery.load_newest_intact(self.folder, like=like, into=into, ranks=self.ranks)
            source = 'disk'
        if found is None:
            raise SolverError(f"Training diverged ({problem}) at step {step}, before any checkpoint to "
                              "roll back to. Lower optim.lr or save earlier (checkpoint.every_steps).")
        logger.info("Rollback: read %s from %s in %.3fs.", found.path, source, time.perf_counter() - begin)
        return found


@functools.cache
def versions() -> dict[str, str]:
    """Library versions and the git commit of the code, for the checkpoint metadata."""
    import importlib.metadata as md
    found = {'torch': str(torch.__version__)}
    for package in ('solver', 'flashy', 'dora-search', 'hydra-core', 'numpy'):
        with contextlib.suppress(md.PackageNotFoundError):
            found[package] = md.version(package)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found['git'] = subprocess.run(
            ['git', 'rev-parse', 'HEAD'], cwd=Path(__file__).parent, capture_output=True, text=True,
            timeout=5).stdout.strip()
    return found
