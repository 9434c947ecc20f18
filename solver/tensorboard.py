"""TensorBoard beside flashy's stage metrics: the run's hyperparameters, and a writer for media.

flashy (`init_tensorboard`) writes each stage's metrics per epoch into `<xp>/tensorboard/` as
`<stage>/<metric>` scalars; this writer adds its own event file to the same folder, so that
`tensorboard --logdir <dora dir>/xps` shows one run per experiment, named by its signature.
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .experiment import flatten_config

if tp.TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def open_writer(folder: Path, cfg: DictConfig, metric_tags: list[str]) -> SummaryWriter:
    """A writer in `<folder>/tensorboard` that has recorded the config as hyperparameters.

    `metric_tags` name scalars of the run (e.g. `valid/loss`) that the HParams tab shows beside
    the hyperparameters; their values are the ones the stages log.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(str(Path(folder) / 'tensorboard'), filename_suffix='.hparams')
    params = {key: value if isinstance(value, (bool, int, float, str)) else str(value)
              for key, value in flatten_config(OmegaConf.to_container(cfg, resolve=True)).items()}
    file_writer = writer.file_writer
    assert file_writer is not None  # made by SummaryWriter.__init__
    for summary in hparams(params, {tag: 0.0 for tag in metric_tags}):
        file_writer.add_summary(summary)
    writer.flush()
    return writer

