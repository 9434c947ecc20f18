"""Entry point of `dora run`: logging, seeds, distributed init, then the solver the config names."""

from __future__ import annotations

import copy
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

from . import builders, distrib, locations, preemption, slurm, startup, threads
from .checkpointing.fs import UnsafeFileError
from .checkpointing.lock import ExperimentLock
from .checkpointing.objectstore import secret_in
from .errors import UserError
from .preflight import FolderNotWritableError, check_entries, check_writable

logger = logging.getLogger(__name__)
DORA_DIR_ENV = locations.DORA_DIR_ENV
MIN_FREE_BYTES = 1 << 20  # below this the disk is full: Dora and Hydra fail writing their files


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> None:
    """One `dora run` of any project: logging, distributed init, seeds, checks, then the solver."""
    startup.reached('config')  # Dora's signature and folder, Hydra's composition
    xp = get_xp()
    try:
        flashy.setup_logging(level=getattr(logging, str(cfg.logging.level).upper()), log_name='solver.log.{rank}')
        logger.info("Experiment %s in %s", xp.sig, xp.folder)
        slurm.log_job()
        distrib.init(cfg)
        seed_everything(cfg.seed)
        intra_op = threads.apply(cfg.get('num_threads'))
        builders.check_config(cfg)
        threads.warn_if_busy(intra_op)  # 0.2 s of sampling, not spent on a refused config
        if distrib.is_rank_zero():
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


def dora_dir_problem(folder: Path) -> str | None:
    """Why Dora could not use `folder` (a file in the way, not writable, a full disk), or None.

    Checked when the entry point is built (`project_main`), before Dora's own code would fail with a
    traceback.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    what = f"the Dora folder {folder} ({DORA_DIR_ENV}; unset: {locations.root() / 'outputs'})"
    if not existing.is_dir():
        return f"{existing} is a file, so {what} cannot be a folder. Move the file or set {DORA_DIR_ENV}."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable, so {what} cannot be used. Fix its permissions or set {DORA_DIR_ENV}."
    stats = os.statvfs(existing)
    if stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES:
        return (f"The disk holding {what} is full ({stats.f_bavail * stats.f_frsize} bytes free). "
                f"Free some space or set {DORA_DIR_ENV} to a folder on another disk.")
    return None


def refuse_secrets(argv: tp.Sequence[str]) -> None:
    """Stop, in one line, on an override whose URL carries credentials (`checkpoint.remote=
    s3://KEY:SECRET@...`, `continue_from=...?token=`): run when the entry point is built, before
    Dora and Hydra write the overrides into `.argv.json` and `.hydra/*.yaml`, where the secret
    would stay."""
    found = secret_in(argv)
    if found is not None:
        print(f"error: {found} (redacted here): the URL carries credentials or options, which would be "
              "written into the experiment folder (.argv.json, .hydra/*.yaml) and checkpoints. Give them "
              "through the storage library's environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws) and "
              "rerun with the bare URL.", file=sys.stderr)
        sys.exit(1)


def project_main(module: str) -> tp.Any:
    """The `dora` entry point of a project: in a project's `train.py`, `main = project_main(__name__)`.

    The project's primary `config.yaml` is in `config/` beside `train.py` (`locations.config_dir`);
    the framework's own configs are found through Hydra's search path (`pkg://solver.config`).
    Experiments go to `outputs/` at the project's root (`solver.locations`) or $SOLVER_DORA_DIR.
    """
    startup.reached('imports')  # the interpreter, Dora, torch and the framework
    refuse_secrets(sys.argv[1:])
    package = Path(str(sys.modules[module].__file__)).resolve().parent
    locations.use_project(package)
    config = locations.config_dir(package)

    def main(cfg: DictConfig) -> None:
        run(cfg)

    # Dora sends its main to other processes (grid workers, Slurm jobs) as `<module>.main`.
    main.__module__ = module

    # Made absolute once, here, and passed on so to the processes this one starts (distributed
    # workers may start elsewhere); unset or empty stays so (the default is the project's root).
    if os.environ.get(DORA_DIR_ENV, '').strip():
        os.environ[DORA_DIR_ENV] = str(locations.dora_dir())
    if (problem := dora_dir_problem(locations.dora_dir())) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    decorated = hydra_main(config_path=str(config.resolve()), config_name='config', version_base='1.3')(main)
    compose_once(decorated)
    decorated.dora.dir = locations.dora_dir()
    init_xp = decorated.init_xp

    def checked_init_xp(xp: tp.Any) -> None:
        """Dora's first write into the experiment folder, made after checking that the folder can be
        written (permissions, a full disk): one line then, not Dora's traceback or a failed first
        checkpoint an epoch later."""
        try:
            check_writable(xp.folder)
            check_entries(xp.folder)  # before Dora and Hydra write their files by name, following links
        except (FolderNotWritableError, UnsafeFileError) as err:
            stop(str(err), 1)
        init_xp(xp)

    decorated.init_xp = checked_init_xp
    slurm.install(decorated)  # dora launch / grid: CPU jobs, per-experiment requests, no sacct needed
    return decorated


def compose_once(decorated: tp.Any) -> None:
    """Compose each set of overrides once per process, and hand out copies.

    A `dora run` asks Dora for its experiment three times, and each asks Hydra to compose the
    config twice (with all the overrides, and with the config groups alone): six compositions of
    two configs, each a fifth of a second or more of YAML parsing (the `config` phase of the
    startup line). The files do not change within a process, so the first composition of each
    override list is kept; a copy is returned, as a composition is (callers may change it).
    """
    compose = decorated._get_config_noinit
    composed: dict[tuple[str, ...], DictConfig] = {}

    def once(overrides: tp.Sequence[str] = ()) -> DictConfig:
        key = tuple(overrides)
        if key not in composed:
            composed[key] = compose(list(overrides))
        return copy.deepcopy(composed[key])

    decorated._get_config_noinit = once


def __getattr__(name: str) -> tp.Any:
    """`solver.train.main`, the framework's own entry point (what `dora run` imports), built on
    first use: a project of its own imports this module for `project_main` without composing the
    framework's configs."""
    if name != 'main':
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()['main'] = project_main(__name__)
    return globals()['main']


if __name__ == '__main__':
    __getattr__('main')()
