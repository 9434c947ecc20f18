"""What can be wrong with a checkpoint: the errors the checkpointing package raises.

Each is a `solver.errors.UserError` (the one base of errors a user can fix), whose message names
the file and says what to do.
"""

from __future__ import annotations

import typing as tp

from ..errors import UserError

if tp.TYPE_CHECKING:
    import torch


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written, found or used; the message says which file and why."""


class CorruptCheckpointError(CheckpointError):
    """The file exists but is damaged or is not a checkpoint of ours."""


class UnsafeCheckpointError(CheckpointError):
    """The file would need arbitrary pickled objects (code) to load: refused."""


class DamagedIntoLiveError(CorruptCheckpointError):
    """A damaged file whose bytes were already read into live tensors (`read_checkpoint(into=)`):
    `live` lists them. Only a checkpoint that verifies and replaces them all may be used next."""

    def __init__(self, message: str, live: list[torch.Tensor]) -> None:
        super().__init__(message)
        self.live = live
