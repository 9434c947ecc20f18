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

Loading reads the file, refuses a folder holding any file the file does not list, then runs
DCP through a reader of ours (`verified_reader`): each file it needs is read once, checked
against its digest, and used from those bytes; `.metadata` (a pickle) is unpickled with an
allow-list of DCP's metadata classes and must describe tensors only; DCP's fallback to
rank-local `__<rank>.metadata` files is never taken. Each tensor is placed like the matching
tensor of a live state (`like`): as this rank's shard of a DTensor (on any number of ranks: DCP
reshards) or whole (one process, or a replicated model). See docs/security.md.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pathlib
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

from . import tree, unpickler
from .fs import read_file
from .ranks import DEFAULT_RANKS, Ranks

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


# -- reading a folder from elsewhere safely ---------------------------------------------------------
#
# DCP's own reader unpickles `.metadata` with plain pickle, falls back to rank-local
# `__<rank>.metadata` files when that fails, re-opens every file it reads, and loads byte items
# with `torch.load(weights_only=False)`. Each of these runs code from a crafted folder. Ours reads
# only listed files, each once, from bytes checked against the digest the checkpoint file
# records, unpickles the metadata with an allow-list, and loads tensors only.

def check_listing(folder: Path, expected: dict[str, str]) -> None:
    """The shard folder holds exactly the files `expected` names: no more, no less."""
    if not folder.is_dir():
        raise ShardError(f"its shard folder {folder} is missing")
    present = {entry.name for entry in os.scandir(folder)}
    extra, missing = sorted(present - set(expected)), sorted(set(expected) - present)
    if extra:
        raise ShardError(f"{folder} holds files its checkpoint does not list ({', '.join(extra)}): "
                         "refused, since DCP could read them; the folder was not written by this framework")
    if missing:
        raise ShardError('; '.join(f"{folder / name} is missing" for name in missing))


METADATA_BYTES = 256 << 20  # the most read of a `.metadata`: DCP's for a model of millions of tensors


def read_verified(path: Path, digest: str, limit: int) -> bytes:
    """The bytes of `path`, read once, after checking them against `digest` (what gets used is
    what was checked: swapping the file afterwards changes nothing). Read as every file of a
    folder from elsewhere (`fs.open_fd`: no link, from the checkpoint's folder down; no FIFO
    or device), at most `limit` bytes."""
    try:
        data = read_file(path, limit, inside=path.parent.parent)
    except OSError as err:
        raise ShardError(f"{path} cannot be read: {err.strerror or err}") from err
    if xxhash.xxh3_64_hexdigest(data) != digest:
        raise ShardError(f"{path} does not match its digest")
    return data


def _metadata_classes() -> dict[tuple[str, str], tp.Any]:
    """What a `.metadata` written by `save_shards` may name, and nothing else."""
    from torch.distributed.checkpoint import filesystem, metadata
    allowed: dict[tuple[str, str], tp.Any] = {
        (metadata.__name__, name): getattr(metadata, name)
        for name in ('Metadata', 'TensorStorageMetadata', 'TensorProperties', 'ChunkStorageMetadata',
                     'StorageMeta', 'MetadataIndex', '_MEM_FORMAT_ENCODING')}
    allowed[filesystem.__name__, '_StorageInfo'] = filesystem._StorageInfo
    allowed['torch', 'Size'] = torch.Size
    allowed['torch.serialization', '_get_layout'] = torch.serialization._get_layout  # type: ignore[attr-defined]
    allowed['collections', 'OrderedDict'] = collections.OrderedDict
    allowed['pathlib', 'PosixPath'] = pathlib.PosixPath  # StorageMeta.checkpoint_id: the folder written
    allowed['pathlib', 'PurePosixPath'] = pathlib.PurePosixPath
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata classes, torch sizes, dtypes and layouts: nothing that runs code."""

    def find_class(self, module: str, name: str) -> tp.Any:
        found = _metadata_classes().get((module, name))
        if found is None and module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return found


def parse_metadata(data: bytes, source: Path, files: tp.Collection[str] | None = None) -> tp.Any:
    """DCP metadata from verified bytes, unpickled with the allow-list and checked to describe
    only tensors stored in `files` (if given), untransformed: nothing DCP would load by pickle."""
    from torch.distributed.checkpoint import filesystem, metadata
    try:
        unpickler.check_memo(data)  # the C unpickler would fill a memo as large as an index the file names
        found = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ImportError, KeyError, TypeError,
            ValueError, IndexError, RuntimeError) as err:
        raise ShardError(f"{source} is not plain DCP metadata, refused: {err}") from err
    problems = []
    if not isinstance(found, metadata.Metadata) or not isinstance(found.state_dict_metadata, dict) \
            or not isinstance(found.storage_data, dict):
        problems.append("it is not a DCP Metadata object")
    else:
        if not all(isinstance(md, metadata.TensorStorageMetadata) for md in found.state_dict_metadata.values()):
            problems.append("it describes items that are not tensors (DCP would unpickle them)")
        for info in found.storage_data.values():
            if not isinstance(info, filesystem._StorageInfo) or info.transform_descriptors \
                    or (files is not None and (info.relative_path not in files or info.relative_path == '.metadata')) \
                    or type(info.offset) is not int or type(info.length) is not int:
                problems.append(f"it points at data this framework does not write ({info!r:.120})")
                break
    if problems:
        raise ShardError(f"{source} is not DCP metadata of ours, refused: {problems[0]}")
    return found


def check_metadata(path: Path) -> None:
    """Refuse a `.metadata` file that would need anything but DCP's own classes to unpickle."""
    parse_metadata(read_file(Path(path), METADATA_BYTES), Path(path))


