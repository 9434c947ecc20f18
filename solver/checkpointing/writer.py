"""CheckpointWriter: one interface in front of synchronous and background checkpoint saving.

    writer = CheckpointWriter(SaveMode.ASYNC)
    writer.save(state, {path: None, epoch_path: ['model', 'best_state']}, meta)
    writer.close()   # at the end of a run: the last save is durable, or its error is raised

In `ASYNC` mode the caller pays only for copying the state's tensors into CPU staging buffers
that are allocated once and reused (`prepare` touches them before training starts, so the first
save is not the slow one), in one `torch._foreach_copy_`; a background thread then hashes and
writes the files, atomically as in `checkpoint.write_checkpoint`. The buffers are page-aligned
(`archive.aligned_empty`): an O_DIRECT save writes them as they are, with no copy through the
page cache, so the background write competes with training for little more than the hashing.
At most one save is in flight: the next `save` waits for it.
An error of a background save is raised by the next `save`, `wait` or `close`, never lost.

In a distributed run every rank calls `save`: a replicated state is written by rank 0 alone
(the others return at once), a sharded one (DTensors, FSDP2) by every rank, each its shards
(`checkpoint.write_checkpoint`); staging then copies only this rank's shards.

Listeners run after a save is durable on a thread of their own, so a slow upload or evaluation
never stalls training or the next save; their errors are logged.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
import typing as tp
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distrib
from . import archive, sharded
from . import format as checkpoint

logger = logging.getLogger(__name__)
Listener = tp.Callable[[list[Path]], None]


class SaveMode(enum.Enum):
    SYNC = 'sync'        # write on the calling thread
    ASYNC = 'async'      # snapshot into staging buffers, write in the background


@dataclass
class SaveStats:
    """Time the caller was blocked, and time from the call until the files were durable."""

    blocked: float = 0.0
    durable: float = 0.0


class StagingBuffers:
    """CPU copies of a state's tensors, reused from one save to the next."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def snapshot(self, state: tp.Any) -> tp.Any:
        """The state with every tensor replaced by its staged copy (containers are rebuilt).

        The copies are made by one `torch._foreach_copy_` call once the state is walked: the
        loop pays for the bytes, not for a Python call per tensor.
        """
        index = 0
        buffers: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []

        def stage(obj: tp.Any) -> tp.Any:
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
                if buffer.shape != obj.shape or buffer.dtype != obj.dtype:  # page-aligned: see archive
                    buffer = self.buffers[index] = archive.aligned_empty(obj.shape, obj.dtype)
                index += 1
                buffers.append(buffer)
                sources.append(obj.detach())
                return buffer
            if isinstance(obj, dict):
                return {key: stage(value) for key, value in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(stage(value) for value in obj)
            return obj
        staged = stage(state)
        if buffers:
            torch._foreach_copy_(buffers, sources)
        return staged

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


def _background_priority() -> None:
    """Lower this thread's CPU priority (nice 19; the threads it starts inherit it).

    Training keeps every core busy: at the same priority a background write (hashing, copying
    into the page cache) slows the loop by about its own CPU time; at nice 19 it mostly runs
    when a core is idle. A starved write costs no more: the next save's wait frees a core.
    """
    with contextlib.suppress(AttributeError, OSError):  # Linux sets it per thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class CheckpointWriter:
    def __init__(self, mode: SaveMode | str = SaveMode.SYNC) -> None:
        self.mode = SaveMode(mode)
        self.staging = StagingBuffers()
        self.listeners: list[Listener] = []
        self.last = SaveStats()
        self._io = ThreadPoolExecutor(1, thread_name_prefix='checkpoint-writer', initializer=_background_priority)
        self._notify = ThreadPoolExecutor(1, thread_name_prefix='checkpoint-listeners')
        self._pending: Future | None = None

    def prepare(self, state: dict[str, tp.Any]) -> None:
        """Allocate and touch the staging buffers now, not at the first checkpoint."""
        if self.mode is SaveMode.ASYNC and self.writes(state):
            self.staging.snapshot(state)

    @staticmethod
    def writes(state: dict[str, tp.Any]) -> bool:
        """Whether this rank writes (part of) `state`: its shards, or the whole on rank 0."""
        return distrib.is_rank_zero() or sharded.has_dtensors(state)

    def save(self, state: dict[str, tp.Any], targets: dict[Path, tp.Sequence[str] | None],
             meta: dict[str, tp.Any]) -> SaveStats:
        """Write `state` to each target path (restricted to the given state names, if any)."""
        begin = time.perf_counter()
        self.wait()
        if not self.writes(state):
            self.last = SaveStats()
            return self.last
        if self.mode is SaveMode.ASYNC:
            state = self.staging.snapshot(state)
            self._pending = self._io.submit(self._write, state, targets, meta, begin)
        else:
            self._write(state, targets, meta, begin)
        self.last.blocked = time.perf_counter() - begin
        return self.last

    def _write(self, state: dict[str, tp.Any], targets: dict[Path, tp.Sequence[str] | None],
               meta: dict[str, tp.Any], begin: float) -> None:
        for path, names in targets.items():
            if names:
                subset = {k: v for k, v in state.items() if k in names}
                checkpoint.write_checkpoint(path, subset, dict(meta, partial=sorted(subset)))
            else:
                checkpoint.write_checkpoint(path, state, meta)
        self.last.durable = time.perf_counter() - begin
        logger.debug("Checkpoint durable after %.3fs: %s", self.last.durable, [p.name for p in targets])
        for listener in self.listeners:
            self._notify.submit(self._call, listener, list(targets))

    @staticmethod
    def _call(listener: Listener, paths: list[Path]) -> None:
        try:
            listener(paths)
        except Exception:  # a listener's failure must not stop training, but must be seen
            logger.exception("Checkpoint listener %r failed on %s", listener, [str(p) for p in paths])

    def wait(self) -> None:
        """Block until the save in flight is durable; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last save and the listeners; raise the last save's error if any."""
        try:
            self.wait()
        finally:
            self._io.shutdown(wait=True)
            self._notify.shutdown(wait=True)
