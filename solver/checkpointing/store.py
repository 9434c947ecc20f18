"""Incremental checkpoints: each tensor's bytes stored once per Dora folder (content-addressed).

With `checkpoint.incremental=true` a checkpoint file (`checkpoint.th`, `checkpoint_<epoch>.th`)
keeps its format (header, meta, digests of the whole state) but holds only small tensors
itself; every tensor of `INLINE_BYTES` or more is a 0-element placeholder in the file and its
bytes live in `<dora>/blobs/<key>` (`blobs.store_root`; `<folder>/blobs` for a folder outside a
Dora folder), written once and shared by every checkpoint that holds the same bytes: the best
state equal to the live model, EMA weights equal to them, the latest and the epoch file of one
save, frozen layers and unchanged buffers across epochs, and across experiments a fine-tune's
frozen layers, a grid's shared initialisation, the pretrained weights.

    {'format': ..., 'version': ..., 'meta': ..., 'state': <placeholders>,
     'blobs': {'refs': [None | (key, dtype, shape), ...],    # one per tensor, traversal order
               'store': 'dora'},                             # in the Dora folder's store
     'digests': <of the real state: what verify() checks once the blobs are in>}

Keys. `<xxh3-128 hex>-<nbytes>`: the 128-bit xxh3 of the bytes (without the GIL, like
`format.tensor_digest`) and their length. A key names the bytes a checkpoint will be given
back, so a collision would silently swap tensors: the 64-bit digests of the format would make
one likely among ~4e9 blobs of one size, 128 bits among ~1e19. Comparing bytes instead would
read every reused blob back at every save; a blob found on disk that this process did not
write is read and checked once, though (`_trusted`), so a damaged blob is rewritten, not
reused. Reading checks each blob against its key (naming the blob) and then the whole state
against the file's 64-bit digests (`envelope.verify`), as for a single-file checkpoint.

Order. Blobs are written to temporary files, fsynced, renamed, and the folder fsynced; the
checkpoint file, which is what makes a checkpoint exist, is written after (atomically, by
`envelope`). Collection (`collect`) removes blobs that no checkpoint file references: every
`*.th` under `<dora>/xps/` (every experiment's, `rolled_back/` and lineage `start.th` included;
for a store of one folder, those under it); a checkpoint file that cannot be read stops it (its
blobs cannot be known). A kill -9 at any moment leaves at worst unreferenced blobs or
temporary files, removed by a later collection.

Locking. A save holds the store's lock shared (`lock.StoreLock`) from the moment it decides
which blobs already exist until its file is written, and so do rollbacks while they move or
replace checkpoint files (`referencing`); a collection holds it exclusive, so it never deletes
a blob that a save of any experiment is reusing, and never lists the files while one is being
moved. A run's collection does not wait: while any save of the Dora folder is under way it is
skipped (the next one collects); `solver prune` waits a while. It also runs only under the
experiment lock of the caller's experiment, whose own store of the layout before the shared
one (`<xp>/blobs`, still read) it collects as before.

Sharded (FSDP) states are refused: their shards are DCP files of their own (`sharded`).
`consolidate` turns an incremental checkpoint into one self-contained file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import envelope, faults, sharded, tree
from .blobs import (
    BLOBS,
    KEY,
    SHARED,
    XPS,
    blob_key,
    clean_stray_blobs,
    is_incremental,
    is_shared,
    read_blob,
    store_root,
)
from .digest import flat_bytes
from .fs import fsync_dir, unlink
from .lock import StoreBusyError, StoreLock, held_or_taken

logger = logging.getLogger(__name__)

INLINE_BYTES = 512    # smaller tensors stay in the checkpoint file: a file each would cost more


_pool = ThreadPoolExecutor(4, thread_name_prefix='checkpoint-blobs')


@dataclass
class WriteStats:
    """Bytes of tensors one `write` stored anew, and bytes it found already stored."""

    written: int = 0
    reused: int = 0


class IncrementalStore:
    """The blob store an experiment folder writes to: its Dora folder's (`<dora>/blobs`, shared
    with the other experiments there) or, outside a Dora folder, its own (`<folder>/blobs`).
    Writes the folder's incremental checkpoints and collects the store's blobs.

    One instance per folder and process; `write` and `collect` exclude each other in the
    process (a mutex) and across processes (`lock.StoreLock`).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.root = store_root(self.folder)
        self.shared = self.root != self.folder
        self.blobs = self.root / BLOBS
        self._mutex = threading.Lock()
        self._trusted: set[str] = set()  # written or verified by this process
        self._seen: Seen = {}  # the blob keys of the checkpoint files collection has read
        self.last = WriteStats()

    def write(self, path: Path, state: dict[str, tp.Any], meta: dict[str, tp.Any]) -> dict[str, tp.Any]:
        """Write the checkpoint `path` of `state` and `meta`: new blobs first, the file last.

        Returns the digests recorded in the file, like `envelope.write_checkpoint`; what was
        written and reused is in `last`.
        """
        if sharded.has_dtensors(state):
            raise faults.CheckpointError(
                f"Cannot write {path} incrementally: the state is sharded (FSDP). Set "
                "checkpoint.incremental=false for sharded runs.")
        content = {'meta': meta, 'state': state}
        tree.skeleton(content, [])  # a value that cannot be saved raises before any write
        digests = envelope.digests(content)
        stats = WriteStats()
        refs: list[tp.Any] = []
        new: dict[str, torch.Tensor] = {}

        def to_ref(tensor: torch.Tensor) -> torch.Tensor:
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes < INLINE_BYTES:
                refs.append(None)
                return tensor
            key = blob_key(tensor)
            if key in new or self._stored(key):
                stats.reused += nbytes
            else:
                new[key] = tensor
                stats.written += nbytes
            refs.append((key, str(tensor.dtype), tuple(tensor.shape)))
            return torch.empty(0, dtype=tensor.dtype)

        where = {'store': SHARED} if self.shared else {}
        with self._mutex:
            try:
                self.blobs.mkdir(parents=True, exist_ok=True)
                self.check_own()
                with self.referencing():  # until the file is written: no collection deletes what it reuses
                    skeleton = tree.map_tensors(content, to_ref)
                    # Written and fsynced a few at a time: the file system commits their fsyncs together.
                    list(_pool.map(lambda item: self._write_blob(*item), new.items()))
                    fsync_dir(self.blobs)  # every renamed blob durable before the file that names them
                    envelope._write_file(Path(path), {**skeleton, 'blobs': {'refs': refs, **where}},
                                         digested=digests)  # (raises CheckpointError, not OSError)
            except OSError as err:
                raise self._failed(path, err) from err
        self.last = stats
        return digests

    def _failed(self, path: Path, err: OSError) -> faults.CheckpointError:
        return faults.CheckpointError(
            f"Could not write checkpoint {path}: storing its tensors in {self.blobs} failed: "
            f"{err.strerror or err}. The previous checkpoint is untouched; free disk space or "
            "fix permissions, then rerun to resume.")

    def referencing(self) -> StoreLock:
        """The store's lock, shared: held by whatever adds or moves references to its blobs (a
        save, a rollback moving files aside) so that no collection runs meanwhile."""
        return StoreLock(self.root)

    def check_own(self) -> None:
        """Refuse a blob folder that is a link: it would be another store (another Dora folder's
        or experiment's, whose blobs a collection here would delete)."""
        for blobs in dict.fromkeys([self.blobs, self.folder / BLOBS]):
            if blobs.is_symlink():
                raise faults.CheckpointError(
                    f"{blobs} is a symbolic link (to {os.readlink(blobs)}): refused, since writing or "
                    "collecting blobs there would change another store. Replace it with a folder of its own "
                    "(copy the blobs in, or `solver export` each checkpoint).")

    def _stored(self, key: str) -> bool:
        """Whether blob `key` is on disk and intact (checked once per process: `_trusted`)."""
        target = self.blobs / key
        if key in self._trusted and target.exists():
            return True
        if target.exists() and _intact(target, key, self.root):
            self._trusted.add(key)
            return True
        return False

    def _write_blob(self, key: str, tensor: torch.Tensor) -> None:
        """Make blob `key` hold `tensor`'s bytes (durable once the folder is fsynced)."""
        target = self.blobs / key
        flat = flat_bytes(tensor)
        tmp = self.blobs / f'.{key}.tmp.{os.getpid()}.{threading.get_native_id()}'  # other writers: other names
        try:
            with contextlib.suppress(FileNotFoundError):  # a link planted under this name is not followed
                os.unlink(tmp)
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   0o644), 'wb') as f:
                if flat.numel():
                    f.write(tp.cast(tp.Any, flat.view(torch.uint8).numpy()))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._trusted.add(key)

    def collect(self, wait: float = 0.0) -> list[str]:
        """Remove the blobs no checkpoint file references (`referenced`); return their keys.

        Runs only with the experiment lock of `folder` held (by this process, or taken here for
        the time of the call); refuses while another process holds it. Deletes from the shared
        store only under its lock held exclusive, waiting at most `wait` seconds for the saves and
        rollbacks holding it (then skipped, with a line in the log: a later collection does it).
        """
        with self._mutex, held_or_taken(self.folder):
            self.check_own()
            removed = []
            own = self.folder / BLOBS
            if self.shared and own.is_dir():  # the experiment's store of the layout before the shared one
                removed += self._remove_unused(own, self.folder, referenced(self.folder))
            if not self.blobs.is_dir():
                return removed
            try:
                with StoreLock(self.root, exclusive=True, wait=wait):
                    clean_stray_blobs(self.root)  # no save is under way: every temporary file is a killed one's
                    removed += self._remove_unused(self.blobs, self.root, self.referenced())
            except StoreBusyError as err:
                logger.info("Not collecting unused checkpoint blobs now: %s; a later save or `solver prune` "
                            "will.", err)
            return removed

    def _remove_unused(self, blobs: Path, inside: Path, used: set[str] | None) -> list[str]:
        if used is None:
            return []
        removed = []
        for name in sorted(os.listdir(blobs)):
            if KEY.match(name) and name not in used:
                unlink(blobs / name, inside=inside)  # through no link, even one made meanwhile
                self._trusted.discard(name)
                removed.append(name)
        if removed:
            fsync_dir(blobs)
        return removed

    def referenced(self) -> set[str] | None:
        """Keys of the blobs some checkpoint file that may use this store names (every
        experiment's of the Dora folder); None when one cannot be read (see `referenced`)."""
        if self.shared:
            return referenced(self.root / XPS, shared=True, seen=self._seen)
        return referenced(self.folder, seen=self._seen)

    def nbytes(self) -> int:
        """Bytes of the blobs on disk."""
        return sum(p.stat().st_size for p in self.blobs.iterdir() if KEY.match(p.name)) if self.blobs.is_dir() else 0


