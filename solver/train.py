"""Entry point of `dora run`: logging, seeds, distributed init, then the solver the config names."""

from __future__ import annotations

import logging
import os
import random
import sys
import typing as tp
from pathlib import Path

import flashy
import numpy as np
import torch
from dora import get_xp, hydra_main
from omegaconf import DictConfig

from . import builders, distrib, preemption, slurm
from .errors import UserError
from .lock import ExperimentLock, FolderNotWritableError, check_writable

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
DORA_DIR_ENV = 'SOLVER_DORA_DIR'
MIN_FREE_BYTES = 1 << 20  # below this the disk is full: Dora and Hydra fail writing their files


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@hydra_main(config_path='../config', config_name='config', version_base='1.3')
def main(cfg: DictConfig) -> None:
    xp = get_xp()
    try:
        flashy.setup_logging(level=getattr(logging, str(cfg.logging.level).upper()), log_name='solver.log.{rank}')
        logger.info("Experiment %s in %s", xp.sig, xp.folder)
        slurm.log_job()
        distrib.init(cfg)
        seed_everything(cfg.seed)
        if cfg.get('num_threads'):
            torch.set_num_threads(cfg.num_threads)
        builders.check_config(cfg)
        if flashy.distrib.is_rank_zero():
            with ExperimentLock(xp.folder):
                builders.get_solver(cfg).run()
        else:
            builders.get_solver(cfg).run()
        preemption.ignore_requeue_signal()
    except UserError as err:
        stop(str(err), 1)
    except KeyboardInterrupt:
        # The solver's `finally` has let a save in flight finish; checkpoints are written
        # atomically, so the newest one on disk is whole.
        stop(f"Interrupted (Ctrl-C). Checkpoints in {xp.folder} are intact; rerun the same command "
             "to resume from the newest.", 130)


def stop(message: str, code: int) -> tp.NoReturn:
    """End the run with one line naming what happened, no traceback."""
    if logging.getLogger().handlers:
        logger.error("%s", message)
    else:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def dora_dir() -> Path:
    """Dora's folder: $SOLVER_DORA_DIR, `~` expanded and made absolute; unset or empty: outputs/
    at the project root, whatever the launch directory."""
    value = os.environ.get(DORA_DIR_ENV, '').strip()
    return Path(os.path.abspath(os.path.expanduser(value))) if value else ROOT / 'outputs'


def dora_dir_problem(folder: Path) -> str | None:
    """Why Dora could not use `folder` (a file in the way, not writable, a full disk), or None.

    Checked when this module is imported, before Dora's own code would fail with a traceback.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    what = f"the Dora folder {folder} ({DORA_DIR_ENV}; unset: {ROOT / 'outputs'})"
    if not existing.is_dir():
        return f"{existing} is a file, so {what} cannot be a folder. Move the file or set {DORA_DIR_ENV}."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable, so {what} cannot be used. Fix its permissions or set {DORA_DIR_ENV}."
    stats = os.statvfs(existing)
    if stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES:
        return (f"The disk holding {what} is full ({stats.f_bavail * stats.f_frsize} bytes free). "
                f"Free some space or set {DORA_DIR_ENV} to a folder on another disk.")
    return None


# Made absolute once, here, and passed on so to the processes this one starts (distributed
# workers may start elsewhere); unset or empty stays so (the default does not depend on the cwd).
if os.environ.get(DORA_DIR_ENV, '').strip():
    os.environ[DORA_DIR_ENV] = str(dora_dir())
if (_problem := dora_dir_problem(dora_dir())) is not None:
    print(f"error: {_problem}", file=sys.stderr)
    sys.exit(1)
main.dora.dir = dora_dir()
_init_xp = main.init_xp


def init_xp(xp: tp.Any) -> None:
    """Dora's first write into the experiment folder, made after checking that the folder can be
    written (permissions, a full disk): one line then, not Dora's traceback or a failed first
    checkpoint an epoch later."""
    try:
        check_writable(xp.folder)
    except FolderNotWritableError as err:
        stop(str(err), 1)
    _init_xp(xp)


main.init_xp = init_xp  # type: ignore[method-assign]
slurm.install(main)  # dora launch / grid: CPU jobs, per-experiment requests, no sacct needed

if __name__ == '__main__':
    main()
