"""Sharded checkpoints: the DTensor shards of a state, written by every rank with
torch.distributed.checkpoint (DCP) beside a checkpoint file that holds the rest.

`checkpoint.write_checkpoint` comes here when a state holds DTensors (a model sharded with
FSDP2). For `checkpoint.th`:

    .checkpoint.th.dcp.tmp.<token>/   every rank writes its shards here, in parallel (DCP)
    checkpoint.th.dcp.<token>/        ... renamed by rank 0 once every rank's files are durable
    checkpoint.th                     then written by rank 0, atomically: the rest of the state
                                      (placeholders where the DTensors were), the folder's name
                                      and an xxh3 digest of every file in it. The commit point.

A kill at any moment leaves the previous `checkpoint.th` and the folder it names intact; the
stray folders of an interrupted save are removed by `clean` (at the next start) or by the next
save of the same file. Nothing is gathered on one rank: each rank writes and hashes its shards.

Loading reads the file, verifies the digest of every file of the folder (each rank a share of
them when a process group exists), checks that DCP's `.metadata` (a pickle) holds only DCP's
own classes, then loads each tensor placed like the matching tensor of a live state (`like`):
as this rank's shard of a DTensor (on any number of ranks: DCP reshards) or whole (one process,
or a replicated model). DCP loads its tensor files with `weights_only=True` itself.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import secrets
import shutil
import sys
import typing as tp
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import xxhash

from .. import distrib
from . import tree

#: the key that marks a placeholder: {MARK: name in the shard folder, 'shape': [...], 'dtype': 'float32'}
MARK = 'solver.sharded_tensor'


class ShardError(ValueError):
    """The shard folder of a checkpoint is missing, incomplete or damaged."""


def is_dtensor(obj: tp.Any) -> bool:
    # No DTensor exists unless torch.distributed.tensor was imported, and importing it costs
    # half a second at every start: look it up instead (DCP, too, is imported only when used).
    module = sys.modules.get('torch.distributed.tensor')
    return module is not None and isinstance(obj, module.DTensor)


def has_dtensors(state: tp.Any) -> bool:
    return tree.any_leaf(state, is_dtensor)


def _is_placeholder(obj: tp.Any) -> bool:
    return type(obj) is dict and MARK in obj


def split(state: tp.Any) -> tuple[tp.Any, dict[str, torch.Tensor]]:
    """The state with each DTensor replaced by a placeholder, and the DTensors by name."""
    tensors: dict[str, torch.Tensor] = {}

    def placeholder(obj: tp.Any, path: tree.Path, like: tp.Any) -> tp.Any:
        if not is_dtensor(obj):
            return obj
        name = tree.dotted(path)
        if name in tensors:
            raise ValueError(f"two tensors of the state are both named {name!r}")
        tensors[name] = obj.detach()
        return {MARK: name, 'shape': list(obj.shape), 'dtype': str(obj.dtype).removeprefix('torch.')}
    return tree.map_leaves(state, placeholder), tensors


# -- writing ----------------------------------------------------------------------------------------

def folder_prefix(path: Path) -> str:
    return f'{Path(path).name}.dcp.'


def save_shards(path: Path, state: tp.Any) -> tuple[tp.Any, dict[str, tp.Any] | None]:
    """Every rank: write this rank's shards into the shard folder of `path` (a collective).

    Returns the state with placeholders, and on rank 0 the description of the folder to store
    in the checkpoint file (`{'folder', 'files': {name: xxh3}, 'world_size'}`), once every
    rank's files are durable and the folder renamed into place. Other ranks get None.
    """
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    group = distrib.checkpoint_group()
    token = [secrets.token_hex(4)]
    dist.broadcast_object_list(token, src=0, group=group)
    tmp = path.with_name(f'.{folder_prefix(path)}tmp.{token[0]}')
    final = path.with_name(f'{folder_prefix(path)}{token[0]}')
    skeleton, tensors = split(state)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), process_group=group)
    rank = dist.get_rank(group)
    own = {p.name: file_digest(p) for p in tmp.glob(f'__{rank}_*')}
    if rank == 0:
        own['.metadata'] = file_digest(tmp / '.metadata')
    gathered: list[tp.Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, own, group=group)  # also: every rank's files are durable
    if rank != 0:
        return skeleton, None
    from .fs import fsync_dir
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(path.parent)
    files = {name: digest for digests in gathered for name, digest in digests.items()}
    return skeleton, {'folder': final.name, 'files': files, 'world_size': len(gathered)}


def remove_superseded(path: Path, keep: str | None = None) -> None:
    """Remove the shard folders of `path` other than `keep` (all of them if None)."""
    path = Path(path)
    for folder in path.parent.glob(f'{folder_prefix(path)}*'):
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


def clean(folder: Path) -> None:
    """Remove the shard folders of interrupted saves: temporary ones, and those of a missing file."""
    for path in Path(folder).glob('.*.dcp.tmp.*'):
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(folder).glob('*.dcp.*'):
        owner = path.with_name(path.name.split('.dcp.')[0])
        if path.is_dir() and not owner.exists():
            shutil.rmtree(path, ignore_errors=True)


def file_digest(path: Path) -> str:
    hasher = xxhash.xxh3_64()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):
            hasher.update(chunk)
    return hasher.hexdigest()


# -- reading ----------------------------------------------------------------------------------------

def load_shards(path: Path, skeleton: tp.Any, shards: dict[str, tp.Any], like: tp.Any = None) -> tp.Any:
    """The state of a sharded checkpoint: placeholders of `skeleton` replaced by their tensors.

    A tensor whose counterpart in `like` (same place in the structure) is a DTensor of the same
    shape loads as this rank's shard of it; others load whole. Raises ShardError naming the file
    when the folder does not match its digests.
    """
    import torch.distributed.checkpoint as dcp
    folder = Path(path).with_name(shards['folder'])
    verify_files(folder, shards['files'])
    check_metadata(folder / '.metadata')
    targets: dict[str, torch.Tensor] = {}

    def target(placeholder: dict, live: tp.Any) -> torch.Tensor:
        shape, dtype = torch.Size(placeholder['shape']), getattr(torch, placeholder['dtype'])
        if is_dtensor(live) and live.shape == shape:
            tensor = torch.empty_like(live, dtype=dtype)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        targets[placeholder[MARK]] = tensor
        return tensor

    state = _fill(skeleton, like, target)
    if targets:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings('ignore', 'torch.distributed is disabled')
            # Each rank reads the shards it needs, with no collective: the folder is verified already.
            dcp.load(targets, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return state


def _fill(obj: tp.Any, like: tp.Any, target: tp.Callable[[dict, tp.Any], torch.Tensor]) -> tp.Any:
    return tree.map_leaves(obj, lambda value, path, like: target(value, like) if _is_placeholder(value) else value,
                           like, is_leaf=_is_placeholder)


def place_like(state: tp.Any, like: tp.Any) -> tp.Any:
    """Whole tensors of `state` made DTensors where `like` has one of the same shape: this rank
    keeps its shard (cut locally, no communication). For a consolidated checkpoint read into a
    sharded run."""
    if like is None:
        return state

    def place(value: tp.Any, path: tree.Path, like: tp.Any) -> tp.Any:
        if isinstance(value, torch.Tensor) and not is_dtensor(value) and is_dtensor(like) and like.shape == value.shape:
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return value
    return tree.map_leaves(state, place, like)


def verify_files(folder: Path, expected: dict[str, str]) -> None:
    """Check every file of the shard folder against its digest; with a process group each rank
    checks a share and all learn the verdict, so that every rank takes the same decision."""
    if not folder.is_dir():
        raise ShardError(f"its shard folder {folder} is missing")
    names = sorted(expected)
    rank, world = distrib.rank(), distrib.world_size()
    problems = []
    for name in names[rank::world]:
        file = folder / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file_digest(file) != expected[name]:
            problems.append(f"{file} does not match its digest")
    if world > 1:
        gathered: list[tp.Any] = [None] * world
        dist.all_gather_object(gathered, problems, group=distrib.checkpoint_group())
        problems = [p for found in gathered for p in found]
    if problems:
        raise ShardError('; '.join(problems))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata classes, torch sizes and dtypes, paths: nothing that runs code."""

    MODULES = ('torch.distributed.checkpoint.metadata', 'torch.distributed.checkpoint.filesystem')
    ALLOWED = {('torch', 'Size'), ('torch.serialization', '_get_layout'), ('collections', 'OrderedDict'),
               ('pathlib', 'PosixPath'), ('pathlib', 'WindowsPath'), ('pathlib', 'PurePosixPath')}

    def find_class(self, module: str, name: str) -> tp.Any:
        found = super().find_class(module, name) if module in self.MODULES else None
        if found is not None and (dataclasses.is_dataclass(found) or
                                  (isinstance(found, type) and issubclass(found, enum.Enum))):
            return found
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def check_metadata(path: Path) -> None:
    """Refuse a `.metadata` file that would need anything but DCP's own classes to unpickle:
    DCP reads it with plain `pickle`, which could run code."""
    try:
        with open(path, 'rb') as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ImportError) as err:
        raise ShardError(f"{path} is not plain DCP metadata, refused: {err}") from err

