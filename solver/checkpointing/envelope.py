"""The checkpoint envelope: one file's header and digests, written atomically, read and verified safely.

A checkpoint is one torch archive (what `torch.save` writes; we write it at disk speed with
`archive.save`) read back with `weights_only=True`: a plain dict of tensors and Python
containers, so that loading a file from elsewhere can never run code.

    {'format': 'solver.checkpoint', 'version': 1,
     'meta': {...},              # epoch, step, config (plain dict), signature, versions, git commit
     'state': {...},             # the registered states, by name
     'digests': {'tensors': [...], 'skeleton': '...'}}

`digests` hold an xxh3 hash of every tensor's bytes (in traversal order) and one of the rest of
the structure; they are checked on load, so a flipped byte anywhere is detected, not trained on.
Files are written to a temporary file in the same folder, fsynced, renamed over the target and
the folder fsynced: a reader sees the old file or the new one, never half of one.

A state that holds DTensors (a model sharded with FSDP2) is written the same way by the same
call, with its DTensors replaced by placeholders: the tensors themselves go, shard by shard
from every rank, into a folder beside the file (`sharded`), whose name and per-file digests the
file records (`'shards'`, covered by the digests). Reading gives the tensors back, each placed
like the matching tensor of the live state passed as `like` (this rank's shard, or whole).

The layer knows no solver: it saves and loads dicts. See `base.StandardSolver` for what goes in.
Names of the files: `naming`; a folder's epoch files and their metrics: `listing`; the newest
intact checkpoint after damage: `recovery`; the errors: `faults`.
"""

from __future__ import annotations

import logging
import os
import typing as tp
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from . import archive, blobs, codec, sharded, tree, unpickler
from .digest import tensor_digest
from .faults import CheckpointError, CorruptCheckpointError, DamagedIntoLiveError, UnsafeCheckpointError
from .fs import UnsafeFileError, atomic_open, open_file
from .ranks import DEFAULT_RANKS, Ranks

logger = logging.getLogger(__name__)

FORMAT = 'solver.checkpoint'
VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint file holds once verified."""

    path: Path
    state: dict[str, tp.Any]
    meta: dict[str, tp.Any]
    live: list[torch.Tensor] = field(default_factory=list)  # tensors of `into` read in place


# ---------------------------------------------------------------------------------------------
# Integrity

def _live_pairs(loaded: tp.Any, live: tp.Any) -> tp.Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(loaded tensor, live tensor) at the same place of two states (same keys, same lengths)."""
    if isinstance(loaded, torch.Tensor):
        if isinstance(live, torch.Tensor):
            yield loaded, live
    elif isinstance(loaded, dict) and isinstance(live, dict):
        for key, value in loaded.items():
            if key in live:
                yield from _live_pairs(value, live[key])
    elif isinstance(loaded, (list, tuple)) and isinstance(live, (list, tuple)) and len(loaded) == len(live):
        for value, target in zip(loaded, live):
            yield from _live_pairs(value, target)


def digests(state: tp.Any, ready: archive.Ready | None = None, loaded: bool = False) -> dict[str, tp.Any]:
    """Digests of a state: one per tensor in traversal order, one for everything else.

    `ready(storage)`, if given, is called before a tensor is hashed: it waits for the bytes of
    the tensor's storage and may give their digest (`archive.Reading.ready`, which hashes as it
    reads), used for a tensor that is its whole storage; other tensors are hashed here.
    `loaded`: the state was read from a file, whose tensors must each hold no more bytes than
    their storage (hashing a stride-0 view of 2**28 elements would allocate them all).
    """
    tensors: list[torch.Tensor] = []
    skeleton = tree.skeleton(state, tensors)
    hashed = []
    for index, tensor in enumerate(tensors):
        if loaded and tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise ValueError(f"tensor {index} ({tuple(tensor.shape)}, strides {tensor.stride()}) holds more "
                             "elements than its record: stride 0 or overlapping strides")
        whole = ready(tensor.untyped_storage()) if ready is not None else None
        if whole is not None and archive.whole_storage(tensor):
            hashed.append(whole)
        else:
            hashed.append(tensor_digest(tensor))
    return {
        'tensors': hashed,
        'skeleton': xxhash.xxh3_64_hexdigest(repr(skeleton).encode()),
    }


