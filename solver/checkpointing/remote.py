"""Checkpoints that outlive the machine: an experiment's checkpoints mirrored to object storage
through fsspec (s3fs, gcsfs, adlfs: any fsspec URL). Fetching them back: `fetch`; URLs, the
file system behind one and retries: `objectstore`.

    mirror = RemoteMirror('s3://bucket/runs/<sig>', xp_folder, retention)
    mirror.restore()                        # local folder has no checkpoint: fetch the newest intact
    mirror.notify(paths, history)           # after each durable save: mirror it, off the loop
    mirror.close()                          # end of run: wait (bounded); log what is not mirrored

Remote layout: `<url>/checkpoint.th`, `<url>/checkpoint_<epoch>.th` and, for a sharded checkpoint,
`<url>/<name>.dcp.<token>/<files>`: the same names as in the experiment folder.

Commit order. S3 has no rename: a key appears whole when its upload completes, but a set of keys
does not appear together. So each file goes to a temporary key `.<name>.tmp.<token>` and is then
moved to its final key, and the file that names a checkpoint (`checkpoint.th`) is moved last,
after every byte it references (its shard folder). The checkpoint file is the commit point: it
holds the xxh3 digests of everything it covers, shard files included, and a download is loaded
only once `envelope.read_checkpoint` has verified them. A kill at any moment leaves the previous
remote checkpoint intact beside stray temporary keys, which the next mirror removes; superseded
shard folders, and the epoch files retention does not keep, are deleted only after the new commit.

Retention. The remote copy keeps what the local folder keeps: the same `policy.Retention` decides,
over the remote and local epoch files, each ranked by the metric its local copy records (or, for
a file with no local copy, as from another machine, by the history handed over with each notice).

Rollback. `solver rollback` moves the abandoned branch's checkpoints aside locally and records
their names in the experiment folder (`record_abandoned`, `.remote_abandoned.json`); the mirror's
next sync deletes them remotely before it uploads anything, then removes the record. Without it
the store would keep (and a fresh machine fetch back) the branch the user abandoned.

Faults. The mirror runs on a thread of its own (nice 19): `notify` only records which files
changed. Failures are retried with exponential backoff, logged, never raised into training, and
never touch the local files; `close` waits at most `close_timeout` and sums up what is not
mirrored. Successive saves while the store is down coalesce: only the newest files are uploaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
import typing as tp
from pathlib import Path

from . import envelope, listing, naming, policy
from .fetch import download_newest_intact
from .fs import atomic_open, read_file, unlink
from .objectstore import SHARDS_RE, TMP_RE, RemoteError, check_url, filesystem, list_folder, named_shard_folder, redact
from .writer import background_priority

logger = logging.getLogger(__name__)

BACKOFF_ENV = 'SOLVER_REMOTE_MAX_BACKOFF'          # longest wait between retries, seconds
CLOSE_TIMEOUT_ENV = 'SOLVER_REMOTE_CLOSE_TIMEOUT'  # longest wait for the last uploads at the end


# -- listing ---------------------------------------------------------------------------------------


def _inode(path: Path) -> int | None:
    """The inode of `path`, None if there is no such file (now)."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


# -- rollbacks -------------------------------------------------------------------------------------

ABANDONED = '.remote_abandoned.json'  # checkpoint names a rollback abandoned, for the mirror to delete
_ABANDONED_BYTES = 1 << 20


def record_abandoned(folder: Path, names: tp.Iterable[str]) -> None:
    """Tell the experiment's remote mirror (at its next sync) that these checkpoint files of
    `folder` belong to a branch a rollback abandoned: they are deleted remotely before any upload."""
    names = set(names) | read_abandoned(folder)
    if names:
        with atomic_open(Path(folder) / ABANDONED) as f:
            f.write(json.dumps(sorted(names)).encode())


