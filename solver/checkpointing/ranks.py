"""The ranks that save and load a checkpoint together, as the caller hands them in.

The checkpointing package sets up no process group and imports no launcher: whoever builds the
`CheckpointManager` (StandardSolver, from `solver.distrib.checkpoint_ranks()`) passes the group
its collectives run on, so that a save written in the background never interleaves with the
training collectives of the main thread. `Ranks()` is the default group, or a single process
when torch.distributed is not initialised (tools, tests, the `solver` command).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """A process group seen from this process: who it is, how many there are, and barriers."""

    group: dist.ProcessGroup | None = None  # None: the default group

    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def is_rank_zero(self) -> bool:
        return self.rank() == 0

    def barrier(self) -> None:
        """Every rank of the checkpoint group: the collectives of a save, on the saving thread."""
        if self.world_size() > 1:
            dist.barrier(group=self.group)

    def training_barrier(self) -> None:
        """Every rank, on the default group: for the training thread, never on `group`, whose
        collectives a save in the background may be running at that very moment (two threads'
        collectives interleaved on one group deadlock)."""
        if self.world_size() > 1:
            dist.barrier()


DEFAULT_RANKS = Ranks()  # the default group, or this process alone
