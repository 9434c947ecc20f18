"""How checkpoints are named: the files of an experiment folder, and the one grammar a user
names a checkpoint with, on the command line (`solver show NAME`) and in runs (`continue_from`).

Files: `checkpoint.th` is the latest, `checkpoint_<epoch>.th` the files kept per epoch;
`candidates` orders them for a resume (the latest first, then epochs from the newest).

Names (`parse`, then `locate` against an experiments folder, `<dora.dir>/xps`):

    s3://bucket/runs/<sig>[/checkpoint.th]   a URL (fsspec): fetched by the caller, then located
    //pretrained/<NAME>                      a model `solver export` wrote (the caller finds it)
    //sig/<SIG>[/<file>]                     exactly that experiment of this Dora folder
    <path>                                   a checkpoint file or an experiment folder on disk
    <sig> | <unique prefix of a sig>         an experiment of this Dora folder (as with git)
    <sig>/<file>                             a file of that experiment (`<sig>/checkpoint_3.th`)

A local path wins over a signature of the same spelling. Torch-free: parsing and locating
touch no tensor.
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass
from pathlib import Path

from .faults import CheckpointError

LATEST = 'checkpoint.th'
_EPOCH_RE = re.compile(r'^checkpoint_(\d+)\.th$')


def epoch_checkpoint_path(folder: Path, epoch: int) -> Path:
    return Path(folder) / f'checkpoint_{epoch}.th'


def epoch_of(path: str | Path) -> int | None:
    """The epoch in a `checkpoint_<epoch>.th` name (a path or a bare name), else None."""
    match = _EPOCH_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def epoch_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The `checkpoint_<epoch>.th` files of a folder, oldest first."""
    return sorted((epoch, path) for path in Path(folder).glob('checkpoint_*.th')
                  if (epoch := epoch_of(path)) is not None)


def candidates(folder: Path) -> list[Path]:
    """Checkpoint files of an experiment folder, the one to try first first.

    The latest file comes first, then epoch checkpoints from the newest: if the latest is damaged,
    the newest intact epoch checkpoint is the next best place to resume from.
    """
    folder = Path(folder)
    found = [folder / LATEST] if (folder / LATEST).exists() else []
    found += [path for _, path in reversed(epoch_checkpoints(folder))]
    return found


# ---------------------------------------------------------------------------------------------
# The grammar of checkpoint names

_URL_RE = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
PRETRAINED = '//pretrained/'
SIGNATURE = '//sig/'


class NamingError(CheckpointError):
    """A name that names no checkpoint: malformed, or naming nothing that exists (the message
    says which, and what is near)."""


class Form(enum.Enum):
    URL = 'url'                 # fetched by the caller, then located as a local path
    PRETRAINED = 'pretrained'   # //pretrained/NAME
    SIGNATURE = 'signature'     # //sig/SIG[/file]: that experiment exactly
    LOCAL = 'local'             # a path, else a signature, a unique prefix of one, or <sig>/<file>


@dataclass(frozen=True)
class CheckpointName:
    """What a name says before any file system is asked.

    `value` is the URL, the pretrained name, the signature (`//sig/`) or the text as a path;
    `sig` and `file` the experiment and the file in it that a name may mean (`//sig/SIG/FILE`,
    or a local name that is no existing path: `<sig>`, `<prefix>`, `<sig>/<file>`)."""

    text: str
    form: Form
    value: str
    sig: str | None = None
    file: str | None = None


def is_url(text: str) -> bool:
    """Whether `text` is an fsspec URL (`s3://...`, `gs://...`, `file://...`), not a local path."""
    return bool(_URL_RE.match(text))


def _part(text: str, part: str, what: str) -> str:
    """`part` checked to be one path component (no '/', not '.' or '..', not empty)."""
    if not part or '/' in part or part in ('.', '..'):
        raise NamingError(f"'{text}': {what} (e.g. {PRETRAINED}<NAME> or {SIGNATURE}<SIG>).")
    return part


def parse(text: str) -> CheckpointName:
    """The form of a checkpoint name (see the module doc); raises `NamingError` when malformed."""
    text = str(text)
    if not text.strip():
        raise NamingError("An empty checkpoint name: give a file, a folder, a signature, //sig/<SIG>, "
                          "//pretrained/<NAME> or a URL.")
    if is_url(text):
        return CheckpointName(text, Form.URL, text)
    if text.startswith(PRETRAINED):
        name = _part(text, text[len(PRETRAINED):], "a pretrained name is one word after //pretrained/")
        return CheckpointName(text, Form.PRETRAINED, name)
    if text.startswith(SIGNATURE):
        sig, _, file = text[len(SIGNATURE):].partition('/')
        _part(text, sig, "a signature is one word after //sig/")
        return CheckpointName(text, Form.SIGNATURE, sig, sig,
                              _part(text, file, "a file of an experiment is one name") if file else None)
    if text.startswith('//'):
        raise NamingError(f"'{text}': unknown form; use {SIGNATURE}<SIG>, {PRETRAINED}<NAME>, a path or a URL.")
    first, slash, rest = text.partition('/')
    if not slash and text not in ('.', '..') and not text.startswith('~'):
        return CheckpointName(text, Form.LOCAL, text, sig=text)
    if first and first not in ('.', '..', '~') and rest and '/' not in rest and rest not in ('.', '..'):
        return CheckpointName(text, Form.LOCAL, text, sig=first, file=rest)
    return CheckpointName(text, Form.LOCAL, text)


def locate(name: CheckpointName, xps: Path) -> Path:
    """The checkpoint file or experiment folder a `SIGNATURE` or `LOCAL` name means, with
    `xps` the experiments folder of this Dora folder (`<dora.dir>/xps`).

    A local path that exists wins (a file the user typed is resolved: a link in it is theirs to
    follow); then the signature, exact or a unique prefix, and the file in it. Raises
    `NamingError` naming the signatures that look like an unknown one.
    """
    xps = Path(xps)
    if name.form is Form.LOCAL:
        path = Path(name.value).expanduser()
        if path.is_file():
            return path.resolve()
        if path.is_dir():
            return path
    elif name.form is not Form.SIGNATURE:
        raise NamingError(f"'{name.text}' is a {name.form.value} name: the caller fetches or finds it.")
    if name.sig is None:
        raise NamingError(f"'{name.text}' is neither a file, a folder nor a signature in {xps}.")
    folder = xps / name.sig
    if name.form is Form.SIGNATURE:
        if not folder.is_dir():
            raise NamingError(f"no experiment '{name.sig}' in {xps}.")
    else:
        folder = _by_signature(name, xps)
    if name.file is None:
        return folder
    if (folder / name.file).is_file():
        return folder / name.file
    raise NamingError(f"'{name.text}': experiment {folder.name} has no file '{name.file}'.")


def _by_signature(name: CheckpointName, xps: Path) -> Path:
    """The experiment folder whose signature is `name.sig` or begins with it (only one may)."""
    assert name.sig is not None
    sig = name.sig
    sigs = sorted(p.name for p in xps.iterdir() if p.is_dir()) if xps.is_dir() else []
    prefixed = [s for s in sigs if s.startswith(sig)]
    if sig in sigs or len(prefixed) == 1:
        return xps / (sig if sig in sigs else prefixed[0])
    near = prefixed or difflib.get_close_matches(sig, sigs, n=5, cutoff=0.5)
    hint = f" Near: {', '.join(near)}." if near else f" Known: {len(sigs)} experiment(s) (`solver ls`)."
    raise NamingError(f"'{name.text}' is neither a file, a folder nor a signature in {xps}.{hint}")
