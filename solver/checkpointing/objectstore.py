"""Object storage as a place checkpoints live, named by an fsspec URL (s3fs, gcsfs, adlfs...).

What the remote mirror (`remote`) and fetching (`fetch`) share: a URL is checked and redacted,
so that credentials never reach a log, a checkpoint's config or Dora's history (`check_url`,
`secret_in`, `redact_overrides`); the file system behind a URL (`filesystem`); calls retried
with backoff (`retrying`); a remote folder listed fresh, and its checkpoint names in the order
they are tried. The layout is the experiment folder's: `<url>/checkpoint.th`,
`<url>/checkpoint_<epoch>.th`, `<url>/<name>.dcp.<token>/<files>`; uploads go through temporary
keys `.<name>.tmp.<token>`.

Credentials come from the storage library's own environment variables and config files
(`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `~/.aws/...`); a URL carrying credentials is refused.
"""

from __future__ import annotations

import logging
import re
import time
import typing as tp
import urllib.parse
from pathlib import Path

import torch

from . import faults, naming

logger = logging.getLogger(__name__)

TMP_RE = re.compile(r'^\.(.+)\.tmp\.[0-9a-f]+$')

SHARDS_RE = re.compile(r'^(.+)\.dcp\.[^/]+$')


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


def filesystem(url: str) -> tuple[tp.Any, str]:
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


def retrying(what: str, function: tp.Callable[[], tp.Any], attempts: int = 4) -> tp.Any:
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


def list_folder(fs: tp.Any, root: str) -> dict[str, str]:
    """Names directly under `root` -> 'file' or 'directory' (fresh: fsspec's listing cache dropped)."""
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {entry['name'].rstrip('/').rsplit('/', 1)[-1]: entry['type'] for entry in entries
            if entry['name'].rstrip('/') != root.rstrip('/')}


def candidate_names(names: tp.Iterable[str]) -> list[str]:
    """Checkpoint names, the one to try first first: as `naming.candidates` orders local files."""
    names = set(names)
    epochs = sorted((e, n) for n in names if (e := naming.epoch_of(n)) is not None)
    return ([naming.LATEST] if naming.LATEST in names else []) + [n for _, n in reversed(epochs)]


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
