"""Sharded checkpoints: the DTensor shards of a state, written by every rank with
torch.distributed.checkpoint (DCP) beside a checkpoint file that holds the rest.

`envelope.write_checkpoint` comes here when a state holds DTensors (a model sharded with
FSDP2). For `checkpoint.th`:

    .checkpoint.th.dcp.tmp.<token>/   every rank writes its shards here, in parallel (DCP)
    checkpoint.th.dcp.<token>/        ... renamed by rank 0 once every rank's files are durable
    checkpoint.th                     then written by rank 0, atomically: the rest of the state
                                      (placeholders where the DTensors were), the folder's name
                                      and an xxh3 digest of every file in it. The commit point.

A kill at any moment leaves the previous `checkpoint.th` and the folder it names intact; the
stray folders of an interrupted save are removed by `clean` (at the next start) or by the next
save of the same file. Nothing is gathered on one rank: each rank writes and hashes its shards.

Loading reads the file, then runs DCP through the hardened reader of `dcp_reader`: only the
files the checkpoint lists, each checked against its digest, metadata unpickled with an
allow-list, tensors only. Each tensor is placed like the matching tensor of a live state
(`like`): as this rank's shard of a DTensor (on any number of ranks: DCP reshards) or whole (one
process, or a replicated model). See docs/security.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import typing as tp
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import xxhash

from . import tree
from .dcp_reader import ShardError, verified_reader
from .ranks import DEFAULT_RANKS, Ranks

#: the key that marks a placeholder: {MARK: name in the shard folder, 'shape': [...], 'dtype': 'float32'}
MARK = 'solver.sharded_tensor'


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


def save_shards(path: Path, state: tp.Any, ranks: Ranks) -> tuple[tp.Any, dict[str, tp.Any] | None]:
    """Every rank: write this rank's shards into the shard folder of `path` (a collective).

    Returns the state with placeholders, and on rank 0 the description of the folder to store
    in the checkpoint file (`{'folder', 'files': {name: xxh3}, 'world_size'}`), once every
    rank's files are durable and the folder renamed into place. Other ranks get None.
    """
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    group = ranks.group
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
    files = {name: digest for digests in gathered for name, digest in digests.items()}
    # Every file of the folder is listed with its digest: a loader refuses any other file.
    unlisted = sorted({entry.name for entry in os.scandir(tmp)} - set(files))
    assert not unlisted, f"DCP wrote files no rank hashed: {unlisted}"
    from .fs import fsync_dir
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(path.parent)
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

def load_shards(path: Path, skeleton: tp.Any, shards: dict[str, tp.Any], like: tp.Any = None,
                ranks: Ranks = DEFAULT_RANKS) -> tp.Any:
    """The state of a sharded checkpoint: placeholders of `skeleton` replaced by their tensors.

    A tensor whose counterpart in `like` (same place in the structure) is a DTensor of the same
    shape loads as this rank's shard of it; others load whole. Raises ShardError naming the file
    when the folder holds a file it should not, or a file does not match its digest. With a
    process group (`ranks`), every rank raises if any rank found a problem (they take the same
    decision).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    folder = Path(path).with_name(shards['folder'])
    targets: dict[str, torch.Tensor] = {}
    budget = [0]  # bytes the folder's files hold: no placeholder may ask to allocate more

    def target(placeholder: dict, live: tp.Any) -> torch.Tensor:
        # Placeholders come from a verified file, which anyone can write: check before allocating.
        name, shape = placeholder[MARK], placeholder.get('shape')
        dtype = getattr(torch, str(placeholder.get('dtype')), None)
        described = reader.metadata.state_dict_metadata.get(name) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype) or not isinstance(shape, list) or described is None \
                or list(described.size) != shape or described.properties.dtype != dtype:
            raise ShardError(f"{folder}: the tensor {name!r} of its checkpoint does not match its metadata")
        shape = torch.Size(shape)
        budget[0] -= shape.numel() * dtype.itemsize
        if budget[0] < 0:
            raise ShardError(f"{folder}: its checkpoint describes more tensor bytes than its files hold")
        if is_dtensor(live) and live.shape == shape:
            tensor = torch.empty_like(live, dtype=dtype)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        targets[placeholder[MARK]] = tensor
        return tensor

    problem = ''
    state = None
    try:
        reader = verified_reader(folder, shards['files'])
        budget[0] = sum(info.length for info in reader.metadata.storage_data.values())
        state = _fill(skeleton, like, target)
        if targets:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings('ignore', 'torch.distributed is disabled')
                # Each rank reads the shards it needs, with no collective inside DCP.
                dcp.load(targets, storage_reader=reader, no_dist=True)
    except ShardError as err:
        problem = str(err)
    except CheckpointException as err:  # DCP wraps what fails inside it (ours included)
        causes = [failure[0] for failure in err.failures.values()]
        ours = [str(cause) for cause in causes if isinstance(cause, ShardError)]
        problem = ours[0] if ours else f"DCP cannot load {folder}: {causes[0] if causes else err}"
    if ranks.world_size() > 1:
        gathered: list[tp.Any] = [None] * ranks.world_size()
        dist.all_gather_object(gathered, problem, group=ranks.group)
        problem = '; '.join(sorted({p for p in gathered if p}))
    if problem:
        raise ShardError(problem)
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


