"""StandardSolver: the epoch loop, its stages, registered states and temporary swaps.

A task fills in `build_model`, `build_dataloaders`, `run_step`, `evaluate`, `generate` (and
`show`, `check_config`); this class owns the rest. One epoch reads as the recipe itself
(`run_epoch`): train, valid under EMA weights, update the best state, evaluate and generate under
the best weights, then `commit()`. Checkpoints belong to a `CheckpointManager` (`self.manager`):
the solver tells it what happened (a step, an epoch end, a stop) and asks it to restore and roll
back; what to save, when, and what follows a durable save are the manager's.
"""

from __future__ import annotations

import functools
import logging
import typing as tp
from abc import abstractmethod

import flashy
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import builders, distrib, lineage, locations, rewind, startup
from .best_state import BestState, best_state_target, take_best_state
from .cache import DataCache
from .cache import from_config as data_cache
from .checkpointing import envelope, partial, sharded
from .checkpointing.manager import CheckpointManager, Moment, find_pretrained, versions
from .checkpointing.partial import LoadReport
from .divergence import LossWatch
from .early_stop import EarlyStop
from .ema import ModuleDictEMA
from .errors import ConfigError, DivergenceError, SolverError
from .logs import ProgressLog, describe_modules, replay_history, write_history
from .preemption import PreemptionHandler, StopRequested
from .progress import Progress
from .rng import RNGState
from .sampler import ResumableBatchSampler
from .stateful import full_state, load_states, swapped
from .tensorboard import open_writer as open_tensorboard

__all__ = ['StandardSolver', 'SolverError', 'DivergenceError']
logger = logging.getLogger(__name__)


