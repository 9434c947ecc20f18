"""The hardened reader of DCP shard folders: a folder from elsewhere read without running code.

DCP's own reader unpickles `.metadata` with plain pickle, falls back to rank-local
`__<rank>.metadata` files when that fails, re-opens every file it reads, and loads byte items
with `torch.load(weights_only=False)`. Each of these runs code from a crafted folder. Ours
(`verified_reader`) reads only the files the checkpoint lists (`check_listing`), each once, from
bytes checked against the digest the checkpoint file records (`read_verified`), unpickles the
metadata with an allow-list of DCP's classes (`parse_metadata`), and loads tensors only. The
shard layout it reads is `sharded`'s; see docs/security.md.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pathlib
import pickle
import typing as tp
from pathlib import Path

import torch
import xxhash

from . import unpickler
from .fs import read_file


class ShardError(ValueError):
    """The shard folder of a checkpoint is missing, incomplete or damaged."""


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