def verify(path: Path, payload: tp.Any, ready: archive.Ready | None = None) -> Checkpoint:
    """Check format, version and digests of a loaded payload; raise naming what is wrong.

    The digests cover the metadata as well as the state: a damaged epoch or config is caught too.
    `ready` as in `digests`.
    """
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise CorruptCheckpointError(
            f"{path} is not a solver checkpoint (it loads, but has no '{FORMAT}' header). "
            "Point continue_from at a checkpoint written by this framework.")
    version = payload.get('version')
    if version != VERSION:
        raise CorruptCheckpointError(
            f"{path} has checkpoint format version {version}; this code reads version {VERSION}.")
    missing = [key for key in ('meta', 'state', 'digests') if not isinstance(payload.get(key), dict)]
    if missing:
        raise CorruptCheckpointError(f"{path} is damaged: its {missing} entries are missing or wrong.")
    expected = payload['digests']
    try:
        actual = digests(_covered(payload), ready, loaded=True)
    except (TypeError, ValueError, RecursionError) as err:  # a value a checkpoint cannot hold, a view too large
        raise CorruptCheckpointError(f"{path} is damaged: {err}.") from err
    if expected.get('skeleton') != actual['skeleton']:
        raise CorruptCheckpointError(f"{path} is damaged: its structure does not match its digest.")
    bad = [i for i, (a, b) in enumerate(zip(expected.get('tensors', []), actual['tensors'])) if a != b]
    if bad or len(expected.get('tensors', [])) != len(actual['tensors']):
        raise CorruptCheckpointError(
            f"{path} is damaged: {len(bad) or 'some'} of {len(actual['tensors'])} tensors "
            "do not match their digests.")
    return Checkpoint(path=Path(path), state=payload['state'], meta=payload['meta'])


# ---------------------------------------------------------------------------------------------
# Writing


def _covered(payload: dict[str, tp.Any]) -> dict[str, tp.Any]:
    """What the digests of a file cover: meta, state and, for a sharded state, its shard files."""
    return {key: payload[key] for key in ('meta', 'state', 'shards') if key in payload}


def write_checkpoint(path: Path, state: dict[str, tp.Any], meta: dict[str, tp.Any],
                     ranks: Ranks = DEFAULT_RANKS, compress: str | None = None) -> dict[str, tp.Any] | None:
    """Write `state` and `meta` to `path` atomically, with digests of the state.

    A state with DTensors is sharded: every rank of `ranks` must call this (a collective). Each
    writes its shards; rank 0 then writes the file, and no rank returns before it is durable.
    `compress='zstd'` stores the state's tensors compressed (`codec`); not for a sharded state.
    Returns the digests recorded in the file (None for a sharded state).
    """
    if compress is not None and compress not in codec.ENCODINGS:
        raise CheckpointError(f"Cannot write {path}: compress={compress!r}, expected one of {codec.ENCODINGS} or None.")
    if compress is not None and sharded.has_dtensors(state):
        raise CheckpointError(f"Cannot write {path} compressed: the state is sharded (FSDP). Set "
                              "checkpoint.compress=null for sharded runs.")
    if compress is not None:
        content = {'meta': meta, 'state': state}
        tree.skeleton(content, [])  # a value that cannot be saved raises here, before anything is encoded
        recorded = digests(content)  # of the state itself: checked on the decoded tensors
        frames, table = codec.encode(state)
        return _write_file(path, {'meta': meta, 'state': frames, 'compressed': table}, digested=recorded)
    if not sharded.has_dtensors(state):
        return _write_file(path, {'meta': meta, 'state': state})
    try:
        state, shards = sharded.save_shards(path, state, ranks)
        if shards is not None:  # rank 0, once every rank's shards are durable: the commit point
            _write_file(path, {'meta': meta, 'state': state, 'shards': shards})
            sharded.remove_superseded(path, keep=shards['folder'])
    finally:
        ranks.barrier()
    return None


