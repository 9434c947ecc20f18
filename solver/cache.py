"""The data cache: what a run derives from its data files (a parsed corpus), kept for the next run.

A resume, a rollback or another experiment on the same files reads the derived arrays back instead
of deriving them again. The cache is a folder (`<dora dir>/cache/` by default, shared by every
experiment of the Dora folder: a grid of ten experiments on one corpus parses it once). An entry
is named by a digest of its key, which the caller makes of everything that shapes the value: the
files' names and contents (`files_digest`), the settings, the version of the code that derives it.

The stored form is plain arrays, never a pickle: a file is a magic line, the xxh3-128 digest of the
rest, then safetensors bytes holding the caller's arrays, the key and a JSON `info`. It is written
atomically (`fs.atomic_open`: two experiments starting at once each write a whole file and the
last rename wins) and read as input from elsewhere (`fs.read_file`: no link, FIFO or device, at
most the folder's bound), then checked (magic, digest, the key it records, the caller's `decode`).
A damaged or mismatched entry is reported in one line and rebuilt; a write that fails (a full
disk) is reported and the run goes on. The folder is bounded: beyond `max_bytes`, the least
recently used entries are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import typing as tp
from pathlib import Path

import numpy as np
import safetensors.numpy
import xxhash

from .checkpointing import fs

logger = logging.getLogger(__name__)
T = tp.TypeVar('T')
MAGIC = b'solver data cache 1\n'
DIGEST_BYTES = 16  # xxh3-128
SUFFIX = '.cache'
STALE_TEMPORARY_S = 3600  # a temporary file this old was left by a killed writer
_KEY, _INFO = '__key__', '__info__'  # reserved array names


class Entry(tp.NamedTuple):
    """What is stored: named numpy arrays (numbers, no objects) and JSON-able `info`."""

    arrays: dict[str, np.ndarray]
    info: dict[str, tp.Any]


class Codec(tp.Protocol[T]):
    """How a value is stored: `decode(encode(v))` gives `v` back; `decode` raises ValueError on an
    entry that is not consistent (the cache then rebuilds it)."""

    def encode(self, value: T) -> Entry: ...

    def decode(self, entry: Entry) -> T: ...


class DamagedEntryError(ValueError):
    """A cache file that is not what was written for its key: rebuilt, never used."""


def files_digest(root: Path, paths: tp.Iterable[Path]) -> str:
    """xxh3-128 of the files' paths relative to `root` and their bytes: a new, changed, renamed or
    removed file changes it."""
    digest = xxhash.xxh3_128()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode('utf-8') + b'\0')
        content = xxhash.xxh3_128()
        with open(path, 'rb') as f:
            while chunk := f.read(1 << 20):
                content.update(chunk)
        digest.update(content.digest())
    return digest.hexdigest()


class DataCache:
    """Entries in `folder`, at most `max_bytes` in all (least recently used removed first)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def path(self, name: str, key: tp.Mapping[str, tp.Any]) -> Path:
        """The file of the entry `name` for `key` (any JSON-able mapping)."""
        return self.folder / f"{name}-{xxhash.xxh3_128_hexdigest(_canonical(key))}{SUFFIX}"

    def get(self, name: str, key: tp.Mapping[str, tp.Any], build: tp.Callable[[], T], codec: Codec[T]) -> T:
        """The value cached for `key`, else `build()`, then cached. Says which in the log."""
        path, wanted = self.path(name, key), _canonical(key)
        start = time.monotonic()
        try:
            value = codec.decode(self._read(path, wanted))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as err:  # damaged, unsafe, not what decode expects
            logger.warning("Data cache %s cannot be used (%s): rebuilding it.", path, err)
        else:
            with contextlib.suppress(OSError):  # the recency that eviction goes by
                os.utime(path, follow_symlinks=False)
            logger.info("Read %s from the data cache %s in %.2f s.", name, path, time.monotonic() - start)
            return value
        value = build()
        self._write(path, wanted, codec.encode(value))
        return value

    def _read(self, path: Path, wanted: bytes) -> Entry:
        data = fs.read_file(path, self.max_bytes, inside=self.folder)
        if not data.startswith(MAGIC):
            raise DamagedEntryError("not a data cache file")
        stored, body = data[len(MAGIC):len(MAGIC) + DIGEST_BYTES], data[len(MAGIC) + DIGEST_BYTES:]
        if xxhash.xxh3_128_digest(body) != stored:
            raise DamagedEntryError("its digest does not match its bytes: truncated or altered")
        try:
            arrays = safetensors.numpy.load(body)
            key, info = arrays.pop(_KEY), arrays.pop(_INFO)
        except Exception as err:  # safetensors raises its own SafetensorError; a missing name KeyError
            raise DamagedEntryError(f"unreadable arrays ({err})") from None
        if key.tobytes() != wanted:
            raise DamagedEntryError("it was written for another key")
        return Entry(arrays, json.loads(info.tobytes()))

    def _write(self, path: Path, key: bytes, entry: Entry) -> None:
        arrays = {**entry.arrays, _KEY: np.frombuffer(key, np.uint8),
                  _INFO: np.frombuffer(json.dumps(entry.info).encode('utf-8'), np.uint8)}
        body = safetensors.numpy.save(arrays)
        size = len(MAGIC) + DIGEST_BYTES + len(body)
        if size > self.max_bytes:
            logger.info("Not cached: %s would take %.1f MB, more than the cache's bound (cache.max_mb).",
                        path.name, size / 1e6)
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with fs.atomic_open(path) as f:
                f.write(MAGIC + xxhash.xxh3_128_digest(body) + body)
            self._evict(keep=path)
        except OSError as err:
            logger.warning("Data cache %s not written (%s); the run goes on without it.", path, err)
            return
        logger.info("Cached in %s (%.1f MB).", path, size / 1e6)

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used entries beyond `max_bytes`, and stale temporary files."""
        entries, now = [], time.time()
        with os.scandir(self.folder) as found:
            for item in found:
                if not item.is_file(follow_symlinks=False):
                    continue
                info = item.stat(follow_symlinks=False)
                if item.name.endswith(SUFFIX) and item.name != keep.name:
                    entries.append((info.st_mtime, info.st_size, item.name))
                elif '.tmp.' in item.name and now - info.st_mtime > STALE_TEMPORARY_S:
                    fs.unlink(self.folder / item.name, inside=self.folder)
        total = sum(size for _, size, _ in entries) + keep.stat().st_size
        for _, size, name in sorted(entries):
            if total <= self.max_bytes:
                break
            fs.unlink(self.folder / name, inside=self.folder)
            total -= size
            logger.info("Data cache: removed %s, the least recently used entry (cache.max_mb).", name)


def _canonical(key: tp.Mapping[str, tp.Any]) -> bytes:
    return json.dumps(key, sort_keys=True, separators=(',', ':')).encode('utf-8')


def from_config(cfg: tp.Any, dora_dir: Path) -> DataCache | None:
    """The data cache `cache.*` asks for (None with `cache.use=false`): `cache.dir`, else
    `<dora dir>/cache`, bounded by `cache.max_mb`."""
    options = cfg.get('cache') or {}
    if not options.get('use', False):
        return None
    folder = Path(os.path.expanduser(str(options['dir']))) if options.get('dir') else dora_dir / 'cache'
    return DataCache(folder, int(float(options.get('max_mb', 1024)) * 1e6))