def checkpoint_files(folder: Path) -> list[Path]:
    """Every checkpoint file (`*.th`) under a folder (an experiment's, or a Dora folder's `xps/`),
    those moved aside included; links to folders are not followed."""
    found = []
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if name != BLOBS]
        found += [path for name in files if name.endswith('.th') and (path := Path(parent) / name).is_file()]
    return sorted(found)


def _refs(path: Path, shared: bool = False) -> list[str]:
    """The blob keys a checkpoint file names in the Dora folder's store (`shared`) or in a store
    of its experiment's (read without its tensors' bytes)."""
    payload = envelope.read_unverified(path)
    if not is_incremental(payload) or is_shared(payload) != shared:
        return []
    return [ref[0] for ref in payload['blobs']['refs'] if ref is not None]


Seen = dict[Path, tuple[tuple[int, ...], list[str]]]  # a file's identity (device, inode, size, mtime) -> its keys


def referenced(folder: Path, shared: bool = False, seen: Seen | None = None) -> set[str] | None:
    """Keys of the blobs some checkpoint file under `folder` names in the Dora folder's store
    (`shared`), else in the store of its experiment; None (and a warning) if a file cannot be
    read: then nothing may be collected. `seen`: the keys of files read before, reused while a
    file is the same (same inode, size and modification time: every save replaces a file by a
    new one), so that a collection after each save does not read every file of the Dora folder."""
    used: set[str] = set()
    listed = checkpoint_files(folder)
    for gone in set(seen or ()) - set(listed):
        del tp.cast(Seen, seen)[gone]
    for path in listed:
        try:
            info = os.lstat(path)
            identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            known = seen.get(path) if seen is not None else None
            keys = known[1] if known is not None and known[0] == identity else _refs(path, shared)
            if seen is not None:
                seen[path] = (identity, keys)
            used.update(keys)
        except Exception as err:  # damaged or foreign: its references are unknown
            if not os.path.lexists(path):  # deleted since it was listed (a prune): it names nothing now
                continue
            logger.warning("Not collecting unused checkpoint blobs: %s cannot be read (%s). Inspect it "
                           "(python -m solver.checkpointing.examine FILE), then repair or remove it.", path, err)
            return None
    return used


def _intact(blob: Path, key: str, inside: Path) -> bool:
    try:
        read_blob(blob, key, inside)
    except (OSError, faults.CorruptCheckpointError):
        return False
    return True


def consolidate(source: Path, target: Path) -> envelope.Checkpoint:
    """Write checkpoint `source` (incremental or not) as one self-contained file `target`.

    What `solver export` and copies to other machines use: the result needs no blob folder.
    """
    ckpt = envelope.read_checkpoint(Path(source))
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    envelope.write_checkpoint(Path(target), ckpt.state, ckpt.meta)
    return envelope.read_checkpoint(Path(target))