def _write_file(path: Path, content: dict[str, tp.Any],
                digested: dict[str, tp.Any] | None = None) -> dict[str, tp.Any]:
    """Write the file; return the digests recorded in it. `digested`: those digests, when
    computed already (store.py: of the real state, not of the placeholders it writes)."""
    tree.skeleton(content, [])  # a value that cannot be saved raises here, before any file is touched
    header = {'format': FORMAT, 'version': VERSION, **content}
    recorded: dict[str, tp.Any] = {}

    def complete(header: dict[str, tp.Any]) -> dict[str, tp.Any]:
        recorded.update(digested if digested is not None else digests(content))
        return {**header, 'digests': recorded}
    try:
        with atomic_open(Path(path)) as f:
            # The digests are computed on another thread while the tensors' bytes are written.
            archive.save(header, f, complete=complete)
    except (OSError, RuntimeError) as err:
        # The archive writer may report a failed write (full disk, size limit) as a RuntimeError
        # raised while handling the OSError: name the OSError, which says what happened.
        cause = err if isinstance(err, OSError) else err.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(
            f"Could not write checkpoint {path}: {cause.strerror or cause}. The previous checkpoint "
            "is untouched; free disk space or fix permissions, then rerun to resume.") from err
    return recorded


# ---------------------------------------------------------------------------------------------
# Reading

def read_checkpoint(path: Path, like: tp.Any = None, into: tp.Any = None, ranks: Ranks = DEFAULT_RANKS) -> Checkpoint:
    """Load and verify a checkpoint file, safely (`weights_only`): never runs pickled code.

    The file is opened once and everything is read through that one descriptor: a concurrent
    atomic replace (a run saving) gives the old checkpoint or the new one, never a mix.
    `like` (optional) is a live state: where it holds a DTensor, the tensor at the same place
    in the checkpoint comes back as this rank's shard of the same layout, whichever the format
    and the number of ranks that wrote it. Elsewhere tensors come back whole, on the CPU.

    `into` (optional) is a live state shaped like the checkpoint's `state` (the solver's
    `state_dict()`, whose tensors are the parameters, moments... themselves): each tensor that
    fits (same place, shape and dtype, on the CPU) is read straight into the live tensor, and the
    checkpoint's tensor is a view of it (`Checkpoint.live` lists them): `load_state_dict` then
    copies nothing. The digests are checked on those bytes before this returns; if they do not
    match, `DamagedIntoLiveError` names the live tensors that now hold damaged bytes.
    A sharded checkpoint is read by every rank of `ranks` together.
    """
    path = Path(path)
    try:
        f = open_file(path)  # no link, FIFO or device: refused in one line naming it
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"No checkpoint file at {path}.") from None
    except UnsafeFileError as err:
        raise CorruptCheckpointError(str(err)) from None
    except OSError as err:
        raise CheckpointError(f"Cannot open checkpoint {path}: {err.strerror or err}.") from err
    with f:
        payload, ckpt = _read_payload(path, f, into)
    if 'shards' in payload:
        try:
            ckpt.state = sharded.load_shards(path, ckpt.state, payload['shards'], like, ranks)
        except Exception as err:  # ShardError, OSError, or whatever a crafted skeleton makes Python raise
            raise CorruptCheckpointError(f"{path} cannot be loaded: {err}") from err
    elif like is not None and sharded.has_dtensors(like):
        ckpt.state = sharded.place_like(ckpt.state, like)
    return ckpt


