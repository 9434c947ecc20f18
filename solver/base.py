"""StandardSolver: the epoch loop, best state, EMA, checkpoints, resume and fine-tuning.

A task fills in `build_model`, `build_dataloaders`, `run_step`, `evaluate`, `generate` (and
`show`); this class owns the rest. One epoch reads as the recipe itself (`run_epoch`): train,
valid under EMA weights, update the best state, evaluate and generate under the best weights,
then `commit()` saves everything registered with `register_stateful`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import time
import typing as tp
from abc import abstractmethod
from pathlib import Path

import flashy
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import distrib
from .best_state import BestState, copy_state
from .checkpointing import format as checkpoint
from .checkpointing import sharded
from .checkpointing.writer import CheckpointWriter, SaveMode
from .ema import ModuleDictEMA
from .preemption import PreemptionHandler
from .rng import RNGState
from .sampler import ResumableBatchSampler

logger = logging.getLogger(__name__)
STAGES = ('train', 'valid', 'evaluate', 'generate')
PRETRAINED_ENV = 'SOLVER_PRETRAINED_DIR'


class SolverError(RuntimeError):
    """A user-fixable problem with a run (config, continue_from, state that does not fit)."""


class DivergenceError(ArithmeticError):
    """The training loss went non-finite (or spiked): the trigger of a rollback."""


def pretrained_dir() -> Path:
    """Where `//pretrained/NAME` is looked up: $SOLVER_PRETRAINED_DIR, else `pretrained/` at the root."""
    default = Path(__file__).resolve().parent.parent / 'pretrained'
    return Path(os.environ.get(PRETRAINED_ENV, default))


class StandardSolver(flashy.BaseSolver):
    """Base class of task solvers. See the module docstring and README.md for the tour."""

    #: the valid metric that decides the best state, and its direction
    best_metric_name: str = 'loss'
    best_metric_lower_is_better: bool = True

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        # flashy registers the DictConfig itself, which `weights_only` loading refuses: the
        # resolved config goes into the checkpoint metadata as a plain dict instead.
        del self.stateful.sources['xp.cfg']
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dataloaders: dict[str, tp.Iterable] = {}
        self.best_state = BestState(lower_is_better=self.best_metric_lower_is_better)
        self.ema: ModuleDictEMA | None = None
        self.rng = RNGState()
        # Position of the run, saved with it: optimizer steps, batches drawn from the training
        # stream (steps + batches skipped by rollbacks), and the train stage's partial epoch.
        self.progress: dict[str, tp.Any] = {'step': 0, 'train_batches': 0, 'epoch_step': 0, 'sums': {}}
        self.writer = CheckpointWriter(SaveMode.ASYNC if cfg.checkpoint.async_save else SaveMode.SYNC)
        self.writer.listeners.append(self.prune_epoch_checkpoints)
        self.preemption = PreemptionHandler()
        self._started = self._last_save = time.time()
        self._save_cost = self._checkpoint_time = 0.0
        self._rollbacks = 0
        self._latest_saved = False
        self._loss_mean: float | None = None
        self.build_dataloaders()
        self.build_model()
        self.register_stateful('best_state', 'rng', 'progress')

    # -- what a task provides ---------------------------------------------------------------

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
        """Evaluation stage, run under the best state."""

    @abstractmethod
    def generate(self) -> dict[str, float]:
        """Generation stage, run under the best state: write samples people can open."""

    def show(self) -> None:
        """Describe the model (sizes, parameter counts) in the log."""
        for name in self.stateful.sources:
            value = self.registered(name)
            if isinstance(value, nn.Module):
                size = sum(p.numel() for p in value.parameters())
                logger.info("%s: %s parameters (%.1f MB float32)", name, f"{size:,}", size * 4 / 2**20)

    def load_from_pretrained(self, name: str) -> checkpoint.Checkpoint:
        """The checkpoint of a pretrained model called `name` (for `continue_from=//pretrained/NAME`).

        Looks for `<pretrained dir>/<name>.th` (see `pretrained_dir`), a file written by
        `scripts/export_checkpoint.py`. Tasks with other sources of weights override this.
        """
        folder = pretrained_dir()
        path = folder / f'{name}.th'
        if not path.exists():
            known = sorted(p.stem for p in folder.glob('*.th')) if folder.exists() else []
            raise SolverError(
                f"No pretrained model '{name}': looked for {path} ({PRETRAINED_ENV} sets the folder). "
                f"Known names: {known or 'none'}.")
        return checkpoint.read_checkpoint(path)

    # -- registration -----------------------------------------------------------------------

    def registered(self, name: str) -> tp.Any:
        """The object registered as `name` (a dotted attribute path of the solver)."""
        value: tp.Any = self
        for part in name.split('.'):
            value = getattr(value, part)
        return value

    def distribute(self, module: nn.Module, units: tp.Iterable[nn.Module] = ()) -> nn.Module:
        """The module ready for data-parallel training: DDP, or FSDP2 with `fsdp.use=true`.

        Call it in `build_model` before creating the optimizer, and use what it returns as the
        model (`self.model = self.distribute(MyModel().to(self.device))`). Its state stays the
        module's own (no 'module.' prefix): checkpoints load in any number of processes. `units`
        are blocks sharded one by one under FSDP (see `distrib.wrap_model`).
        """
        return distrib.wrap_model(module, self.cfg, units)

    def register_best_state(self, *names: str) -> None:
        """Keep a copy of these states from the epoch with the best valid metric."""
        for name in names:
            self.best_state.register(name, self.stateful.sources[name])

    def register_ema(self, *names: str) -> None:
        """Keep an exponential moving average of these modules (when `optim.ema.use`)."""
        ema = self.cfg.optim.ema
        if not ema.use:
            return
        modules = {name: getattr(self, name) for name in names}
        self.ema = ModuleDictEMA(modules, decay=ema.decay, updates=ema.updates)
        self.register_stateful('ema')

    # -- temporary swaps ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _swap(self, states: dict[str, tp.Any]) -> tp.Iterator[None]:
        sources = {name: self.stateful.sources[name] for name in states}
        saved = {name: copy_state(source.state_dict()) for name, source in sources.items()}
        try:
            for name, state in states.items():
                sources[name].load_state_dict(state)
            yield
        finally:
            for name, state in saved.items():
                sources[name].load_state_dict(state)

    def swap_best_state(self) -> tp.ContextManager[None]:
        """Run the block with the best states loaded; the live ones come back even on error."""
        return self._swap(self.best_state.states)

    def swap_ema_state(self) -> tp.ContextManager[None]:
        """Run the block with EMA weights loaded (nothing happens when EMA is off)."""
        return self._swap(self.ema.state if self.ema is not None else {})

    # -- the run ------------------------------------------------------------------------------

    @property
    def is_training(self) -> bool:
        return self._current_stage == 'train'

    def run(self) -> None:
        """Restore, then run the remaining epochs (or the single stage of `execute_only`).

        Whatever happens, the last checkpoint save is durable (or its error raised) before
        this returns; a preemption signal saves at the next step and leaves (`preemption`).
        """
        self.show()
        self.restore()
        distrib.check_agreement({'epoch': self.epoch, 'step': self.progress['step']})
        if self.cfg.logging.log_tensorboard and flashy.distrib.is_rank_zero():
            self.init_tensorboard(sub_dir='tensorboard')
        if self.cfg.execute_only:
            self.run_one_stage(self.cfg.execute_only)
            return
        epochs = self.cfg.optim.epochs
        if self.epoch > epochs:
            logger.info("Experiment %s is complete: %d of %d epochs done. Nothing to do.",
                        self.xp.sig, len(self.history), epochs)
            return
        if self.writer.mode is SaveMode.ASYNC:  # staging buffers for Adam's moments too, made now
            self.writer.prepare(self.full_state())
        self.log_checkpoint_policy()
        try:
            with self.preemption:
                while self.epoch <= epochs:  # a rollback may reload an earlier epoch
                    self.run_epoch()
                    self.commit()
                    if self.agree_to_stop()[0]:
                        self.leave_after_save()
        finally:
            self.writer.close()

    def log_checkpoint_policy(self) -> None:
        cfg = self.cfg.checkpoint
        rollback = cfg.rollback
        logger.info(
            "Checkpoints: %s saves; %s%s%s%s. Rollback on %s loss: %s.",
            self.writer.mode.value,
            'latest every epoch' if cfg.save_last else f"checkpoint_<epoch>.th every {cfg.save_every} epochs",
            f", every {cfg.every_steps} steps" if cfg.every_steps else '',
            f", every {cfg.every_minutes} min" if cfg.every_minutes else '',
            f", mid-epoch interval chosen for <= {cfg.max_overhead:.1%} overhead" if cfg.max_overhead else '',
            'non-finite' + (f" or > {rollback.spike_factor}x running mean" if rollback.spike_factor else ''),
            f"up to {rollback.max_rollbacks} times" if rollback.max_rollbacks else 'off, stop at once')

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
        if stage not in ('valid', 'evaluate', 'generate'):
            raise SolverError(f"execute_only={stage!r}: expected one of valid, evaluate, generate.")
        if self.best_state.metric is None and not self.cfg.continue_from:
            logger.warning("execute_only=%s on an experiment with no checkpoint: using fresh weights.",
                           stage)
        with torch.no_grad(), self.swap_best_state():
            self.run_stage(stage, getattr(self, stage))

    def should_run_stage(self, stage: str) -> bool:
        every = self.cfg.get(stage, {}).get('every')
        last = self.epoch == self.cfg.optim.epochs
        return bool(every) and (self.epoch % every == 0 or last)

    def update_best_state(self, metrics: dict[str, float]) -> None:
        if self.best_metric_name not in metrics:
            raise SolverError(f"The valid stage returned no '{self.best_metric_name}' metric "
                              f"(best_metric_name); it returned {sorted(metrics)}.")
        value = metrics[self.best_metric_name]
        if self.best_state.is_better(value):
            logger.info("New best state: valid %s = %.4f", self.best_metric_name, value)
            self.best_state.update(value)

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

        In the train stage the position in the data stream, the step within the epoch and the
        running sums of the metrics are part of the state (`self.progress`), so a checkpoint
        taken mid-epoch resumes at the exact batch with the exact running averages.
        """
        train = stage == 'train'
        loader = self.dataloaders[stage]
        total = len(loader)  # type: ignore[arg-type]
        sums: dict[str, float] = {}
        done = 0
        if train:
            total = self.cfg.optim.updates_per_epoch or total
            sampler = getattr(loader, 'batch_sampler', None)
            if isinstance(sampler, ResumableBatchSampler):
                sampler.position = self.progress['train_batches']
            sums, done = self.progress['sums'], self.progress['epoch_step']
            if done:
                logger.info("Resuming the train stage at step %d of %d.", done, total)
        progress = Progress(stage, self.epoch, total, self.cfg.logging.log_updates, start=done)
        metrics: dict[str, float] = {}
        for idx, batch in zip(range(done, total), loader):
            step_metrics = self.run_step(idx, batch, {})
            if train:
                self.check_divergence(step_metrics)
            for key, value in step_metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            done = idx + 1
            metrics = {key: value / done for key, value in sums.items()}
            if train:
                self.after_train_step(done, total)
            progress.update(done, metrics)
        if train:
            self.progress.update(epoch_step=0, sums={})
        return distrib.average_metrics(metrics, total)

    def after_train_step(self, done: int, total: int) -> None:
        """Bookkeeping after an optimizer step; mid-epoch checkpoint or preemption save."""
        self.progress['train_batches'] += 1
        self.progress['step'] += 1
        self.progress['epoch_step'] = done
        if self.ema is not None:
            self.ema.step()
        preempted, save_due = self.agree_to_stop(self.mid_epoch_save_due())
        if done < total and (preempted or save_due):
            self.save_checkpoints(mid_epoch=True)
        if preempted and done < total:  # at the epoch's end, commit() saves first
            self.leave_after_save()

    def agree_to_stop(self, *flags: bool) -> tuple[bool, ...]:
        """(preempted, *flags), each true if true on any rank: a signal that reached one rank
        stops all at the same step, and a save one rank finds due is made by all. Ranks that
        decided apart would wait forever in each other's collectives."""
        preempted, *agreed = distrib.any_rank(self.preemption.requested, *flags)
        if preempted and not self.preemption.requested:
            logger.warning("Another rank was asked to stop: saving at this step, then stopping.")
            self.preemption.received = signal.SIGTERM
        return (preempted, *agreed)

    def mid_epoch_save_due(self) -> bool:
        cfg = self.cfg.checkpoint
        since = time.time() - self._last_save
        if cfg.every_steps and self.progress['step'] % cfg.every_steps == 0:
            return True
        if cfg.every_minutes and since >= 60 * cfg.every_minutes:
            return True
        # checkpoint.max_overhead: save as often as keeps blocked time under that share.
        return bool(cfg.max_overhead) and self._save_cost > 0 and since >= self._save_cost / cfg.max_overhead

    # -- divergence and rollback -------------------------------------------------------------------

    def check_divergence(self, metrics: dict[str, float]) -> None:
        """Raise DivergenceError on a non-finite loss (or a spike, if configured)."""
        rollback = self.cfg.checkpoint.rollback
        if 'loss' not in metrics:  # max_rollbacks=0 still checks: it stops at the first divergence
            return
        loss = metrics['loss']
        mean = self._loss_mean
        problem = None
        if not math.isfinite(loss):
            problem = f"loss is {loss}"
        elif rollback.spike_factor and mean is not None and loss > rollback.spike_factor * mean:
            problem = f"loss {loss:.4g} > {rollback.spike_factor} x running mean {mean:.4g}"
        if distrib.any_rank(problem is not None)[0]:  # all ranks roll back (or stop) together
            raise DivergenceError(problem or "the loss diverged on another rank")
        self._loss_mean = loss if mean is None else 0.98 * mean + 0.02 * loss

    def rollback(self, err: DivergenceError) -> None:
        """Reload the newest intact checkpoint and skip the batches that led to the divergence."""
        self._rollbacks += 1
        limit = self.cfg.checkpoint.rollback.max_rollbacks
        bad_batch = self.progress['train_batches']  # the batch whose step diverged
        if self._rollbacks > limit:
            raise SolverError(f"Training diverged ({err}) at step {self.progress['step'] + 1} after "
                              f"{limit} rollbacks (checkpoint.rollback.max_rollbacks); stopping. "
                              "Lower optim.lr or enable gradient clipping (optim.max_norm).")
        self.writer.wait()
        # into: read straight into the live tensors (issue 16)
        ckpt = checkpoint.load_newest_intact(self.folder, like=self.load_template(), into=self.state_dict())
        if ckpt is None:
            raise SolverError(f"Training diverged ({err}) at step {self.progress['step'] + 1}, before "
                              "any checkpoint to roll back to. Lower optim.lr or save earlier "
                              "(checkpoint.every_steps).")
        self.load_own_state(ckpt)
        skipped = (self.progress['train_batches'], bad_batch)
        self.progress['train_batches'] = bad_batch + 1
        self._loss_mean = None
        logger.warning("Rollback %d/%d: %s. Reloaded %s (step %d) and skipped training batches %d-%d.",
                       self._rollbacks, limit, err, ckpt.path, self.progress['step'], *skipped)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_meta(self) -> dict[str, tp.Any]:
        return {
            'epoch': len(self.history),
            'step': self.progress['step'],
            'epoch_step': self.progress['epoch_step'],
            'sig': self.xp.sig,
            'config': OmegaConf.to_container(self.cfg, resolve=True),
            'versions': versions(),
        }

    def commit(self, save_checkpoint: bool = True) -> None:
        """Close the epoch: history += metrics, checkpoints saved, then Dora's history updated."""
        self.history.append(self._pending_metrics)
        self._start_epoch()
        self.agree_to_stop()  # every rank saves the same files, preempted or not
        if save_checkpoint:
            self.save_checkpoints()
        if flashy.distrib.is_rank_zero():
            self.xp.link.update_history(self.history)

    def save_checkpoints(self, mid_epoch: bool = False) -> None:
        """Save the latest checkpoint and, at epoch ends, `checkpoint_<epoch>.th` by the keep policy.

        Every rank calls this: rank 0 writes a replicated state, every rank its shards of a
        sharded one; no rank goes on before the save is complete (async: staged) everywhere.
        """
        cfg = self.cfg.checkpoint
        epoch = len(self.history)
        targets: dict[Path, tp.Sequence[str] | None] = {}
        # The latest file is written at every epoch end with save_last; without it, still when
        # preempted (the run resumes from it) and when a mid-epoch save made one, which would
        # otherwise go stale and be resumed from in place of the newer epoch file.
        if cfg.save_last or mid_epoch or self.preemption.requested or self.checkpoint_path.exists() \
                or self._latest_saved:  # (an async mid-epoch save may not have landed yet)
            targets[self.checkpoint_path] = None
            self._latest_saved = True
        if not mid_epoch and cfg.save_every and epoch % cfg.save_every == 0:
            targets[checkpoint.epoch_checkpoint_path(self.folder, epoch)] = cfg.keep_every_states
        if not targets:
            return
        if mid_epoch:  # rank 0's running sums are saved: make them the mean over ranks, which
            sums = self.progress['sums']  # leaves the epoch's averaged metrics as they were
            sums.update(distrib.average_metrics(sums))
        stats = self.writer.save(self.state_dict(), targets, self.checkpoint_meta())
        distrib.barrier()
        self._last_save = time.time()
        self._save_cost = stats.blocked
        self._checkpoint_time += stats.blocked
        logger.info("Checkpoint %s (epoch %d, step %d): loop blocked %.3fs; previous save durable "
                    "after %.3fs; %.2f%% of run time spent checkpointing.",
                    ', '.join(p.name for p in targets), epoch, self.progress['step'], stats.blocked,
                    stats.durable, 100 * self._checkpoint_time / max(time.time() - self._started, 1e-9))

    def prune_epoch_checkpoints(self, saved: list[Path]) -> None:
        """A writer listener: once a save is durable, keep the newest `checkpoint.keep_last` epoch
        files (pruning as `save` returns would not count an async save's file, not yet written)."""
        keep_last = self.cfg.checkpoint.keep_last
        if distrib.is_rank_zero():
            for path in checkpoint.prune_epoch_checkpoints(self.folder, keep_last):
                logger.info("Removed old checkpoint %s (checkpoint.keep_last=%s)", path.name, keep_last)

    def leave_after_save(self) -> tp.NoReturn:
        self.writer.close()
        self.preemption.leave()

    def restore(self) -> bool:
        """Load this experiment's newest intact checkpoint, else `continue_from`; say which."""
        if distrib.is_rank_zero():
            checkpoint.clean_stray_files(self.folder)
        distrib.barrier()
        like = self.load_template()
        own = checkpoint.load_newest_intact(self.folder, like=like, into=self.state_dict())  # issue 16
        if own is not None:
            if self.cfg.continue_from:
                logger.info("continue_from=%s ignored: this experiment has its own checkpoint %s, "
                            "which wins.", self.cfg.continue_from, own.path)
            self.load_own_state(own)
            logger.info("Resumed from %s (epoch %d, step %d); %d tensors read straight into the live "
                        "state (issue 16).", own.path, len(self.history), self.progress['step'], len(own.live))
            if flashy.distrib.is_rank_zero():  # a kill between save and history update
                self.xp.link.update_history(self.history)
            self.replay_history()
            return True
        if self.cfg.continue_from:
            source = self.resolve_continue_from(str(self.cfg.continue_from), like)
            self.load_best_state_from(source)
            return True
        return False

    def load_own_state(self, ckpt: checkpoint.Checkpoint) -> None:
        state = dict(ckpt.state)
        state.pop('xp.sig', None)
        expected = {name for name in self.stateful.sources if name != 'xp.sig'}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise SolverError(
                f"{ckpt.path} does not fit this solver: missing states {sorted(missing)}, unexpected "
                f"states {sorted(unexpected)}. Was it written by another solver or config?")
        try:
            for name, value in state.items():
                self.stateful.sources[name].load_state_dict(value)
        except (RuntimeError, KeyError, ValueError) as err:
            raise SolverError(f"{ckpt.path} does not fit this model: {err}") from err

    def load_template(self) -> tp.Any:
        """The live state a checkpoint is read into (`read_checkpoint(like=...)`), or None when
        nothing is sharded: sharded tensors then load straight into this rank's shards.
        Fresh optimizers get their per-parameter states for it (`full_state`).
        """
        if not sharded.has_dtensors(self.state_dict()):
            return None
        return self.full_state()

    def full_state(self) -> dict[str, tp.Any]:
        """The state as checkpoints hold it once training has begun (a load template, and what
        the async writer's staging buffers are made for before the first step).

        An optimizer has per-parameter states only after its first step, so fresh ones get
        theirs made for the template, then forgotten: the optimizer itself stays fresh.
        """
        optimizers = [self.registered(name) for name in self.stateful.sources]
        fresh = [o for o in optimizers if isinstance(o, torch.optim.Optimizer) and distrib.init_optimizer_state(o)]
        like = self.state_dict()
        for optimizer in fresh:
            optimizer.state.clear()  # `like` keeps the made states, as templates only
        return like

    def resolve_continue_from(self, value: str, like: tp.Any = None) -> checkpoint.Checkpoint:
        """`//sig/SIG`, `//pretrained/NAME`, a checkpoint file or an experiment folder."""
        if value.startswith('//pretrained/'):
            pretrained = self.load_from_pretrained(value[len('//pretrained/'):])
            pretrained.state = sharded.place_like(pretrained.state, like)  # into shards, if sharded
            return pretrained
        if value.startswith('//sig/'):
            sig = value[len('//sig/'):]
            path = self.folder.parent / sig
            if not path.is_dir():
                raise SolverError(f"continue_from={value}: no experiment '{sig}' in {path.parent}.")
        else:
            path = Path(value).expanduser()
        into = self.continue_into()  # issue 16: the best state is read into the live modules
        if path.is_dir():
            found = checkpoint.load_newest_intact(path, resumable=False, like=like, into=into)
            if found is None:
                raise SolverError(f"continue_from={value}: the folder {path} has no checkpoint "
                                  f"(tried {checkpoint.LATEST} and checkpoint_<epoch>.th).")
            return found
        if path.is_file():
            return checkpoint.read_checkpoint(path, like, into)
        raise SolverError(f"continue_from={value}: {path} is neither a checkpoint file nor an "
                          "experiment folder. Use //sig/<SIG>, //pretrained/<NAME> or a path.")

    def continue_into(self) -> dict[str, tp.Any]:
        """Where `continue_from` reads a source's best state: the live states it loads into,
        without `checkpoint.ignore_state_keys` (those keep their values)."""
        ignored = list(self.cfg.checkpoint.ignore_state_keys or [])
        live = {name: self.stateful.sources[name].state_dict() for name in self.best_state.sources}
        return {'best_state': {'states': drop_keys(live, ignored)}}

    def load_best_state_from(self, source: checkpoint.Checkpoint) -> None:
        """Fine-tune start: take only the source's best state; optimizer, EMA... start fresh."""
        best = source.state.get('best_state', {}).get('states')
        if not best:
            raise SolverError(f"{source.path} has no best state to continue from.")
        ignored = list(self.cfg.checkpoint.ignore_state_keys or [])
        best = drop_keys(best, ignored)
        unknown = set(best) - set(self.best_state.sources)
        if unknown:
            raise SolverError(f"{source.path}: best state has {sorted(unknown)}, which this solver "
                              f"does not register (it has {sorted(self.best_state.sources)}).")
        for name, state in best.items():
            target = self.registered(name)
            try:
                if isinstance(target, nn.Module):
                    load_module_state(target, state, ignored, name)
                else:
                    self.stateful.sources[name].load_state_dict(state)
            except (RuntimeError, KeyError, ValueError) as err:
                raise SolverError(f"{source.path} does not fit this model: {err}") from err
            self.best_state.states[name] = copy_state(self.stateful.sources[name].state_dict())
        if self.ema is not None:
            self.ema = ModuleDictEMA(self.ema.modules, self.ema.decay, self.ema.updates)
        logger.info("Continuing from the best state of %s (%s)%s.", source.path, ', '.join(best),
                    f", ignoring {ignored}" if ignored else '')

    def replay_history(self) -> None:
        for epoch, stages in enumerate(self.history, start=1):
            for stage, metrics in stages.items():
                shown = ' | '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in metrics.items())
                logger.info("[replay] epoch %d %s | %s", epoch, stage, shown)


