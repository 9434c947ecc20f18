"""Checkpoints that outlive the machine: an experiment's checkpoints mirrored to object storage
through fsspec (s3fs, gcsfs, adlfs: any fsspec URL), and fetched back from there.

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

Faults. The mirror runs on a thread of its own (nice 19): `notify` only records which files
changed. Failures are retried with exponential backoff, logged, never raised into training, and
never touch the local files; `close` waits at most `close_timeout` and sums up what is not
mirrored. Successive saves while the store is down coalesce: only the newest files are uploaded.

Credentials come from the storage library's own environment variables and config files
(`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `~/.aws/...`); a URL carrying credentials is refused,
so none reaches a log, a checkpoint's config or Dora's history.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import shutil
import threading
import time
import typing as tp
import urllib.parse
from pathlib import Path

import torch

from . import envelope, faults, listing, naming, policy
from .fs import fsync_dir
from .writer import background_priority

logger = logging.getLogger(__name__)

BACKOFF_ENV = 'SOLVER_REMOTE_MAX_BACKOFF'          # longest wait between retries, seconds
CLOSE_TIMEOUT_ENV = 'SOLVER_REMOTE_CLOSE_TIMEOUT'  # longest wait for the last uploads at the end
_TMP_RE = re.compile(r'^\.(.+)\.tmp\.[0-9a-f]+$')
_SHARDS_RE = re.compile(r'^(.+)\.dcp\.[^/]+$')
_STAGING = '.remote-fetch.'


class RemoteError(faults.CheckpointError):
    """The remote store could not be reached or holds nothing usable; the message names the URL."""


def redact(url: str) -> str:
    """The URL without user info or query string: what may be logged."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition('@')[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, '', ''))


def check_url(url: str, key: str = 'checkpoint.remote') -> str:
    """The URL, refused if it carries credentials (they would land in logs, configs, history)."""
    if not naming.is_url(url):
        raise RemoteError(f"{key}={url!r} is not a URL: expected e.g. s3://bucket/runs.")
    parts = urllib.parse.urlsplit(url)
    if '@' in parts.netloc or parts.query:
        raise RemoteError(
            f"{key}={redact(url)}...: the URL carries credentials or options, which would be saved in "
            "checkpoints and Dora's history. Give credentials through the storage library's "
            "environment variables or config files (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws).")
    return url.rstrip('/')


def _url_override(arg: str) -> tuple[str, str] | None:
    """(key, URL) of a `key=URL` override (the URL unquoted), else None."""
    key, equals, value = str(arg).partition('=')
    value = value.strip('\'"')
    return (key, value) if equals and naming.is_url(value) else None


def secret_in(argv: tp.Sequence[str]) -> str | None:
    """The first `key=URL` override of `argv` whose URL carries credentials or options, redacted
    (None if none): checked before Dora and Hydra write the overrides into the experiment
    folder (`.argv.json`, `.hydra/*.yaml`), where a secret would stay."""
    for arg in argv:
        found = _url_override(arg)
        if found is not None:
            parts = urllib.parse.urlsplit(found[1])
            if '@' in parts.netloc or parts.query:
                return f"{found[0].lstrip('+')}={redact(found[1])}"
    return None


def redact_overrides(argv: tp.Iterable[str]) -> list[str]:
    """Overrides with the user info and query of every URL value removed: what may be printed
    (`solver ls`, `solver show`) of an experiment recorded before `secret_in` refused them."""
    return [f"{found[0]}={redact(found[1])}" if (found := _url_override(arg)) is not None else str(arg)
            for arg in argv]