def read_abandoned(folder: Path) -> set[str]:
    """The checkpoint names recorded by `record_abandoned` (none if there is no record). A record
    that is not ours (not a list of checkpoint names) is refused, naming the file."""
    path = Path(folder) / ABANDONED
    try:
        names = json.loads(read_file(path, _ABANDONED_BYTES, inside=Path(folder)))
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as err:
        raise RemoteError(f"{path}: not a record of abandoned checkpoints ({err}); remove it, then check that "
                          "the remote copy holds no checkpoint newer than the local ones.") from err
    named = isinstance(names, list) and all(
        isinstance(name, str) and (name == naming.LATEST or naming.epoch_of(name) is not None) for name in names)
    if not named:
        raise RemoteError(f"{path}: not a list of checkpoint names; remove it, then check that the remote copy "
                          "holds no checkpoint newer than the local ones.")
    return set(names)


# -- mirroring -------------------------------------------------------------------------------------

class _Superseded(Exception):
    """A local file changed while it was being uploaded: a newer save will be mirrored instead."""


def _check_apart(fs: tp.Any, root: str, folder: Path, url: str) -> None:
    """Refuse a mirror on the local disk that is the experiment folder, inside it or holds it
    (`checkpoint.remote=file://<dora dir>/xps`): its uploads and prunes would rewrite and delete
    the very files they copy."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not {'file', 'local'} & set(protocols):
        return
    mirror, local = Path(os.path.realpath(root)), Path(os.path.realpath(folder))
    if mirror == local or local in mirror.parents or mirror in local.parents:
        raise RemoteError(f"checkpoint.remote={redact(url)} is the experiment folder {folder} (or inside it, or "
                          "holds it): mirroring there would overwrite and delete the checkpoints it copies. "
                          "Point it at a folder outside the Dora folder.")


class RemoteMirror:
    """Mirrors the checkpoints of an experiment folder to `url`, on a thread of its own."""

    def __init__(self, url: str, folder: Path, retention: policy.Retention | None = None,
                 max_backoff: float | None = None, close_timeout: float | None = None) -> None:
        self.url = check_url(url)
        self.folder = Path(folder)
        self.retention = retention  # None: no epoch file is deleted remotely
        self.max_backoff = max_backoff if max_backoff is not None else float(os.environ.get(BACKOFF_ENV, 60))
        self.close_timeout = (close_timeout if close_timeout is not None
                              else float(os.environ.get(CLOSE_TIMEOUT_ENV, 300)))
        self.fs, self.root = filesystem(self.url)
        _check_apart(self.fs, self.root, self.folder, self.url)
        self.token = secrets.token_hex(4)
        self.uploaded: list[str] = []       # final keys, relative to url, in the order they appeared
        self.failures = 0
        self.bytes = 0
        self._dirty: dict[str, int] = {}    # checkpoint names saved, not mirrored since -> notice number
        self._notices = 0
        self._history: tuple[float | None, ...] = ()  # the scores of the newest notice, for retention
        self._errors: dict[str, str] = {}   # name -> last error, while not mirrored
        self._pending = self._busy = self._closing = self._cleaned = False
        self._stop = False
        self._made: set[str] = set()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name='checkpoint-remote', daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"RemoteMirror({redact(self.url)})"

    # -- the training side (returns at once) ----------------------------------------------------

    def notify(self, saved: list[Path], history: tp.Sequence[float | None] = ()) -> None:
        """These checkpoint files are durable; mirror them soon. `history`: the score of every
        epoch so far, the metric of remote epoch files that have no local copy to read it from."""
        with self._cond:
            self._notices += 1
            self._history = tuple(history) or self._history
            self._dirty.update({Path(p).name: self._notices for p in saved})
            self._pending = True
            self._cond.notify_all()

    def restore(self) -> envelope.Checkpoint | None:
        """If the local folder holds no checkpoint, fetch the newest intact remote one into it."""
        if naming.candidates(self.folder):
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        begin = time.perf_counter()
        try:
            found = download_newest_intact(self.url, self.folder)
        except RemoteError as err:  # starting over could overwrite the remote copy with epoch 1
            raise RemoteError(f"{err} This experiment has no local checkpoint: to train it from scratch "
                              "without the remote copy, set checkpoint.remote=null.") from err
        if found is None:
            logger.info("No checkpoint in %s: nothing to fetch.", redact(self.url))
        else:
            logger.info("Fetched %s/%s (epoch %s, step %s) from object storage into %s in %.1fs.",
                        redact(self.url), found.path.name, found.meta.get('epoch'), found.meta.get('step'),
                        self.folder, time.perf_counter() - begin)
        return found

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every notified save is mirrored (or `timeout`); whether it is."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._pending or self._busy or self._dirty), timeout)

    def close(self, timeout: float | None = None) -> list[str]:
        """Wait for the last uploads (at most `timeout`, default `close_timeout`), stop, and log a
        summary; return the checkpoint files that are not mirrored (their local copies are intact)."""
        timeout = self.close_timeout if timeout is None else timeout
        with self._cond:
            if self._stop:  # closed already (a preempted run closes, then leaves through `finally`)
                return sorted(self._dirty)
            if not self._closing:
                self._closing = True
                self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            missing = sorted(self._dirty)
            errors = dict(self._errors)
        if missing:
            logger.error("Remote mirror %s: NOT mirrored: %s (%s). Their local copies are intact; "
                         "%d failed attempts during the run.", redact(self.url), ', '.join(missing),
                         '; '.join(f"{k}: {v}" for k, v in errors.items()) or 'still uploading at exit',
                         self.failures)
        else:
            logger.info("Remote mirror %s: up to date (%d files uploaded, %.1f MB; %d failed attempts "
                        "retried).", redact(self.url), len(self.uploaded), self.bytes / 1e6, self.failures)
        return missing

    # -- the mirror's thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        background_priority()
        delay = 1.0
        while True:
            with self._cond:
                while not self._pending and not (self._closing or self._stop):
                    self._cond.wait()
                if self._stop or not self._pending:
                    return
                self._pending, self._busy = False, True
                dirty = dict(self._dirty)
            try:
                self._sync(dirty)
            except Exception as err:  # never into training: logged, retried, summed up at close
                self.failures += 1
                self._cleaned = False  # a temporary key the failure left is removed by the retry
                message = f"{type(err).__name__}: {err}"
                with self._cond:
                    self._errors.update({name: message for name in self._dirty})
                    self._pending, self._busy = True, False
                logger.warning("Remote mirror %s: %s; retrying in %.0fs (local checkpoints are intact).",
                               redact(self.url), message, delay)
                with self._cond:
                    self._cond.wait_for(lambda: self._stop, timeout=delay)
                delay = min(2 * delay, self.max_backoff)
                continue
            delay = 1.0
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _done(self, name: str, dirty: dict[str, int]) -> None:
        """`name` is mirrored as of the notices in `dirty` (not of those that came since)."""
        with self._cond:
            if name in self._dirty and self._dirty[name] == dirty.get(name):
                del self._dirty[name]
            if name not in self._dirty:
                self._errors.pop(name, None)

    def _sync(self, dirty: dict[str, int]) -> None:
        """Bring the remote copy up to date with the local checkpoints, commit points last."""
        if not self._cleaned:
            self._clean_stray_keys()
            self._cleaned = True
        self._forget_abandoned()
        remote = list_folder(self.fs, self.root)
        local = [path.name for path in reversed(naming.candidates(self.folder))]  # checkpoint.th last
        dropped = self._not_kept(set(remote) | set(local))
        for name in (set(dirty) - set(local)) | (set(dirty) & dropped):
            self._done(name, dirty)  # pruned or replaced locally since, or not kept remotely: no upload
        for name in local:
            if name not in dropped and (name in dirty or name not in remote):
                try:
                    self._upload_checkpoint(name)
                except _Superseded:
                    if (self.folder / name).exists():
                        logger.debug("%s changed during its upload: the newer save is mirrored next.", name)
                    else:  # pruned locally meanwhile: nothing left to mirror
                        self._done(name, dirty)
                    continue
                self._done(name, dirty)
        self._apply_retention(dropped)

    def _forget_abandoned(self) -> None:
        """Delete remotely the checkpoints a rollback abandoned (`record_abandoned`), then the
        record; before any upload, so a name the new branch saves again is uploaded afresh."""
        names = read_abandoned(self.folder)
        if not names:
            return
        remote = list_folder(self.fs, self.root)
        for name in sorted(names & set(remote)):
            self.fs.rm_file(f'{self.root}/{name}')
            logger.info("Removed %s/%s: abandoned by a rollback.", redact(self.url), name)
        unlink(self.folder / ABANDONED, inside=self.folder)  # its shard folders go with `_apply_retention`

    def _upload_checkpoint(self, name: str) -> None:
        path = self.folder / name
        before = _inode(path)
        if before is None:
            raise _Superseded
        begin, sent = time.perf_counter(), self.bytes
        logger.debug("Mirroring %s to %s.", name, redact(self.url))
        shards = named_shard_folder(path)
        if shards is not None:  # every byte the file references first
            try:
                files = sorted(p for p in (self.folder / shards).iterdir() if p.is_file())
            except FileNotFoundError:
                raise _Superseded from None
            for file in files:
                self._put(file, f'{shards}/{file.name}')
        tmp = self._upload_tmp(path, name)
        if _inode(path) != before:  # replaced (may name other shards) or pruned meanwhile
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(tmp)
            raise _Superseded
        self._promote(tmp, name)  # the commit point
        if shards is not None:
            for entry, kind in list_folder(self.fs, self.root).items():
                if kind == 'directory' and entry != shards and entry.startswith(f'{name}.dcp.'):
                    self.fs.rm(f'{self.root}/{entry}', recursive=True)
        logger.info("Mirrored %s to %s (%.1f MB in %.1fs).", name, redact(self.url),
                    (self.bytes - sent) / 1e6, time.perf_counter() - begin)

    def _upload_tmp(self, path: Path, key: str) -> str:
        parent, _, base = f'{self.root}/{key}'.rpartition('/')
        tmp = f'{parent}/.{base}.tmp.{self.token}'
        if parent not in self._made:  # object stores have no folders; local and others do
            self.fs.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        try:
            size = os.stat(path).st_size
            self.fs.put_file(str(path), tmp)
        except FileNotFoundError as err:
            if not path.exists():  # pruned or replaced locally meanwhile: no temporary key left behind
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(tmp)
                raise _Superseded from err
            raise
        self.bytes += size
        return tmp

    def _promote(self, tmp: str, key: str) -> None:
        self.fs.mv(tmp, f'{self.root}/{key}')
        self.uploaded.append(key)
        logger.debug("Uploaded %s/%s", redact(self.url), key)

    def _put(self, path: Path, key: str) -> None:
        self._promote(self._upload_tmp(path, key), key)

    def _not_kept(self, names: set[str]) -> set[str]:
        """The epoch files among `names` (remote and local) that retention does not keep, each
        ranked by the metric its local copy records, else by the history of the last notice.

        Over the same files, the same decision as the local folder's. A fresh machine has fewer
        local files than the store: one it keeps locally (the best of the few it has) but not
        remotely (the store holds better ones) is not uploaded, rather than uploaded and deleted."""
        if self.retention is None:
            return set()
        with self._cond:
            history = self._history
        local = {path.name: file for path, file in listing.epoch_files(self.folder, history).items()}
        named = {epoch: name for name in names if (epoch := naming.epoch_of(name)) is not None}
        files = [local.get(name) or policy.EpochFile(epoch, listing.history_metric(history, epoch))
                 for epoch, name in named.items()]
        return {named[epoch] for epoch in self.retention.decide(files).removed}

    def _apply_retention(self, dropped: set[str]) -> None:
        """After the commit: delete the epoch files retention does not keep (name first, then its
        shard folders), and shard folders whose checkpoint file is gone."""
        remote = list_folder(self.fs, self.root)
        for name in sorted(dropped & set(remote)):
            self.fs.rm_file(f'{self.root}/{name}')
            logger.info("Removed old checkpoint %s/%s (kept: %s).", redact(self.url), name,
                        self.retention.why() if self.retention else '')
            remote.pop(name)
        for entry, kind in remote.items():
            match = SHARDS_RE.match(entry)
            if kind == 'directory' and match and match.group(1) not in remote:
                self.fs.rm(f'{self.root}/{entry}', recursive=True)

    def _clean_stray_keys(self) -> None:
        """Remove the temporary keys of uploads cut short (a kill, a lost connection)."""
        try:
            keys = self.fs.find(self.root)
        except FileNotFoundError:
            return
        for key in keys:
            if TMP_RE.match(key.rsplit('/', 1)[-1]):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(key)