def verified_reader(folder: Path, files: dict[str, str]) -> tp.Any:
    """A DCP storage reader for `folder` that runs no code whatever the folder holds (below)."""
    return _verified_reader_class()(folder, files)


@functools.cache
def _verified_reader_class() -> type:
    # Built on first use: importing DCP costs over half a second, which a run without DTensors
    # should not pay.
    from torch.distributed.checkpoint import FileSystemReader

    class VerifiedReader(FileSystemReader):
        """DCP's `FileSystemReader` for a shard folder that may come from elsewhere.

        The folder must hold exactly the files `files` lists (name -> xxh3, from the verified
        checkpoint file). `.metadata` is read once, checked, unpickled with the allow-list (in the
        constructor: a refusal is a ShardError before DCP starts). `read_metadata` takes no `rank`
        argument, so DCP never falls back to rank-local `__<rank>.metadata` files. Each data file is
        read once, checked, and its tensors loaded from those bytes with `weights_only=True`.
        """

        def __init__(self, folder: Path, files: dict[str, str]) -> None:
            super().__init__(folder)
            self.folder = Path(folder)
            self.files = dict(files)
            check_listing(self.folder, self.files)
            if '.metadata' not in self.files:
                raise ShardError(f"{self.folder}: its checkpoint lists no .metadata")
            data = read_verified(self.folder / '.metadata', self.files['.metadata'], METADATA_BYTES)
            self.metadata = parse_metadata(data, self.folder / '.metadata', self.files)

        def read_metadata(self) -> tp.Any:  # no **kwargs: see the class doc
            from torch.distributed.checkpoint.metadata import StorageMeta
            if getattr(self.metadata, 'storage_meta', None) is None:
                self.metadata.storage_meta = StorageMeta()
            self.metadata.storage_meta.load_id = self.load_id
            return self.metadata

        def read_data(self, plan: tp.Any, planner: tp.Any) -> tp.Any:
            from torch.distributed._shard._utils import narrow_tensor_by_index
            from torch.distributed.checkpoint.planner import LoadItemType
            from torch.futures import Future
            per_file: dict[str, list[tp.Any]] = {}
            for item in plan.items:
                if item.type != LoadItemType.TENSOR:  # DCP loads byte items with weights_only=False
                    raise ShardError(f"{self.folder}: {item.dest_index.fqn} is not stored as a tensor, refused")
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for name, items in per_file.items():
                path = self.folder / name
                ends = [info.offset + info.length for info in self.storage_data.values() if info.relative_path == name]
                data = memoryview(read_verified(path, self.files[name], max(ends, default=0)))
                for item in items:
                    info = self.storage_data[item.storage_index]
                    if info.offset < 0 or info.length < 0 or info.offset + info.length > len(data):
                        raise ShardError(f"{path} is shorter than its metadata says")
                    try:
                        record = io.BytesIO(data[info.offset:info.offset + info.length])
                        unpickler.check_records(record)  # no deflate bomb
                        tensor = torch.load(record, map_location='cpu', weights_only=True)
                    except Exception as err:  # the digest matched: written so, maybe to run code
                        lines = [line.strip() for line in str(err).splitlines()]
                        why = next((line for line in lines if 'unsupported global' in line.lower()), None) or next(
                            (line.partition(':')[2].strip() for line in lines if line.startswith('WeightsUnpickler')),
                            str(err) if isinstance(err, unpickler.Refused) else type(err).__name__)
                        raise ShardError(f"{path} holds a record that is not a plain tensor, refused "
                                         f"({why})") from err
                    if not isinstance(tensor, torch.Tensor):
                        raise ShardError(f"{path} holds a record that is not a tensor")
                    tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
                    destination = planner.resolve_tensor(item).detach()
                    if destination.size() != tensor.size():
                        raise ShardError(f"{path}: {item.dest_index.fqn} has shape {list(tensor.size())}, "
                                         f"the checkpoint says {list(destination.size())}")
                    destination.copy_(tensor)
                    planner.commit_tensor(item, destination)
            done: Future[None] = Future()
            done.set_result(None)
            return done

    return VerifiedReader
