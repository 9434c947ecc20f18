"""CheckpointWriter: one interface in front of synchronous and background checkpoint saving.

    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(state, {path: None, epoch_path: ['model', 'best_state']}, meta)
    writer.close()   # at the end of a run: the last save is durable, or its error is raised

In `ASYNC` mode the caller pays only for copying the state's tensors into CPU staging buffers
that are allocated once and reused (`prepare` touches them before training starts, so the first
save is not the slow one), in one `torch._foreach_copy_`; a background thread then hashes and
writes the files, atomically as in `envelope.write_checkpoint`. The buffers are page-aligned
(`directio.aligned_empty`): an O_DIRECT save writes them as they are, with no copy through the
page cache, so the background write competes with training for little more than the hashing.
At most one save is in flight: the next `save` waits for it.
An error of a background save is raised by the next `save`, `wait` or `close`, never lost, and
by `raise_if_failed`, a check cheap enough to make after every training step.

Staging costs host memory the size of the state (of this rank's shards). `staging_max_mb` bounds
it: a state larger than the bound is not staged but written by the calling thread straight from
its tensors, one tensor at a time (a tensor on a GPU is copied to the host just before its bytes
are written), as in `SYNC` mode. The loop then blocks for the whole write instead of a copy, and
host memory grows by at most one tensor. A state within the bound is staged as before.

In a distributed run every rank calls `save`: a replicated state is written by rank 0 alone
(the others return at once), a sharded one (DTensors, FSDP2) by every rank, each its shards
(`envelope.write_checkpoint`); staging then copies only this rank's shards.

Listeners run after a save is durable on a thread of their own, so a slow upload or evaluation
never stalls training or the next save; their errors are logged.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import threading
import time
import typing as tp
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import directio, envelope, faults, sharded, tree
from .ranks import DEFAULT_RANKS, Ranks

if tp.TYPE_CHECKING:
    from .store import IncrementalStore

logger = logging.getLogger(__name__)
Listener = tp.Callable[[list[Path]], None]


class SaveMode(enum.Enum):
    SYNC = 'sync'        # write on the calling thread
    ASYNC = 'async'      # snapshot into staging buffers, write in the background


@dataclass
class Staged:
    """The last save as the staging buffers hold it, once durable: the files holding all of it
    (not those restricted to some states), and what was written to them."""

    files: dict[Path, tuple[dict[str, tp.Any], tuple[int, int, int]]]  # digests, (inode, size, mtime)
    state: dict[str, tp.Any]
    meta: dict[str, tp.Any]


@dataclass
class SaveStats:
    """Time the caller was blocked, and time from the call until the files were durable."""

    blocked: float = 0.0
    durable: float = 0.0


class StagingBuffers:
    """CPU copies of a state's tensors, reused from one save to the next."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self._streams: dict[torch.device, tp.Any] = {}  # [GPU] a side stream per device, for its copies

    def snapshot(self, state: tp.Any) -> tp.Any:
        """The state with every tensor replaced by its staged copy (containers are rebuilt).

        The copies are made by one `torch._foreach_copy_` call once the state is walked: the
        loop pays for the bytes, not for a Python call per tensor. Tensors on a GPU are staged
        into pinned host memory by a copy on a side stream (after the work queued so far on the
        current stream), waited for before this returns: the loop is blocked for the
        device-to-host copy alone, at the bus's speed. [Not yet run on a GPU: no GPU was lent.]
        """
        index = 0
        host: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # buffers, sources
        gpu: list[tuple[torch.Tensor, torch.Tensor]] = []                # (buffer, source)

        def stage(obj: tp.Any, *where: tp.Any) -> tp.Any:
            nonlocal index
            if sharded.is_dtensor(obj):  # stage this rank's shard only
                from torch.distributed.tensor import DTensor
                local = stage(obj.to_local())
                return DTensor.from_local(local, obj.device_mesh, obj.placements, shape=obj.shape,
                                          stride=obj.stride(), run_check=False)
            if isinstance(obj, torch.Tensor):
                if index == len(self.buffers):
                    self.buffers.append(torch.empty(0))
                buffer = self.buffers[index]
                on_gpu = obj.device.type == 'cuda'
                # is_pinned() only for a GPU's tensors: on a CUDA build it asks the driver, and a
                # pinned buffer serves a CPU tensor as well
                if buffer.shape != obj.shape or buffer.dtype != obj.dtype or (on_gpu and not buffer.is_pinned()):
                    buffer = self.buffers[index] = (  # page-aligned: see archive; pinned for a GPU's copies
                        torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True) if on_gpu
                        else directio.aligned_empty(obj.shape, obj.dtype))
                index += 1
                if on_gpu:
                    gpu.append((buffer, obj.detach()))
                else:
                    host[0].append(buffer)
                    host[1].append(obj.detach())
                return buffer
            return obj
        staged = tree.map_leaves(state, stage)
        if host[0]:
            torch._foreach_copy_(*host)
        if gpu:
            self._copy_from_gpu(gpu)
        return staged

    def _copy_from_gpu(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy GPU tensors into their pinned buffers, on each device's side stream once the
        work queued on its current stream is done, and wait for the copies."""
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for buffer, source in pairs:
            by_device.setdefault(source.device, []).append((buffer, source))
        for device, copies in by_device.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for buffer, source in copies:
                    buffer.copy_(source, non_blocking=True)
        for device in by_device:
            self._streams[device].synchronize()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


def _identity(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten: inode, size, modification time."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def staged_nbytes(state: tp.Any) -> int:
    """Bytes the staging buffers of `state` take: its tensors, only this rank's shard of a DTensor."""
    from torch.utils._pytree import tree_leaves
    local = [t.to_local() if sharded.is_dtensor(t) else t for t in tree_leaves(state)]
    return sum(t.numel() * t.element_size() for t in local if isinstance(t, torch.Tensor))


def background_priority() -> None:
    """Lower this thread's CPU priority (nice 19; the threads it starts inherit it).

    Training keeps every core busy: at the same priority a background write (hashing, copying
    into the page cache) slows the loop by about its own CPU time; at nice 19 it mostly runs
    when a core is idle. A starved write costs no more: the next save's wait frees a core.
    """
    with contextlib.suppress(AttributeError, OSError):  # Linux sets it per thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class CheckpointWriter:
    def __init__(self, mode: SaveMode | str = SaveMode.SYNC, staging_max_mb: float | None = None,
                 ranks: Ranks = DEFAULT_RANKS, compress: str | None = None) -> None:
        self.mode = SaveMode(mode)
        self.compress = compress  # checkpoint.compress: the files' tensors as zstd frames (`codec`)
        self.ranks = ranks  # who saves together (see `ranks`)
        self.staging_max_mb = staging_max_mb
        self.staging = StagingBuffers()
        self.listeners: list[Listener] = []
        self.last = SaveStats()
        self._io = ThreadPoolExecutor(1, thread_name_prefix='checkpoint-writer', initializer=background_priority)
        self._notify = ThreadPoolExecutor(1, thread_name_prefix='checkpoint-listeners')
        self._pending: Future | None = None
        # [incremental] `store.IncrementalStore` writes the files when set (checkpoint.incremental)
        self.store: IncrementalStore | None = None
        # [rollback from memory] the last save as staged, once durable (async mode only)
        self.staged: Staged | None = None
        self._over_bound_logged = False
        self._pending_paths: list[Path] = []

    def prepare(self, state: dict[str, tp.Any]) -> None:
        """Allocate and touch the staging buffers now, and start the writing thread, not at the
        first checkpoint."""
        if self.stages(state) and self.writes(state):
            self.staging.snapshot(state)
            self._io.submit(int).result()

    def stages(self, state: dict[str, tp.Any]) -> bool:
        """Whether a save of `state` is staged (ASYNC, within `staging_max_mb`); if the state is
        over the bound, the staging buffers are released and the caller writes (see module doc)."""
        if self.mode is not SaveMode.ASYNC:
            return False
        if self.staging_max_mb is None:
            return True
        size = staged_nbytes(state)
        if size <= self.staging_max_mb * 2**20:
            return True
        if self.staging.buffers or not self._over_bound_logged:
            logger.info("Checkpoint state of %.0f MB > checkpoint.staging_max_mb=%s: written by the "
                        "training loop, tensor by tensor, not staged.", size / 2**20, self.staging_max_mb)
            self._over_bound_logged = True
        self.staging.buffers.clear()
        return False

    def writes(self, state: dict[str, tp.Any]) -> bool:
        """Whether this rank writes (part of) `state`: its shards, or the whole on rank 0."""
        return self.ranks.is_rank_zero() or sharded.has_dtensors(state)

    def save(self, state: dict[str, tp.Any], targets: dict[Path, tp.Sequence[str] | None],
             meta: dict[str, tp.Any]) -> SaveStats:
        """Write `state` to each target path (restricted to the given state names, if any)."""
        begin = time.perf_counter()
        self.wait()
        if not self.writes(state):
            self.last = SaveStats()
            return self.last
        self.staged = None  # [rollback from memory] the buffers, or the newest file, are about to change
        if self.stages(state):
            state = self.staging.snapshot(state)
            self._pending = self._io.submit(self._write, state, targets, meta, begin, True)
            self._pending_paths = list(targets)
        else:
            self._write(state, targets, meta, begin)
        self.last.blocked = time.perf_counter() - begin
        return self.last

    def _write(self, state: dict[str, tp.Any], targets: dict[Path, tp.Sequence[str] | None],
               meta: dict[str, tp.Any], begin: float, staged: bool = False) -> None:
        write = (self.store.write if self.store is not None  # [incremental]
                 else functools.partial(envelope.write_checkpoint, ranks=self.ranks, compress=self.compress))
        full: dict[Path, tp.Any] = {}
        for path, names in targets.items():
            if names:
                subset = {k: v for k, v in state.items() if k in names}
                write(path, subset, dict(meta, partial=sorted(subset)))
            else:
                recorded = write(path, state, meta)
                if recorded is not None:
                    full[path] = (recorded, _identity(path))
        if staged:  # [rollback from memory] `state` is the staging buffers' copy
            self.staged = Staged(full, state, meta)
        self.last.durable = time.perf_counter() - begin
        logger.debug("Checkpoint durable after %.3fs: %s", self.last.durable, [p.name for p in targets])
        for listener in self.listeners:
            self._notify.submit(self._call, listener, list(targets))

    def staged_checkpoint(self, path: Path, into: tp.Any = None) -> envelope.Checkpoint | None:
        """[rollback from memory] Checkpoint `path` from the staging buffers instead of the disk:
        a copy of the last save's state, if `path` is one of its full files, still the file that
        save wrote (same inode, size and time), and the staged bytes match the digests recorded
        in it (the memory copy is intact). None otherwise; call `wait()` first.

        `into` as in `envelope.read_checkpoint`: tensors that fit are copied straight into the live
        tensors (one memcpy, and `load_state_dict` then copies nothing); the others are cloned.
        """
        staged = self.staged
        if staged is None or Path(path) not in staged.files:
            return None
        recorded, identity = staged.files[Path(path)]
        try:
            if _identity(Path(path)) != identity:  # replaced since (by another save, a rollback)
                return None
        except OSError:
            return None
        if recorded != envelope.digests({'meta': staged.meta, 'state': staged.state}):
            logger.warning("The staged copy of %s does not match its digests: not used.", path)
            return None
        live: list[torch.Tensor] = []

        def place(value: tp.Any, where: tree.Path, target: tp.Any) -> tp.Any:
            if not isinstance(value, torch.Tensor):
                return value
            if (isinstance(target, torch.Tensor) and not sharded.is_dtensor(target) and target.device.type == 'cpu'
                    and target.shape == value.shape and target.dtype == value.dtype):
                live.append(target.detach().copy_(value))
                return live[-1]
            return value.detach().clone()  # never the buffers themselves: the next save reuses them
        state = tree.map_leaves(staged.state, place, like=into)
        return envelope.Checkpoint(path=Path(path), state=state, meta=dict(staged.meta), live=live)

    @staticmethod
    def _call(listener: Listener, paths: list[Path]) -> None:
        try:
            listener(paths)
        except Exception:  # a listener's failure must not stop training, but must be seen
            logger.exception("Checkpoint listener %r failed on %s", listener, [str(p) for p in paths])

    def failed(self) -> bool:
        """Whether a background save has already failed (never waits)."""
        pending = self._pending
        return pending is not None and pending.done() and pending.exception() is not None

    def raise_if_failed(self) -> None:
        """Raise the error of a background save that has already failed; never waits.

        Cheap enough for every training step: the solver calls it after each one, so that a
        failed save (full disk, size limit) stops training at the next step instead of an epoch
        later at the next save. The error names the file and the cause (`wait`).
        """
        if self.failed():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is durable; raise its error if it failed.

        A failed save is raised once, as a CheckpointError naming the files and the cause; its
        listeners were not called (nothing records it as done).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error = pending.exception()
        if error is None or isinstance(error, faults.CheckpointError):
            pending.result()
            return
        names = ', '.join(str(p) for p in self._pending_paths)
        raise faults.CheckpointError(
            f"Could not write checkpoint {names}: {type(error).__name__}: {error}. The previous "
            "checkpoint is untouched; rerun to resume from it.") from error

    def close(self) -> None:
        """Wait for the last save and the listeners; raise the last save's error if any."""
        try:
            self.wait()
        finally:
            self._io.shutdown(wait=True)
            self._notify.shutdown(wait=True)
