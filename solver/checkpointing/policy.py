"""When to save and what to keep, as small policy objects combined by "any" and by union.

A save policy answers one question about one moment of a run (`SaveContext`): save now? A keep
policy answers which epoch checkpoints (`checkpoint_<epoch>.th`) to keep, given the epochs that
have one and the best metric of every epoch (`KeepContext`). A file stays if any keep policy
keeps it. Each is a value that can be tested alone; `from_config` builds the ones a
`checkpoint.*` config asks for. Shaped after Orbax's save-decision and preservation policies.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

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


@dataclass
class KeepContext:
    """The epochs that have an epoch checkpoint (oldest first) and the best metric of each epoch."""

    epochs: list[int]
    scores: list[float | None] = field(default_factory=list)
    lower_is_better: bool = True


class KeepPolicy(tp.Protocol):
    def keep(self, ctx: KeepContext) -> set[int]: ...


@dataclass(frozen=True)
class KeepLatest:
    """The newest `n` epoch checkpoints."""

    n: int

    def keep(self, ctx: KeepContext) -> set[int]:
        return set(ctx.epochs[-self.n:]) if self.n > 0 else set()


@dataclass(frozen=True)
class KeepEveryN:
    """Epoch checkpoints of epochs that are multiples of `n`, for good."""

    n: int

    def keep(self, ctx: KeepContext) -> set[int]:
        return {epoch for epoch in ctx.epochs if epoch % self.n == 0}


@dataclass(frozen=True)
class KeepBest:
    """The checkpoints of the `k` epochs with the best metric (of all epochs run so far)."""

    k: int

    def keep(self, ctx: KeepContext) -> set[int]:
        return best_epochs(ctx.scores, self.k, ctx.lower_is_better) & set(ctx.epochs)


@dataclass(frozen=True)
class KeepUnion:
    """A checkpoint stays if any policy keeps it."""

    policies: tuple[KeepPolicy, ...] = ()

    def keep(self, ctx: KeepContext) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(ctx)
        return kept


def best_epochs(scores: tp.Sequence[float | None], k: int, lower_is_better: bool = True) -> set[int]:
    """The (1-based) epochs of the `k` best scores; on a tie the earlier epoch ranks first."""
    scored = [(score if lower_is_better else -score, epoch)
              for epoch, score in enumerate(scores, start=1) if score is not None]
    return {epoch for _, epoch in sorted(scored)[:max(k, 0)]}


# -- from the config ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Policies:
    """What a `checkpoint.*` config asks for: when to write the latest file, when to write an
    epoch file, and which epoch files to keep."""

    latest: AnySave
    epoch_file: AnySave
    keep: KeepUnion
    periodic: bool  # whether anything is saved without a preemption signal


def from_config(cfg: tp.Any) -> Policies:
    """Policies from a `checkpoint` config section (a DictConfig or anything with those keys).

    The latest file: every epoch (`save_last`), every N steps or minutes, the overhead budget,
    and always on preemption. Epoch files: every `save_every` epochs and, with `keep_best`, at
    epochs among the best k. Kept: the newest `keep_last` (else every scheduled file), every
    `keep_every`-th (written and kept for good), the best `keep_best`; the newest epoch file is always kept.
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
    keep: list[KeepPolicy] = [KeepLatest(1)]
    if cfg.save_every:
        epoch_file.append(EveryNEpochs(int(cfg.save_every)))
        # keep_last null (or 0): every scheduled file stays, as before any other keep policy
        keep.append(KeepLatest(int(cfg.keep_last)) if cfg.keep_last else KeepEveryN(int(cfg.save_every)))
    elif cfg.keep_last:
        keep.append(KeepLatest(int(cfg.keep_last)))
    if cfg.get('keep_every'):
        epoch_file.append(EveryNEpochs(int(cfg.keep_every)))
        keep.append(KeepEveryN(int(cfg.keep_every)))
    if cfg.get('keep_best'):
        epoch_file.append(BestEpochs(int(cfg.keep_best)))
        keep.append(KeepBest(int(cfg.keep_best)))
    return Policies(AnySave(tuple(latest)), AnySave(tuple(epoch_file)), KeepUnion(tuple(keep)),
                    periodic=len(latest) > 1 or bool(epoch_file))