class StandardSolver(flashy.BaseSolver):
    """Base class of task solvers. See the module docstring and README.md for the tour."""

    #: the valid metric that decides the best state, and its direction
    best_metric_name: str = 'loss'
    best_metric_lower_is_better: bool = True

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        del self.stateful.sources['xp.cfg']  # a DictConfig: checkpoints hold the config as a plain dict
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dataloaders: dict[str, tp.Iterable] = {}
        self.best_state = BestState(lower_is_better=self.best_metric_lower_is_better)
        self.ema: ModuleDictEMA | None = None
        self.rng = RNGState()
        self.progress = Progress()  # steps, batches drawn, the partial epoch: where a resume goes on
        self.preemption = PreemptionHandler()
        self.manager = CheckpointManager(self.folder, cfg.checkpoint, self.xp.sig, self.best_metric_lower_is_better,
                                         ranks=distrib.checkpoint_ranks(), metric_name=self.best_metric_name,
                                         agree=self.preemption.agree)
        self.early_stop = EarlyStop.from_config(cfg.get('early_stop'), self.best_metric_lower_is_better)
        self.loss_watch = LossWatch(cfg.checkpoint.rollback.spike_factor)
        self.freeze = builders.Freeze(cfg.optim)  # optim.freeze, applied in `distribute`
        self.tensorboard: tp.Any = None  # with logging.log_tensorboard, a SummaryWriter for media
        # What the task derives from its data files, kept for the next run (None: cache.use=false).
        self.data_cache: DataCache | None = data_cache(cfg, locations.dora_dir())
        startup.reached('setup')  # logging, distributed init, the lock, the solver's members
        self.build_dataloaders()
        startup.reached('data')
        self.build_model()
        self.freeze.check()
        self.lr_scheduler = self.build_lr_scheduler()
        if self.lr_scheduler is not None:
            self.register_stateful('lr_scheduler')
        startup.reached('model')
        self.register_stateful('best_state', 'rng', 'progress')

    # -- what a task provides ---------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Refuse task settings that cannot work (raise `errors.ConfigError` naming the key), before
        anything is built or written: above all settings used late, in evaluate or generate."""

    @abstractmethod
    def build_model(self) -> None:
        """Create the model(s), optimizer(s)...; register them with `register_stateful` etc."""

    @abstractmethod
    def build_dataloaders(self) -> None:
        """Fill `self.dataloaders` with 'train', 'valid' (and 'evaluate', 'generate') iterables."""

    @abstractmethod
    def run_step(self, idx: int, batch: tp.Any, metrics: dict[str, float]) -> dict[str, float]:
        """One training (under `self.is_training`) or validation step on a batch; returns metrics."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Evaluation stage, run under the best state; call `check_stop()` between batches."""

    @abstractmethod
    def generate(self) -> dict[str, float]:
        """Generation stage, under the best state: write samples; call `check_stop()` between them."""

    def show(self) -> None:
        """Describe the model (sizes, parameter counts) in the log."""
        describe_modules({name: module for name in self.stateful.sources
                          if isinstance(module := self.registered(name), nn.Module)})

    def load_from_pretrained(self, name: str) -> envelope.Checkpoint:
        """The checkpoint for `continue_from=//pretrained/NAME`: `<pretrained dir>/<name>.th`
        (`manager.find_pretrained`). Tasks with other sources of weights override this."""
        return find_pretrained(name, locations.pretrained_dir())

    # -- registration and swaps ---------------------------------------------------------------

    def build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The `schedule.*` scheduler of `self.optimizer`, stepped after each training update and
        saved with the run as the state 'lr_scheduler' (None without `schedule.lr_scheduler`). A
        task with several optimizers overrides this, or builds its schedulers in `build_model`."""
        schedule = self.cfg.get('schedule')
        name = schedule.get('lr_scheduler') if schedule else None
        if not name:
            return None
        optimizer = getattr(self, 'optimizer', None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"schedule.lr_scheduler={name}: {type(self).__name__} has no `self.optimizer` to "
                              "schedule; set schedule.lr_scheduler=null, or build the scheduler in the solver.")
        total = self.cfg.optim.epochs * (self.cfg.optim.updates_per_epoch or len(self.dataloaders['train']))  # type: ignore[arg-type]
        scheduler = builders.get_lr_scheduler(optimizer, schedule, total)
        logger.info("Learning rate: %s from %g over %d updates%s.", name, self.cfg.optim.lr, total,
                    f", {schedule.warmup} of warmup" if schedule.get('warmup') else '')
        return scheduler

    def registered(self, name: str) -> tp.Any:
        """The object registered as `name` (a dotted attribute path of the solver)."""
        return functools.reduce(getattr, name.split('.'), self)

    def distribute(self, module: nn.Module, units: tp.Iterable[nn.Module] = ()) -> nn.Module:
        """The module ready for data-parallel training (DDP, or FSDP2 with `fsdp.use=true`; `units`:
        blocks sharded one by one). Call it in `build_model` before creating the optimizer and use
        what it returns as the model; its state keeps no 'module.' prefix (see `distrib.wrap_model`).
        Parameters named by `optim.freeze` are frozen here, before any wrapping."""
        self.freeze.apply(module)
        return distrib.wrap_model(module, self.cfg, units)

    def register_best_state(self, *names: str) -> None:
        """Keep a copy of these states from the epoch with the best valid metric."""
        for name in names:
            self.best_state.register(name, self.stateful.sources[name])

    def register_ema(self, *names: str) -> None:
        """Keep an exponential moving average of these modules (when `optim.ema.use`)."""
        ema = self.cfg.optim.ema
        if ema.use:
            self.ema = ModuleDictEMA({name: getattr(self, name) for name in names}, ema.decay, ema.updates)
            self.register_stateful('ema')

    def swap_best_state(self) -> tp.ContextManager[None]:
        """Run the block with the best states loaded; the live ones come back even on error."""
        return swapped(self.stateful.sources, self.best_state.states)

    def swap_ema_state(self) -> tp.ContextManager[None]:
        """Run the block with EMA weights loaded (nothing happens when EMA is off)."""
        return swapped(self.stateful.sources, self.ema.state if self.ema is not None else {})

    # -- the run ------------------------------------------------------------------------------

    @property
    def is_training(self) -> bool:
        return self._current_stage == 'train'

    def run(self) -> None:
        """Restore, then run the remaining epochs (or the single stage of `execute_only`). The last
        save is durable (or its error raised) before this returns; a preemption signal saves at the
        next step or batch and leaves (`preemption`)."""
        self.show()
        self.restore()
        distrib.check_agreement({'epoch': self.epoch, 'step': self.progress.step})
        startup.reached('state')
        if self.cfg.logging.log_tensorboard and flashy.distrib.is_rank_zero():
            self.init_tensorboard()  # flashy's stage metrics; the writer below is for the task's media
            self.tensorboard = open_tensorboard(self.folder, self.cfg, [f'valid/{self.best_metric_name}'])
        if self.cfg.execute_only:
            self.run_one_stage(self.cfg.execute_only)
            return
        if self.is_complete():
            return
        self.manager.prepare(self.full_state)  # async staging buffers, for Adam's moments too
        startup.reached('staging')
        logger.info("Checkpoints: %s.", self.manager.describe())
        try:
            with self.preemption:
                while self.epoch <= self.cfg.optim.epochs:  # a rollback may reload an earlier epoch
                    try:
                        self.run_epoch()
                    except StopRequested:  # the train stage is done, the epoch is not committed
                        self.save_checkpoint(Moment.STOP)
                        self.leave_after_save()
                    stop = self.check_early_stop()
                    self.commit()
                    if self.preemption.requested:
                        self.leave_after_save()
                    if stop:
                        break
        finally:
            self.manager.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

    def is_complete(self) -> bool:
        """Whether the experiment has nothing left to do (all epochs, or an early stop); says so."""
        early = self.history[-1].get('early_stop') if self.history else None
        done = bool(early) or self.epoch > self.cfg.optim.epochs
        if done:
            logger.info("Experiment %s is complete: %d of %d epochs done%s. Nothing to do.", self.xp.sig,
                        len(self.history), self.cfg.optim.epochs, f", stopped early ({early})" if early else '')
        return done

    def run_epoch(self) -> None:
        """One epoch: train; valid under EMA; best state; evaluate and generate under best."""
        self.run_stage('train', self.train)
        with torch.no_grad(), self.swap_ema_state():
            metrics = self.run_stage('valid', self.valid)
            self.update_best_state(metrics)
        for stage in ('evaluate', 'generate'):
            if self.should_run_stage(stage):
                with self.swap_best_state():
                    self.run_stage(stage, getattr(self, stage))

    def run_one_stage(self, stage: str) -> None:
        """`execute_only=<stage>`: run one stage on the best state, without touching the history."""
        if self.best_state.metric is None and not self.cfg.continue_from:
            logger.warning("execute_only=%s on an experiment with no checkpoint: using fresh weights.", stage)
        with torch.no_grad(), self.swap_best_state():
            self.run_stage(stage, getattr(self, stage))

    def should_run_stage(self, stage: str) -> bool:
        every = self.cfg.get(stage, {}).get('every')
        return bool(every) and (self.epoch % every == 0 or self.epoch == self.cfg.optim.epochs)

    def update_best_state(self, metrics: dict[str, float]) -> None:
        if self.best_metric_name not in metrics:
            raise SolverError(f"The valid stage returned no '{self.best_metric_name}' metric "
                              f"(best_metric_name); it returned {sorted(metrics)}.")
        value = metrics[self.best_metric_name]
        if self.best_state.is_better(value):
            logger.info("New best state: valid %s = %.4f", self.best_metric_name, value)
            self.best_state.update(value)

    def scores(self) -> list[float | None]:
        """The best metric of each epoch of the history (None where an epoch has none)."""
        return [entry.get('valid', {}).get(self.best_metric_name) for entry in self.history]

    def check_early_stop(self) -> bool:
        """Whether `early_stop` ends the run at this epoch (the reason goes into its history)."""
        now = self._pending_metrics.get('valid', {}).get(self.best_metric_name)  # this epoch, not committed yet
        stop = self.early_stop.decide([*self.scores(), now])
        if stop is not None:
            self._pending_metrics['early_stop'] = stop.record()
            logger.info("Early stop at epoch %d: valid %s has not improved (by more than %s) for %d epochs "
                        "(early_stop.patience); best %.4g. The experiment is complete.", self.epoch,
                        self.best_metric_name, stop.min_delta, stop.patience, self.best_state.metric)
        return stop is not None

    # -- stages ------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """The train stage; a diverging loss rolls back to the last checkpoint (`rollback`)."""
        while True:
            try:
                return self.common_train_valid('train')
            except DivergenceError as err:
                self.rollback(err)

    def valid(self) -> dict[str, float]:
        return self.common_train_valid('valid')

    def common_train_valid(self, stage: str) -> dict[str, float]:
        """Iterate a stage's loader, calling `run_step`, with progress lines and averaged metrics.

        In the train stage the data position, the step within the epoch and the metrics' running
        sums are state (`self.progress`): a save mid-epoch (or after the stage) resumes exactly."""
        train = stage == 'train'
        loader = self.dataloaders[stage]
        total = len(loader)  # type: ignore[arg-type]
        sums: dict[str, float] = {}
        done = 0
        if train:
            total = self.cfg.optim.updates_per_epoch or total
            sampler = getattr(loader, 'batch_sampler', None)
            if isinstance(sampler, ResumableBatchSampler):
                sampler.position = self.progress.train_batches
            sums, done = self.progress.sums, self.progress.epoch_step
            if done:
                logger.info("Resuming the train stage at step %d of %d.", done, total)
        progress = ProgressLog(stage, self.epoch, total, self.cfg.logging.log_updates, start=done)
        for idx, batch in zip(range(done, total), loader):
            if not train:
                self.check_stop()
            step_metrics = self.run_step(idx, batch, {})
            if train:
                self.loss_watch.check(step_metrics)
            for key, value in step_metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            done = idx + 1
            if train:
                self.after_train_step(done, total)
            progress.update(done, {key: value / done for key, value in sums.items()})
        return distrib.average_metrics({key: value / max(done, 1) for key, value in sums.items()}, total)

    def after_train_step(self, done: int, total: int) -> None:
        """Bookkeeping after an optimizer step; mid-epoch checkpoint or preemption save."""
        if self.lr_scheduler is not None:  # before any save below: the saved state has this update
            self.lr_scheduler.step()
        self.progress.stepped(done)
        startup.first_step()  # logs where the start of the run went, once
        if self.ema is not None:
            self.ema.step()
        if done < total:  # at the epoch's end, valid follows, then commit() saves
            self.save_checkpoint()
            if self.preemption.requested:
                self.leave_after_save()

    def check_stop(self) -> None:
        """Call between batches of valid/evaluate/generate: raises `StopRequested` once a
        preemption signal (on any rank) asks to stop, so the run saves and leaves within seconds."""
        if self.preemption.agree()[0]:
            raise StopRequested()

    def rollback(self, err: DivergenceError) -> None:
        """Reload the newest intact checkpoint and skip the batches that led to the divergence."""
        bad_batch = self.progress.train_batches  # the batch whose step diverged
        ckpt = self.manager.rollback(str(err), self.progress.step + 1, like=self.load_template(),
                                     into=self.state_dict())  # read into the live tensors (issue 16)
        load_states(self.stateful.sources, ckpt.state, ckpt.path)
        skipped = self.progress.skip_to(bad_batch)
        self.loss_watch.reset()
        logger.warning("Rollback %d/%d: %s. Reloaded %s (step %d) and skipped training batches %d-%d.",
                       self.manager.rollbacks, self.cfg.checkpoint.rollback.max_rollbacks, err, ckpt.path,
                       self.progress.step, *skipped)

    # -- checkpoints ----------------------------------------------------------------------------

    def commit(self, save_checkpoint: bool = True) -> None:
        """Close the epoch: history += metrics, then tell the manager; Dora's history.json follows
        once a save holding it is durable (at once without `save_checkpoint`)."""
        self.history.append(self._pending_metrics)
        self._start_epoch()
        self.progress.new_epoch()
        if save_checkpoint:
            self.save_checkpoint(Moment.EPOCH_END)
        else:
            self.publish_history(list(self.history))

    def save_checkpoint(self, moment: Moment = Moment.STEP) -> None:
        """Tell the manager that `moment` happened; it saves what its policies ask for. Every rank
        calls this; rank 0 writes a replicated state, each rank its shards of a sharded one."""
        self.manager.on_moment(moment, self.progress.step, self.scores(), self.snapshot,
                               on_durable=functools.partial(self.publish_history, list(self.history)))

    def snapshot(self) -> tuple[dict[str, tp.Any], dict[str, tp.Any]]:
        """The state and metadata of a save now (every rank). Rank 0's running sums are saved: they
        are made the mean over ranks first, which leaves the epoch's averaged metrics as they were."""
        self.progress.sums.update(distrib.average_metrics(self.progress.sums))
        return self.state_dict(), self.checkpoint_meta()

    def checkpoint_meta(self) -> dict[str, tp.Any]:
        """The metadata of a save now: position, config, the parameter name of each optimizer index."""
        return {'epoch': len(self.history), 'step': self.progress.step, 'epoch_step': self.progress.epoch_step,
                'config': OmegaConf.to_container(self.cfg, resolve=True),
                'param_names': self.param_names()}

    def param_names(self) -> partial.ParamNames:
        """The state name of each optimizer index (`partial.param_names`): what a partial rollback matches by."""
        return partial.param_names({name: self.registered(name) for name in self.stateful.sources})

    def publish_history(self, history: list[dict[str, tp.Any]]) -> None:
        """Write Dora's history.json (rank 0); called once the checkpoint holding it is durable."""
        if flashy.distrib.is_rank_zero() and self.xp.link.history_file is not None:
            write_history(self.xp.link.history_file, history)

    def leave_after_save(self) -> tp.NoReturn:
        self.manager.close(preempted=True)
        self.preemption.leave()

    def restore(self) -> bool:
        """Load this experiment's newest intact checkpoint, else `continue_from`; say which."""
        like = self.load_template()
        own = self.manager.restore(like, into=self.state_dict())  # read into the live tensors (issue 16)
        if own is not None:
            if self.cfg.continue_from:
                logger.info("continue_from=%s ignored: this experiment has its own checkpoint %s, "
                            "which wins.", self.cfg.continue_from, own.path)
            load_states(self.stateful.sources, own.state, own.path)
            logger.info("Resumed from %s (epoch %d, step %d). %d tensors read straight into the live "
                        "state.", own.path, len(self.history), self.progress.step, len(own.live))
            self.publish_history(self.history)  # a kill between save and history update
            replay_history(self.history)
            return True
        if self.cfg.continue_from:
            source = self.manager.resolve_continue_from(str(self.cfg.continue_from), like, self.load_from_pretrained,
                                                        into=best_state_target(
                self.best_state, self.stateful.sources, self.cfg.checkpoint.ignore_state_keys))
            self.load_best_state_from(source)
            return True
        return False

    def load_template(self) -> tp.Any:
        """The live state a sharded checkpoint is placed like (`read_checkpoint(like=)`); None if unsharded."""
        return self.full_state() if sharded.has_dtensors(self.state_dict()) else None

    def full_state(self) -> dict[str, tp.Any]:
        """The state with fresh optimizers' per-parameter states made (see `stateful.full_state`)."""
        return full_state(self.state_dict, [self.registered(name) for name in self.stateful.sources])

    def load_best_state_from(self, source: envelope.Checkpoint) -> None:
        """Fine-tune start: take only the source's best state (what fits, with checkpoint.strict=false);
        optimizer, EMA... start fresh. The start and its source are recorded (`lineage`)."""
        ignored = list(self.cfg.checkpoint.ignore_state_keys or [])
        strict = self.manager.cfg.strict
        report = take_best_state(self.best_state, source.state, source.path, ignored, self.registered, strict,
                                 self.folder / partial.REPORT if distrib.is_rank_zero() else None)
        if self.ema is not None:
            self.ema = ModuleDictEMA(self.ema.modules, self.ema.decay, self.ema.updates)
        logger.info("Continuing from the best state of %s%s: %s (listed in %s).", source.path,
                    f", ignoring {ignored}" if ignored else '', report.summary(), partial.REPORT)
        if self.cfg.execute_only:  # one stage, no training: nothing starts here
            return
        state = self.state_dict()
        entry = lineage.record(str(self.cfg.continue_from), source, report, state, ignored, strict)
        if sharded.has_dtensors(state) or distrib.is_rank_zero():
            lineage.write_start(self.folder, state, {**self.checkpoint_meta(), 'sig': self.xp.sig,
                                                     'versions': versions()}, entry, self.manager.writer.store)

    def rollback_partial(self, only: tp.Sequence[str], epoch: int | str) -> LoadReport:
        """Return the entries `only` names (`model.layers.2`: parameters and buffers, their optimizer,
        EMA and best-state entries; `checkpointing.partial`) to the end of `epoch` (or to 'start', 'best'),
        in this process; the rest stays as it is. This epoch's history records it; the next save writes it."""
        self.manager.wait()
        state = self.state_dict()
        merged, report, older = rewind.take_from(self.folder, epoch, state, list(only), self.param_names(),
                                                 like=self.load_template())
        for name, value in merged.items():
            if value is not state[name]:
                self.stateful.sources[name].load_state_dict(value)
        entry = {'only': list(only), 'epoch': older.meta.get('epoch'), 'from': older.path.name, 'in_process': True}
        rewind.note([self._pending_metrics], entry)
        if distrib.is_rank_zero():
            report.write(self.folder / partial.REPORT, partial_rollback=entry)
        logger.info("Partial rollback of %s to epoch %s: %s.", ', '.join(only), epoch, report.summary())
        return report