def drop_keys(states: dict[str, tp.Any], ignored: list[str]) -> dict[str, tp.Any]:
    """States without the entries of `checkpoint.ignore_state_keys`.

    'model' drops a whole state; 'model.head' drops every key of the 'model' state that is
    'head' or starts with 'head.'.
    """
    kept = {name: state for name, state in states.items() if name not in ignored}
    for key in ignored:
        name, _, prefix = key.partition('.')
        if prefix and name in kept and isinstance(kept[name], dict):
            kept[name] = {k: v for k, v in kept[name].items()
                          if not (k == prefix or str(k).startswith(prefix + '.'))}
    return kept


def load_module_state(module: nn.Module, state: dict[str, tp.Any], ignored: list[str], name: str) -> None:
    """Load a module's state; only keys dropped on purpose may be missing; name any misfit."""
    result = module.load_state_dict(state, strict=False)
    allowed = [key[len(name) + 1:] for key in ignored if key.startswith(name + '.')]
    missing = [k for k in result.missing_keys if not any(k == a or k.startswith(a + '.') for a in allowed)]
    if missing or result.unexpected_keys:
        raise KeyError(f"state '{name}': missing keys {missing}, unexpected keys {result.unexpected_keys}")


class Progress:
    """Progress lines for a stage: position, rate, ETA and running metrics, every few steps."""

    def __init__(self, stage: str, epoch: int, total: int, every: int, start: int = 0) -> None:
        self.stage, self.epoch, self.total, self.start = stage, epoch, total, start
        self.every = max(1, every)
        self.begin = time.time()

    def update(self, done: int, metrics: dict[str, float]) -> None:
        if done % self.every and done != self.total:
            return
        elapsed = time.time() - self.begin
        rate = (done - self.start) / max(elapsed, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        shown = ' | '.join(f"{k} {v:.4f}" for k, v in metrics.items())
        logger.info("%s | epoch %d | %d/%d | %.2f steps/s | ETA %s | %s", self.stage.capitalize(),
                    self.epoch, done, self.total, rate, _duration(eta), shown)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


@functools.cache
def versions() -> dict[str, str]:
    """Library versions and the git commit of the code, for the checkpoint metadata."""
    import importlib.metadata as md
    import subprocess
    found = {'torch': str(torch.__version__)}
    for package in ('solver', 'flashy', 'dora-search', 'hydra-core', 'numpy'):
        with contextlib.suppress(md.PackageNotFoundError):
            found[package] = md.version(package)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found['git'] = subprocess.run(
            ['git', 'rev-parse', 'HEAD'], cwd=Path(__file__).parent, capture_output=True, text=True,
            timeout=5).stdout.strip()
    return found
