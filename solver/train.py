"""Entry point of `dora run`: logging, seeds, distributed init, then the solver the config names."""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import flashy
import numpy as np
import torch
from dora import get_xp, hydra_main
from omegaconf import DictConfig

from . import builders, distrib
from .errors import UserError
from .lock import ExperimentLock

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
DORA_DIR_ENV = 'SOLVER_DORA_DIR'


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@hydra_main(config_path='../config', config_name='config', version_base='1.3')
def main(cfg: DictConfig) -> None:
    xp = get_xp()
    flashy.setup_logging(level=getattr(logging, str(cfg.logging.level).upper()), log_name='solver.log.{rank}')
    logger.info("Experiment %s in %s", xp.sig, xp.folder)
    distrib.init(cfg)
    seed_everything(cfg.seed)
    if cfg.get('num_threads'):
        torch.set_num_threads(cfg.num_threads)
    try:
        builders.check_config(cfg)
        if flashy.distrib.is_rank_zero():
            with ExperimentLock(xp.folder):
                builders.get_solver(cfg).run()
        else:
            builders.get_solver(cfg).run()
    except UserError as err:
        logger.error("%s", err)
        sys.exit(1)


# Dora's folder: outputs/ at the project root whatever the launch directory, or $SOLVER_DORA_DIR.
main.dora.dir = Path(os.environ.get(DORA_DIR_ENV, ROOT / 'outputs'))

if __name__ == '__main__':
    main()
