"""How checkpoints are named: the files of an experiment folder.

`checkpoint.th` is the latest, `checkpoint_<epoch>.th` the files kept per epoch; `candidates`
orders them for a resume (the latest first, then epochs from the newest). Torch-free.
"""

from __future__ import annotations

import re
from pathlib import Path

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
