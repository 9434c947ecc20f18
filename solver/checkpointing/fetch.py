"""Fetching checkpoints back from object storage: the newest remote checkpoint that verifies
(`download_newest_intact`, what a run on an empty folder resumes from), and a local copy of a
remote file or experiment folder for any command that takes a local one (`fetch_source`).

A download is used only once `envelope.read_checkpoint` has verified it; a damaged or partial
one is reported and the next older tried.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import typing as tp
from pathlib import Path

from . import envelope, faults, naming
from .fs import fsync_dir
from .objectstore import (
    TMP_RE,
    RemoteError,
    candidate_names,
    check_url,
    filesystem,
    list_folder,
    named_shard_folder,
    redact,
    retrying,
)

logger = logging.getLogger(__name__)

_STAGING = '.remote-fetch.'


def _download(fs: tp.Any, root: str, name: str, target: Path) -> Path:
    """Download checkpoint `name` (and the shard folder it names) from `root` into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    fs.get_file(f'{root}/{name}', str(path))
    folder = named_shard_folder(path)
    if folder is not None:  # missing remotely: read_checkpoint reports the missing folder
        with contextlib.suppress(FileNotFoundError):
            for entry, kind in list_folder(fs, f'{root}/{folder}').items():
                if kind == 'file' and not TMP_RE.match(entry) and entry not in ('.', '..'):
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
    fs, root = filesystem(url)
    names = candidate_names(retrying(f"Listing {redact(url)}", lambda: list_folder(fs, root)))
    if not names:
        return None
    folder = Path(folder)
    staging = folder / f'{_STAGING}{os.getpid()}'
    errors = []
    try:
        for name in names:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                path = retrying(f"Downloading {redact(url)}/{name}",
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
    fs, root = filesystem(url)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if retrying(f"Looking up {redact(url)}", lambda: fs.isfile(root)):
        parent, _, name = root.rpartition('/')
        path = retrying(f"Downloading {redact(url)}", lambda: _download(fs, parent, name, cache_dir))
        logger.info("Downloaded %s into %s.", redact(url), cache_dir)
        return path
    found = download_newest_intact(url, cache_dir, resumable=False)
    if found is None:
        raise RemoteError(f"{redact(url)} is neither a checkpoint file nor a folder holding "
                          f"{naming.LATEST} or checkpoint_<epoch>.th.")
    logger.info("Downloaded %s/%s (epoch %s) into %s.", redact(url), found.path.name, found.meta.get('epoch'),
                cache_dir)
    return cache_dir
