"""Incremental checkpoints: each tensor's bytes stored once per experiment (content-addressed).

With `checkpoint.incremental=true` a checkpoint file (`checkpoint.th`, `checkpoint_<epoch>.th`)
keeps its format (header, meta, digests of the whole state) but holds only small tensors
itself; every tensor of `INLINE_BYTES` or more is a 0-element placeholder in the file and its
bytes live in `<xp>/blobs/<key>`, written once and shared by every checkpoint that holds the
same bytes: the best state equal to the live model, EMA weights equal to them, the latest and
the epoch file of one save, frozen layers and unchanged buffers across epochs.

    {'format': ..., 'version': ..., 'meta': ..., 'state': <placeholders>,
     'blobs': {'refs': [None | (key, dtype, shape), ...]},   # one per tensor, traversal order
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
`envelope`). Collection (`collect`) removes blobs that no checkpoint file under the experiment
folder references (the `rolled_back/` ones included), only while the experiment lock (`lock`) is
held and never during a save of the same store; a checkpoint file that cannot be read stops
it (its blobs cannot be known). A kill -9 at any moment leaves at worst unreferenced blobs or
temporary files, removed later.

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
from .blobs import BLOBS, KEY, blob_key, is_incremental, read_blob
from .digest import flat_bytes
from .fs import fsync_dir, unlink
from .lock import held_or_taken

logger = logging.getLogger(__name__)

INLINE_BYTES = 512    # smaller tensors stay in the checkpoint file: a file each would cost more


_pool = ThreadPoolExecutor(4, thread_name_prefix='checkpoint-blobs')


@dataclass
class WriteStats:
    """Bytes of tensors one `write` stored anew, and bytes it found already stored."""

    written: int = 0
    reused: int = 0


class IncrementalStore:
    """The blob store of one experiment folder: writes incremental checkpoints, collects blobs.

    One instance per folder and process: `write` and `collect` exclude each other, so a
    collection running beside a save never sees that save's blobs as unreferenced.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.blobs = self.folder / BLOBS
        self._mutex = threading.Lock()
        self._trusted: set[str] = set()  # written or verified by this process
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

        with self._mutex:
            try:
                self.blobs.mkdir(parents=True, exist_ok=True)
                self.check_own()
                skeleton = tree.map_tensors(content, to_ref)
                # Written and fsynced a few at a time: the file system commits their fsyncs together.
                list(_pool.map(lambda item: self._write_blob(*item), new.items()))
                fsync_dir(self.blobs)  # every renamed blob durable before the file that names them
            except OSError as err:
                raise faults.CheckpointError(
                    f"Could not write checkpoint {path}: storing its tensors in {self.blobs} failed: "
                    f"{err.strerror or err}. The previous checkpoint is untouched; free disk space or "
                    "fix permissions, then rerun to resume.") from err
            envelope._write_file(Path(path), {**skeleton, 'blobs': {'refs': refs}}, digested=digests)
        self.last = stats
        return digests

    def check_own(self) -> None:
        """Refuse a blob folder that is a link: it would be another store (another experiment's,
        whose blobs a collection here would delete)."""
        if self.blobs.is_symlink():
            raise faults.CheckpointError(
                f"{self.blobs} is a symbolic link (to {os.readlink(self.blobs)}): refused, since writing or "
                "collecting blobs there would change another store. Replace it with a folder of its own "
                "(copy the blobs in, or `solver export` each checkpoint).")

    def _stored(self, key: str) -> bool:
        """Whether blob `key` is on disk and intact (checked once per process: `_trusted`)."""
        target = self.blobs / key
        if key in self._trusted and target.exists():
            return True
        if target.exists() and _intact(target, key, self.folder):
            self._trusted.add(key)
            return True
        return False

    def _write_blob(self, key: str, tensor: torch.Tensor) -> None:
        """Make blob `key` hold `tensor`'s bytes (durable once the folder is fsynced)."""
        target = self.blobs / key
        flat = flat_bytes(tensor)
        tmp = self.blobs / f'.{key}.tmp.{os.getpid()}'
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

    def collect(self) -> list[str]:
        """Remove the blobs no checkpoint file under the folder references; return their keys.

        Runs only with the experiment lock held (by this process, or taken here for the time of
        the call); refuses while another process holds it. Never runs during a `write`.
        """
        with self._mutex, held_or_taken(self.folder):
            self.check_own()
            if not self.blobs.is_dir():
                return []
            used = referenced(self.folder)
            if used is None:
                return []
            removed = []
            for name in sorted(os.listdir(self.blobs)):
                if KEY.match(name) and name not in used:
                    unlink(self.blobs / name, inside=self.folder)  # through no link, even one made meanwhile
                    self._trusted.discard(name)
                    removed.append(name)
            if removed:
                fsync_dir(self.blobs)
            return removed

    def nbytes(self) -> int:
        """Bytes of the blobs on disk."""
        return sum(p.stat().st_size for p in self.blobs.iterdir()) if self.blobs.is_dir() else 0


def checkpoint_files(folder: Path) -> list[Path]:
    """Every checkpoint file under an experiment folder, those moved aside included."""
    return sorted(p for p in Path(folder).rglob('*.th') if p.is_file() and BLOBS not in p.parts)


def _refs(path: Path) -> list[str]:
    """The blob keys a checkpoint file names (read without its tensors' bytes)."""
    payload = envelope.read_unverified(path)
    if not is_incremental(payload):
        return []
    return [ref[0] for ref in payload['blobs']['refs'] if ref is not None]


def referenced(folder: Path) -> set[str] | None:
    """Keys of the blobs some checkpoint file under `folder` names; None (and a warning) if a
    file cannot be read: then nothing may be collected."""
    used: set[str] = set()
    for path in checkpoint_files(folder):
        try:
            used.update(_refs(path))
        except Exception as err:  # damaged or foreign: its references are unknown
            logger.warning("Not collecting unused checkpoint blobs: %s cannot be read (%s).", path, err)
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