def _filesystem(url: str) -> tuple[tp.Any, str]:
    """fsspec's filesystem for `url` and the path within it (`url_to_fs`)."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise RemoteError(f"Cannot open {redact(url)}: {err}. For s3:// URLs install s3fs "
                          "(pip install 'solver[remote]').") from err
    except Exception as err:  # some file systems connect at once (ftp: ConnectionRefusedError...)
        raise RemoteError(f"Cannot open {redact(url)}: {type(err).__name__}: {err}. Check the URL, that "
                          "the server is reachable, and credentials (given through the environment).") from err


def _retrying(what: str, function: tp.Callable[[], tp.Any], attempts: int = 4) -> tp.Any:
    """`function()`, retried with backoff on errors other than 'not found'; RemoteError at last."""
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return function()
        except (FileNotFoundError, faults.CheckpointError):
            raise
        except Exception as err:  # the storage libraries raise their own types (botocore...)
            if attempt == attempts:
                raise RemoteError(f"{what} failed {attempts} times, last: {type(err).__name__}: {err}. "
                                  "Check the URL, the endpoint and credentials (AWS_ENDPOINT_URL, "
                                  "AWS_ACCESS_KEY_ID...).") from err
            logger.warning("%s failed (%s: %s); retry %d/%d in %.0fs.", what, type(err).__name__, err,
                           attempt, attempts - 1, delay)
            time.sleep(delay)
            delay *= 2


# -- listing ---------------------------------------------------------------------------------------

def _listing(fs: tp.Any, root: str) -> dict[str, str]:
    """Names directly under `root` -> 'file' or 'directory' (fresh: fsspec's listing cache dropped)."""
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {entry['name'].rstrip('/').rsplit('/', 1)[-1]: entry['type'] for entry in entries
            if entry['name'].rstrip('/') != root.rstrip('/')}


def _candidates(names: tp.Iterable[str]) -> list[str]:
    """Checkpoint names, the one to try first first: as `naming.candidates` orders local files."""
    names = set(names)
    epochs = sorted((e, n) for n in names if (e := naming.epoch_of(n)) is not None)
    return ([naming.LATEST] if naming.LATEST in names else []) + [n for _, n in reversed(epochs)]


def _inode(path: Path) -> int | None:
    """The inode of `path`, None if there is no such file (now)."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def named_shard_folder(path: Path) -> str | None:
    """The shard folder a checkpoint file names (sharded checkpoints), read without loading its
    tensors (weights-only, memory-mapped); None if it names none or cannot be read (the full
    verification of `envelope.read_checkpoint` then reports why)."""
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        folder = payload.get('shards', {}).get('folder') if isinstance(payload, dict) else None
    except Exception:
        return None
    return folder if isinstance(folder, str) and '/' not in folder and folder.startswith(Path(path).name) else None


# -- downloading -----------------------------------------------------------------------------------

def _download(fs: tp.Any, root: str, name: str, target: Path) -> Path:
    """Download checkpoint `name` (and the shard folder it names) from `root` into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    fs.get_file(f'{root}/{name}', str(path))
    folder = named_shard_folder(path)
    if folder is not None:  # missing remotely: read_checkpoint reports the missing folder
        with contextlib.suppress(FileNotFoundError):
            for entry, kind in _listing(fs, f'{root}/{folder}').items():
                if kind == 'file' and not _TMP_RE.match(entry) and entry not in ('.', '..'):
                    (target / folder).mkdir(exist_ok=True)
                    fs.get_file(f'{root}/{folder}/{entry}', str(target / folder / entry))
    return path


def download_newest_intact(url: str, folder: Path, resumable: bool = True) -> envelope.Checkpoint | None:
    """Download the newest remote checkpoint of `url` that verifies into `folder`; its Checkpoint.

    Candidates are tried as locally (latest, then epoch files from the newest); a damaged or
    partial one (or, with `resumable`, one holding only some states) is reported and the next
    older tried. The file lands in `folder` only once verified, its shard folder first. Returns
    None when there is no remote checkpoint; raises RemoteError when some exist but none is
    usable, or the store cannot be reached.
    """
    url = url.rstrip('/')
    fs, root = _filesystem(url)
    names = _candidates(_retrying(f"Listing {redact(url)}", lambda: _listing(fs, root)))
    if not names:
        return None
    folder = Path(folder)
    staging = folder / f'{_STAGING}{os.getpid()}'
    errors = []
    try:
        for name in names:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                path = _retrying(f"Downloading {redact(url)}/{name}",
                                 functools.partial(_download, fs, root, name, staging))
                found = envelope.read_checkpoint(path)
            except (FileNotFoundError, faults.CorruptCheckpointError) as err:
                logger.error("Skipping damaged remote checkpoint %s/%s: %s", redact(url), name, err)
                errors.append(f"{name}: {err}")
                continue
            if resumable and found.meta.get('partial'):
                logger.warning("Skipping remote %s/%s: it holds only %s (checkpoint.keep_every_states).",
                               redact(url), name, found.meta['partial'])
                errors.append(f"{name}: holds only {found.meta['partial']}")
                continue
            for staged in sorted(staging.iterdir(), key=lambda p: p.name == name):  # the file last
                if staged.is_dir():
                    shutil.rmtree(folder / staged.name, ignore_errors=True)
                os.replace(staged, folder / staged.name)
            fsync_dir(folder)
            found.path = folder / name
            return found
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    raise RemoteError(f"No remote checkpoint of {redact(url)} can be used, refusing to start over "
                      "silently:\n  " + "\n  ".join(errors))


def fetch_source(url: str, cache_dir: Path) -> Path:
    """A local copy of a remote checkpoint file or experiment folder, for the usual local path.

    For a file: the file (and its shard folder) in `cache_dir`, not yet verified (reading it
    verifies). For a folder: `cache_dir` holding its newest intact checkpoint, verified. What
    `continue_from=<URL>` and the `solver` commands (ls, show, verify, export) call on a URL.
    """
    url = check_url(url, 'source')
    fs, root = _filesystem(url)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if _retrying(f"Looking up {redact(url)}", lambda: fs.isfile(root)):
        parent, _, name = root.rpartition('/')
        path = _retrying(f"Downloading {redact(url)}", lambda: _download(fs, parent, name, cache_dir))
        logger.info("Downloaded %s into %s.", redact(url), cache_dir)
        return path
    found = download_newest_intact(url, cache_dir, resumable=False)
    if found is None:
        raise RemoteError(f"{redact(url)} is neither a checkpoint file nor a folder holding "
                          f"{naming.LATEST} or checkpoint_<epoch>.th.")
    logger.info("Downloaded %s/%s (epoch %s) into %s.", redact(url), found.path.name, found.meta.get('epoch'),
                cache_dir)
    return cache_dir


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
        self.fs, self.root = _filesystem(self.url)
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
        remote = _listing(self.fs, self.root)
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
            for entry, kind in _listing(self.fs, self.root).items():
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
        remote = _listing(self.fs, self.root)
        for name in sorted(dropped & set(remote)):
            self.fs.rm_file(f'{self.root}/{name}')
            logger.info("Removed old checkpoint %s/%s (kept: %s).", redact(self.url), name,
                        self.retention.why() if self.retention else '')
            remote.pop(name)
        for entry, kind in remote.items():
            match = _SHARDS_RE.match(entry)
            if kind == 'directory' and match and match.group(1) not in remote:
                self.fs.rm(f'{self.root}/{entry}', recursive=True)

    def _clean_stray_keys(self) -> None:
        """Remove the temporary keys of uploads cut short (a kill, a lost connection)."""
        try:
            keys = self.fs.find(self.root)
        except FileNotFoundError:
            return
        for key in keys:
            if _TMP_RE.match(key.rsplit('/', 1)[-1]):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(key)
