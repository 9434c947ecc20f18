"""When to save and what to keep, as small policy objects combined by "any" and by union.

A save policy answers one question about one moment of a run (`SaveContext`): save now? A keep
policy answers which epoch checkpoints (`checkpoint_<epoch>.th`) to keep, given the ones there
are and the metric each holds in its metadata (`KeepContext`). A file stays if any keep policy
keeps it: `Retention` is that union, the one "which stay" decision every deletion asks (the
manager after a save, `solver prune`, the remote mirror). Each is a value that can be tested
alone; `from_config` builds the ones a `checkpoint.*` config asks for. Shaped after Orbax's
save-decision and preservation policies.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass, field

from .config import CheckpointConfig

# -- save decisions -----------------------------------------------------------------------------


@dataclass
class SaveContext:
    """One moment of a run at which a save may be made."""

    step: int                      # optimizer steps so far
    epoch: int                     # epochs completed (the history's length)
    epoch_end: bool = False        # the epoch was just committed
    preempted: bool = False        # a preemption signal asks to stop
    since_last_save: float = 0.0   # seconds since the previous save (or the start)
    save_cost: float = 0.0         # seconds the loop was blocked by the previous save
    scores: list[float | None] = field(default_factory=list)  # best metric of each epoch, in order
    lower_is_better: bool = True


class SavePolicy(tp.Protocol):
    def should_save(self, ctx: SaveContext) -> bool: ...


@dataclass(frozen=True)
class EveryEpoch:
    """At the end of every epoch."""

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.epoch_end


@dataclass(frozen=True)
class EveryNEpochs:
    """At the end of every epoch that is a multiple of `n`."""

    n: int

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.epoch_end and ctx.epoch % self.n == 0


@dataclass(frozen=True)
class EverySteps:
    """At every step that is a multiple of `n`."""

    n: int

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step % self.n == 0


@dataclass(frozen=True)
class EveryMinutes:
    """Once `minutes` have passed since the last save."""

    minutes: float

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.since_last_save >= 60 * self.minutes


@dataclass(frozen=True)
class OverheadBudget:
    """As often as keeps the time the loop is blocked by saves under `share` of the run: the
    interval is the last save's cost divided by the share (no save before a cost is known)."""

    share: float

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.save_cost > 0 and ctx.since_last_save >= ctx.save_cost / self.share


@dataclass(frozen=True)
class OnPreemption:
    """When a preemption signal asks the run to stop: the run resumes from this save."""

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.preempted


@dataclass(frozen=True)
class BestEpochs:
    """At the end of an epoch whose metric is among the best `k` so far (for `KeepBest`)."""

    k: int

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.epoch_end and ctx.epoch in best_epochs(ctx.scores, self.k, ctx.lower_is_better)


@dataclass(frozen=True)
class AnySave:
    """Save when any of the policies says so."""

    policies: tuple[SavePolicy, ...] = ()

    def should_save(self, ctx: SaveContext) -> bool:
        return any(policy.should_save(ctx) for policy in self.policies)


# -- keep decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochFile:
    """An epoch checkpoint (`checkpoint_<epoch>.th`) as retention sees it: its epoch and the
    metric it is ranked by, read from its own metadata (`meta['metric']`), as Orbax's BestN
    keeps each checkpoint's metrics with it."""

    epoch: int
    metric: float | None = None


@dataclass
class KeepContext:
    """The epoch checkpoints there are, oldest first, each with its metric."""

    files: list[EpochFile]

    @property
    def epochs(self) -> list[int]:
        return [file.epoch for file in self.files]


class KeepPolicy(tp.Protocol):
    @property
    def for_good(self) -> bool:
        """Whether what it keeps stays for good (never deleted by it later): what
        `checkpoint.keep_dtype` may reduce to weights only."""

    def keep(self, ctx: KeepContext) -> set[int]: ...

    def why(self) -> str: ...


@dataclass(frozen=True)
class KeepLatest:
    """The newest `n` epoch checkpoints."""

    n: int
    for_good: tp.ClassVar[bool] = False

    def keep(self, ctx: KeepContext) -> set[int]:
        return set(ctx.epochs[-self.n:]) if self.n > 0 else set()

    def why(self) -> str:
        return 'newest' if self.n == 1 else f'among the newest {self.n}'


@dataclass(frozen=True)
class KeepEveryN:
    """Epoch checkpoints of epochs that are multiples of `n`, for good (`for_good=False`: the
    scheduled files of `save_every` without `keep_last`, points a run goes on from)."""

    n: int
    for_good: bool = True

    def keep(self, ctx: KeepContext) -> set[int]:
        return {epoch for epoch in ctx.epochs if epoch % self.n == 0}

    def why(self) -> str:
        return f'a multiple of {self.n} epochs'


@dataclass(frozen=True)
class KeepBest:
    """The `k` epoch checkpoints with the best metric, ranked among the checkpoints there are
    (one without a finite metric is never among them)."""

    k: int
    lower_is_better: bool = True
    for_good: tp.ClassVar[bool] = True

    def keep(self, ctx: KeepContext) -> set[int]:
        ranked = rank([(file.epoch, file.metric) for file in ctx.files], self.lower_is_better)
        return {epoch for epoch, _ in ranked[:max(self.k, 0)]}

    def why(self) -> str:
        return f'among the best {self.k} (checkpoint.keep_best)'


