"""The `checkpoint.*` keys, defined once: each key's type, default, the values it allows, and
whether it makes a run save without a preemption signal.

`config/base.yaml` holds the same keys with the same defaults and a comment each: what a user
reads and overrides (tests/test_validation.py checks that the two agree). `validation.check_config`
refuses impossible values by the `Rule` of each key here; `CheckpointConfig.parse` turns a
`checkpoint` section (a DictConfig, or the plain dict a finished run recorded) into the typed
value the manager and the policies read.
"""

from __future__ import annotations

import dataclasses
import typing as tp
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Rule:
    """The numbers a key allows (null is always allowed): `ok(value)`, said as `allowed`."""

    allowed: str
    ok: tp.Callable[[float], bool]
    integer: bool = False


KEEP_DTYPES = ('bf16', 'fp16')  # the values of `checkpoint.keep_dtype` (`weights`)
COMPRESS = ('zstd',)            # the values of `checkpoint.compress` (`codec.ENCODINGS`)
AT_LEAST_0 = Rule('null or an integer >= 0', lambda v: v >= 0, integer=True)
AT_LEAST_1 = Rule('null or an integer >= 1', lambda v: v >= 1, integer=True)


def key(default: tp.Any = None, rule: Rule | None = None, saving: bool = False) -> tp.Any:
    """A config key: its default, its `rule`, and whether it makes a run save (`saving`)."""
    return field(default=default, metadata={'rule': rule, 'saving': saving})


@dataclass(frozen=True)
class RollbackConfig:
    """`checkpoint.rollback.*`: reloading the newest checkpoint after a non-finite (or spiking) loss."""

    max_rollbacks: int = key(3, Rule('an integer >= 0 (0: off)', lambda v: v >= 0, integer=True))
    spike_factor: float | None = key(None, Rule('null or a number > 1', lambda v: v > 1))


@dataclass(frozen=True)
class CheckpointConfig:
    """`checkpoint.*`: when to save, what to keep, how to write, where to mirror (base.yaml
    says what each key does)."""

    save_last: bool = key(True, saving=True)
    save_every: int | None = key(None, AT_LEAST_1, saving=True)
    keep_last: int | None = key(None, AT_LEAST_0)
    keep_every: int | None = key(None, AT_LEAST_1, saving=True)
    keep_best: int | None = key(None, AT_LEAST_0, saving=True)
    keep_every_states: list[str] | None = key(None)
    keep_dtype: str | None = key(None)
    ignore_state_keys: list[str] = field(default_factory=list, metadata={'rule': None, 'saving': False})
    strict: bool = key(True)
    async_save: bool = key(True)
    incremental: bool = key(False)
    compress: str | None = key(None)
    staging_max_mb: float | None = key(None)
    every_steps: int | None = key(None, AT_LEAST_1, saving=True)
    every_minutes: float | None = key(None, Rule('null or a number > 0', lambda v: v > 0), saving=True)
    max_overhead: float | None = key(None, Rule('null or a share in (0, 1), e.g. 0.01', lambda v: 0 < v < 1),
                                     saving=True)
    allow_none: bool = key(False)
    remote: str | None = key(None)
    rollback: RollbackConfig = field(default_factory=RollbackConfig, metadata={'rule': None, 'saving': False})

    @classmethod
    def parse(cls, section: tp.Any) -> CheckpointConfig:
        """The typed value of a `checkpoint` section: a DictConfig or a plain dict (missing keys
        take their defaults; keys this version does not know, as in an older run's recorded
        config, are left out). Values are not checked here: `validation.check_config` does."""
        if isinstance(section, cls):
            return section
        return _parse(cls, section)


def _parse(cls: tp.Any, section: tp.Any) -> tp.Any:
    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section
    values = values if isinstance(values, dict) else {}
    known = {}
    for item in dataclasses.fields(cls):
        if item.name in values:
            value = values[item.name]
            nested = item.default_factory if item.default_factory is not dataclasses.MISSING else None
            known[item.name] = _parse(nested, value) if dataclasses.is_dataclass(nested) else value
    return cls(**known)


def rules(cls: tp.Any = CheckpointConfig, prefix: str = 'checkpoint') -> tp.Iterator[tuple[str, Rule]]:
    """(dotted key, rule) of every key that has one, nested sections included."""
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(item.default_factory):
            yield from rules(item.default_factory, f'{prefix}.{item.name}')
        elif item.metadata.get('rule') is not None:
            yield f'{prefix}.{item.name}', item.metadata['rule']


def saving_keys() -> tuple[str, ...]:
    """The keys that make a run write checkpoints without a preemption signal."""
    return tuple(f'checkpoint.{item.name}' for item in dataclasses.fields(CheckpointConfig)
                 if item.metadata.get('saving'))
