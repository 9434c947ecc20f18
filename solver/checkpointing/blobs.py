"""The blob folder of incremental checkpoints: how a blob is named, where it is, how it is read back.

Where. An experiment of a Dora folder (`<dora>/xps/<sig>/`) keeps its blobs in the Dora folder's
store, `<dora>/blobs/<key>`, shared by every experiment there (`store_root`); its files say so
(`'store': 'dora'` beside their references) and are read from the `blobs/` beside the nearest
`xps/` above them, wherever in the experiment they were moved (`rolled_back/<time>/`). Files
without that mark were written to a store of their own experiment (`<xp>/blobs`, the layout
before the shared store, and any folder outside a Dora folder) and are read from the nearest
`blobs/` above them, as before.

`store.IncrementalStore` writes blobs and collects them; this module is the read side the file
format needs: `resolve` gives a loaded payload its tensors back, each read through no link and
checked against its key (`<xxh3-128 hex>-<nbytes>`), so that a reader of checkpoints
(`envelope`) depends on the blobs, and nothing here on the envelope.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import typing as tp
from pathlib import Path

import torch

from . import tree
from .digest import flat_bytes, xxh3_128
from .faults import CorruptCheckpointError
from .fs import open_file

BLOBS = 'blobs'
XPS = 'xps'           # Dora's folder of experiments: <dora>/xps/<sig>
SHARED = 'dora'       # payload['blobs']['store'] of a file whose blobs are in the Dora folder's store
KEY = re.compile(r'^[0-9a-f]{32}-[0-9]{1,15}$')  # what a blob may be called: nothing else is read or collected
_SEARCH_UP = 3        # a checkpoint moved into <xp>/rolled_back/<time>/ still finds <xp>/blobs (or xps/)


def blob_key(tensor: torch.Tensor) -> str:
    """`<xxh3-128 of the bytes>-<number of bytes>`: the name of a tensor's bytes in the store."""
    flat = flat_bytes(tensor)
    nbytes = flat.numel() * flat.element_size()
    return f'{xxh3_128(flat.data_ptr(), nbytes)}-{nbytes}'


def is_incremental(payload: tp.Any) -> bool:
    """Whether a loaded checkpoint payload keeps its tensors in a blob store."""
    return isinstance(payload, dict) and isinstance(payload.get('blobs'), dict)


def read_blob(blob: Path, key: str, inside: Path) -> torch.Tensor:
    """The bytes of a blob as a uint8 tensor, checked against its key; `inside`: the folder
    holding its store, which it is read from through no link (`fs.open_fd`)."""
    nbytes = int(key.rpartition('-')[2])
    with open_file(blob, inside=inside, limit=nbytes) as f:
        if os.fstat(f.fileno()).st_size != nbytes:  # before allocating what the key says
            raise CorruptCheckpointError(f"blob {blob} has the wrong size (expected {nbytes} bytes)")
        data = torch.empty(nbytes, dtype=torch.uint8)
        size = tp.cast(tp.Any, f).readinto(data.numpy()) if nbytes else 0
        extra = f.read(1)
    if size != nbytes or extra:
        raise CorruptCheckpointError(f"blob {blob} has the wrong size (expected {nbytes} bytes)")
    if blob_key(data) != key:
        raise CorruptCheckpointError(f"blob {blob} does not match its digest")
    return data


def store_root(folder: Path) -> Path:
    """The folder whose `blobs/` is the store of experiment `folder`: the Dora folder for an
    experiment of one (`<dora>/xps/<sig>`), else the experiment folder itself."""
    folder = Path(folder)
    return folder.parent.parent if folder.parent.name == XPS else folder


def blob_folder(path: Path, shared: bool = False) -> Path | None:
    """The blob folder of a checkpoint file: with `shared` (the file says 'dora'), the `blobs/`
    of the Dora folder holding it; else the nearest `blobs/` beside it or above it."""
    for parent in [Path(path).parent, *Path(path).parent.parents][:_SEARCH_UP + 1]:
        if shared and parent.name == XPS:
            return parent.parent / BLOBS
        if not shared and (parent / BLOBS).is_dir():
            return parent / BLOBS
    return None


def is_shared(payload: dict[str, tp.Any]) -> bool:
    """Whether a loaded incremental payload keeps its blobs in the Dora folder's store."""
    return payload['blobs'].get('store') == SHARED


def resolve(path: Path, payload: dict[str, tp.Any]) -> dict[str, tp.Any]:
    """The payload of an incremental checkpoint file with its blobs read in, each checked
    against its key; raises `CorruptCheckpointError` naming the file and the blob."""
    refs = payload['blobs'].get('refs')
    content = {key: payload[key] for key in ('meta', 'state') if key in payload}
    tensors: list[torch.Tensor] = []
    tree.skeleton(content, tensors)
    if not isinstance(refs, list) or len(refs) != len(tensors):
        raise CorruptCheckpointError(f"{path} is damaged: its blob references do not match its state.")
    folder = blob_folder(path, is_shared(payload))
    if folder is None and any(ref is not None for ref in refs):
        where = f"no '{XPS}' folder of a Dora folder holds it" if is_shared(payload) else \
            f"no '{BLOBS}' folder holds its tensors (looked in {path.parent} and above)"
        raise CorruptCheckpointError(
            f"{path} is an incremental checkpoint and {where}. Copy a checkpoint elsewhere with "
            "solver.checkpointing.store.consolidate (or `solver export`), not cp.")
    index = iter(range(len(refs)))

    def fill(tensor: torch.Tensor) -> torch.Tensor:
        ref = refs[next(index)]
        if ref is None:
            return tensor
        try:
            key, dtype_name, shape = ref
            dtype = getattr(torch, str(dtype_name).rpartition('.')[2], None)
            if not (isinstance(key, str) and KEY.match(key) and isinstance(dtype, torch.dtype)
                    and isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
                    and math.prod(shape) * dtype.itemsize == int(key.rpartition('-')[2])):
                raise ValueError("not a blob key, dtype and shape of matching size")
            data = read_blob(tp.cast(Path, folder) / key, key, tp.cast(Path, folder).parent)
            return data.view(dtype).reshape(shape)
        except FileNotFoundError as err:
            raise CorruptCheckpointError(
                f"{path} is damaged: its blob {tp.cast(Path, folder) / key} is missing.") from err
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(f"{path} is damaged: {err}.") from err
        except (OSError, ValueError, TypeError, RuntimeError, AttributeError) as err:
            raise CorruptCheckpointError(f"{path} is damaged: blob reference {ref!r:.120}: {err}") from err

    return {**payload, **tree.map_tensors(content, fill)}


def clean_stray_blobs(folder: Path) -> None:
    """Remove the temporary blob files of a process killed during a save."""
    blobs = Path(folder) / BLOBS
    if blobs.is_dir() and not blobs.is_symlink():  # another store's temporary files are not ours
        for tmp in blobs.glob('.*.tmp.*'):
            with contextlib.suppress(OSError):
                tmp.unlink()