def read_unverified(path: Path) -> tp.Any:
    """The payload of a checkpoint file, its tensors mapped (`mmap`), not read, and nothing
    verified: for listing (`solver ls`) and for the blob references of a collection. Opened as
    every file of a folder is (`fs.open_fd`); raises `CheckpointError` naming the file."""
    try:
        with open_file(Path(path)) as f:  # torch maps what the descriptor names, not the path
            unpickler.check_records(f)
            return torch.load(f'/proc/self/fd/{f.fileno()}', map_location='cpu', weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except unpickler.Refused as err:
        raise CorruptCheckpointError(f"{path} is damaged or forged, refused: {err}.") from err
    except Exception as err:  # damaged, foreign, unsafe: whatever torch raises
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptCheckpointError(f"{path} cannot be read: {why}") from err


def _read_payload(path: Path, f: tp.BinaryIO, into: tp.Any = None) -> tuple[tp.Any, Checkpoint]:
    """The verified payload of the open checkpoint file `f` (named `path` in messages); `into`
    as in `read_checkpoint`."""
    if os.fstat(f.fileno()).st_size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes): a save was cut short.")
    try:
        is_zip = zipfile.is_zipfile(f)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):  # it raises for some damaged directories
        is_zip = False
    if not is_zip:
        raise CorruptCheckpointError(
            f"{path} is not a torch zip archive: truncated, damaged or another format.")
    reading: archive.Reading | None = None
    refused: Exception | None = None
    try:  # tensors read in file order by another thread, each hashed as soon as it is read
        unpickler.check_records(f)  # before either unpickler inflates anything
        targets = (lambda payload: () if codec.is_compressed(payload)  # frames are never read into live tensors
                   else _live_pairs(payload.get('state'), into)) if into is not None else None
        f.seek(0)
        payload, reading = archive.load(f, targets)
    except unpickler.Refused as err:  # a tensor changed after it was built, too large a view: no second try
        raise CorruptCheckpointError(f"{path} is damaged or forged, refused: {err}.") from err
    except Exception as err:  # anything unusual (damage, other globals): torch.load below loads or names it
        refused = err
    try:
        if reading is None:
            f.seek(0)
            payload = torch.load(f, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError/EOFError/... for these
        raise _unreadable(path, err, refused) from err
    live = reading.live if reading is not None else []
    try:
        if blobs.is_incremental(payload):
            payload = blobs.resolve(path, payload)
        if codec.is_compressed(payload):  # every entry checked before its frame is decompressed
            if reading is not None:
                reading.wait()
            payload = codec.decode(path, payload)
        ckpt = verify(path, payload, reading.ready if reading is not None else None)
        if reading is not None:
            reading.wait()  # every tensor was hashed, hence read: this only makes sure
        ckpt.live = live
    except CorruptCheckpointError as err:
        raise _damaged(err, live) from err
    except CheckpointError:
        raise
    except Exception as err:  # a tensor record cut short, or whatever else a crafted payload makes Python raise
        why = f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else str(err)
        raise _damaged(CorruptCheckpointError(f"{path} is damaged and cannot be read: {why:.300}"), live) from err
    finally:
        if reading is not None:
            reading.close()
    return payload, ckpt


def _unreadable(path: Path, err: Exception, ours: Exception | None) -> CheckpointError:
    """Why torch's weights-only unpickler could not read `path` (`ours`: why ours gave up, if it
    tried): a global of arbitrary code is refused as such, never called damage, and torch's
    advice to retry with weights_only=False is never repeated."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    name = str(ours) if isinstance(ours, unpickler.Forbidden) else next(
        (line for line in lines if 'unsupported global' in line.lower()), None)
    if name is not None:
        return UnsafeCheckpointError(
            f"{path} refused: needs arbitrary Python objects to unpickle ({name}), which could run code; "
            "only tensors and plain containers are loaded. It was not written by this framework, or was "
            "altered: load nothing from it.")
    why = next((line.split(':', 1)[1].strip() for line in lines if line.startswith('WeightsUnpickler error')),
               lines[0] if lines and not lines[0].startswith('Weights only load failed') else type(err).__name__)
    return CorruptCheckpointError(f"{path} is damaged and cannot be read: {why}")


def _damaged(err: CorruptCheckpointError, live: list[torch.Tensor]) -> CorruptCheckpointError:
    """`err`, as a DamagedIntoLiveError if live tensors were read into."""
    return DamagedIntoLiveError(str(err), live) if live else err