def rank(scored: tp.Iterable[tuple[int, float | None]], lower_is_better: bool = True) -> list[tuple[int, float]]:
    """(epoch, metric) pairs, best first; on a tie the earlier epoch first. A missing (None) or
    non-finite metric (a diverged epoch's NaN) is not ranked, nor anything but a number. The one
    ranking of best epochs: the save policy `BestEpochs`, the keep policy `KeepBest` and
    `solver rollback --to best`."""
    finite = [(epoch, float(metric)) for epoch, metric in scored
              if isinstance(metric, (int, float)) and math.isfinite(metric)]
    return sorted(finite, key=lambda item: (item[1] if lower_is_better else -item[1], item[0]))


def best_epochs(scores: tp.Sequence[float | None], k: int, lower_is_better: bool = True) -> set[int]:
    """The (1-based) epochs of the `k` best scores of a history (`rank`)."""
    return {epoch for epoch, _ in rank(enumerate(scores, start=1), lower_is_better)[:max(k, 0)]}


@dataclass(frozen=True)
class Decision:
    """What retention decided: the epochs kept, each with why, and the epochs to remove."""

    kept: dict[int, str]
    removed: list[int]


@dataclass(frozen=True)
class Retention:
    """Which epoch checkpoints stay: the one decision every deletion asks (the manager after a
    save, `solver prune`, the remote mirror). A checkpoint stays if any policy keeps it (a union,
    itself a keep policy); everything else goes."""

    policies: tuple[KeepPolicy, ...] = ()

    def keep(self, ctx: KeepContext) -> set[int]:
        return set(self.reasons(ctx))

    def reasons(self, ctx: KeepContext) -> dict[int, str]:
        """The epochs kept, each with why: the first policy (in order) that keeps it."""
        kept: dict[int, str] = {}
        for policy in self.policies:
            for epoch in policy.keep(ctx):
                kept.setdefault(epoch, policy.why())
        return kept

    def why(self) -> str:
        return ', '.join(policy.why() for policy in self.policies)

    def for_good(self, ctx: KeepContext) -> set[int]:
        """The epochs kept only by policies that keep for good (`keep_every`, `keep_best`): no
        longer among the newest, never points a run goes on from again."""
        transient = set().union(*(policy.keep(ctx) for policy in self.policies if not policy.for_good))
        return self.keep(ctx) - transient

    def decide(self, files: tp.Iterable[EpochFile]) -> Decision:
        """Given the epoch checkpoints there are (any order) and their metrics: which stay, which go."""
        found = sorted(files, key=lambda file: file.epoch)
        kept = self.reasons(KeepContext(found))
        return Decision(kept, [file.epoch for file in found if file.epoch not in kept])


# -- from the config ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Policies:
    """What a `checkpoint.*` config asks for: when to write the latest file, when to write an
    epoch file, and which epoch files stay."""

    latest: AnySave
    epoch_file: AnySave
    full_file: AnySave  # when an epoch file holds every state, whatever `keep_every_states` says
    retention: Retention
    periodic: bool  # whether anything is saved without a preemption signal


def from_config(cfg: CheckpointConfig, lower_is_better: bool = True) -> Policies:
    """Policies from a `checkpoint` config section.

    The latest file: every epoch (`save_last`), every N steps or minutes, the overhead budget,
    and always on preemption. Epoch files: every `save_every` epochs, every `keep_every` epochs
    and, with `keep_best`, at epochs among the best k so far. Which stay: `retention_from_config`.
    """
    latest: list[SavePolicy] = [OnPreemption()]
    if cfg.save_last:
        latest.append(EveryEpoch())
    if cfg.every_steps:
        latest.append(EverySteps(int(cfg.every_steps)))
    if cfg.every_minutes:
        latest.append(EveryMinutes(float(cfg.every_minutes)))
    if cfg.max_overhead:
        latest.append(OverheadBudget(float(cfg.max_overhead)))
    epoch_file: list[SavePolicy] = []
    if cfg.save_every:
        epoch_file.append(EveryNEpochs(int(cfg.save_every)))
    if cfg.keep_every:
        epoch_file.append(EveryNEpochs(int(cfg.keep_every)))
    full_file: list[SavePolicy] = []
    if cfg.keep_best:  # a file kept as one of the best must be able to resume the run
        epoch_file.append(BestEpochs(int(cfg.keep_best)))
        full_file.append(BestEpochs(int(cfg.keep_best)))
    return Policies(AnySave(tuple(latest)), AnySave(tuple(epoch_file)), AnySave(tuple(full_file)),
                    retention_from_config(cfg, lower_is_better), periodic=len(latest) > 1 or bool(epoch_file))


def retention_from_config(cfg: CheckpointConfig, lower_is_better: bool = True) -> Retention:
    """Which epoch files stay under a `checkpoint` config section: the newest always; the newest
    `keep_last` (null or 0 with `save_every`: every scheduled file); every `keep_every`-th, for
    good; the best `keep_best`."""
    keep: list[KeepPolicy] = [KeepLatest(1)]
    if cfg.save_every and not cfg.keep_last:
        keep.append(KeepEveryN(int(cfg.save_every), for_good=False))
    elif cfg.keep_last:
        keep.append(KeepLatest(int(cfg.keep_last)))
    if cfg.keep_every:
        keep.append(KeepEveryN(int(cfg.keep_every)))
    if cfg.keep_best:
        keep.append(KeepBest(int(cfg.keep_best), lower_is_better))
    return Retention(tuple(keep))
