"""The config checked once, up front: values that cannot work are refused before anything is built.

Each refusal is a `ConfigError` naming the key, the value and what is allowed. Settings a task
uses late (in evaluate or generate) are its own to check: `StandardSolver.check_config`, called
right after these checks by `builders.check_config`.
"""

from __future__ import annotations

import math
import os
import typing as tp

from .checkpointing import config as checkpoint_config
from .errors import ConfigError

STAGES = ('valid', 'evaluate', 'generate')


def lookup(cfg: tp.Any, key: str) -> tp.Any:
    """The value at a dotted key, None where a part is missing."""
    value = cfg
    for part in key.split('.'):
        value = value.get(part) if hasattr(value, 'get') else None
        if value is None:
            return None
    return value


def number(cfg: tp.Any, key: str, allowed: str, ok: tp.Callable[[float], bool],
           integer: bool = False, optional: bool = False) -> None:
    """Refuse `key` unless it is a number (an integer with `integer`) for which `ok` holds, or
    missing/null with `optional`; `allowed` says what is allowed, for the message."""
    value = lookup(cfg, key)
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{key}={value!r} cannot work: expected {allowed}.")


def check_config(cfg: tp.Any) -> None:
    """Refuse impossible values of the framework's keys (see the module docstring)."""
    number(cfg, 'optim.epochs', 'an integer >= 1', lambda v: v >= 1, integer=True)
    number(cfg, 'optim.lr', 'a finite number >= 0', lambda v: v >= 0)
    number(cfg, 'optim.updates_per_epoch', 'null or an integer >= 1', lambda v: v >= 1, integer=True, optional=True)
    number(cfg, 'dataset.batch_size', 'an integer >= 1', lambda v: v >= 1, integer=True)
    number(cfg, 'optim.ema.decay', 'a number in [0, 1)', lambda v: 0 <= v < 1, optional=True)
    number(cfg, 'optim.ema.updates', 'an integer >= 1', lambda v: v >= 1, integer=True, optional=True)
    for key, rule in checkpoint_config.rules():  # each checkpoint.* key by its definition
        number(cfg, key, rule.allowed, rule.ok, integer=rule.integer, optional=True)
    number(cfg, 'early_stop.patience', 'null or an integer >= 0 (0: off)', lambda v: v >= 0, integer=True,
           optional=True)
    number(cfg, 'early_stop.min_delta', 'a number >= 0', lambda v: v >= 0, optional=True)
    number(cfg, 'cache.max_mb', 'a number > 0 (cache.use=false turns the data cache off)', lambda v: v > 0,
           optional=True)
    check_schedule(cfg)
    stage = cfg.get('execute_only')
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"execute_only={stage!r}: expected one of {', '.join(STAGES)} (or null).")
    keep_dtype, allowed = lookup(cfg, 'checkpoint.keep_dtype'), checkpoint_config.KEEP_DTYPES
    if keep_dtype is not None and keep_dtype not in allowed:
        raise ConfigError(f"checkpoint.keep_dtype={keep_dtype!r}: expected one of {', '.join(allowed)} "
                          "(or null: epoch files kept for good stay whole).")
    if keep_dtype is not None and lookup(cfg, 'fsdp.use'):
        raise ConfigError("checkpoint.keep_dtype cannot reduce sharded (fsdp.use=true) checkpoints: "
                          "set checkpoint.keep_dtype=null, or export the kept files (solver export --dtype bf16).")
    compress = lookup(cfg, 'checkpoint.compress')
    if compress is not None and compress not in checkpoint_config.COMPRESS:
        raise ConfigError(f"checkpoint.compress={compress!r}: expected one of {', '.join(checkpoint_config.COMPRESS)} "
                          "(or null: tensors stored as they are).")
    for other in ('checkpoint.incremental', 'fsdp.use'):
        if compress is not None and lookup(cfg, other):
            raise ConfigError(f"checkpoint.compress={compress} cannot be combined with {other}=true: "
                              f"set one of them off (checkpoint.compress=null or {other}=false).")
    if lookup(cfg, 'checkpoint.incremental') and lookup(cfg, 'fsdp.use'):  # [incremental]
        raise ConfigError("checkpoint.incremental=true cannot store sharded (fsdp.use=true) checkpoints: "
                          "set one of them to false.")
    if lookup(cfg, 'checkpoint.incremental') and lookup(cfg, 'checkpoint.remote'):  # [incremental]
        raise ConfigError("checkpoint.incremental=true with checkpoint.remote: the mirror copies checkpoint "
                          "files, not the blobs they name; set checkpoint.incremental=false to mirror.")
    check_saves_something(cfg)


SCHEDULERS = ('cosine', 'step')  # schedule.lr_scheduler (builders.get_lr_scheduler)


def check_schedule(cfg: tp.Any) -> None:
    """schedule.*: a known scheduler and the numbers it needs (counted in training updates)."""
    name = lookup(cfg, 'schedule.lr_scheduler')
    if name is not None and name not in SCHEDULERS:
        raise ConfigError(f"schedule.lr_scheduler={name!r}: expected one of {', '.join(SCHEDULERS)} (or null: "
                          "a constant optim.lr).")
    number(cfg, 'schedule.warmup', 'null or an integer >= 0 (updates of linear warmup)', lambda v: v >= 0,
           integer=True, optional=True)
    number(cfg, 'schedule.step_size', 'an integer >= 1 (updates between decays)', lambda v: v >= 1, integer=True,
           optional=name != 'step')
    number(cfg, 'schedule.gamma', 'a number > 0 (the factor of each decay)', lambda v: v > 0, optional=True)


def check_saves_something(cfg: tp.Any) -> None:
    """Refuse a config that never writes a checkpoint (a rerun would train again from scratch),
    unless `checkpoint.allow_none=true` says that is meant. `execute_only` writes none anyway."""
    if cfg.get('execute_only') or lookup(cfg, 'checkpoint.allow_none'):
        return
    saving = checkpoint_config.saving_keys()
    if not any(lookup(cfg, key) for key in saving):
        raise ConfigError(
            f"This config never writes a checkpoint: {', '.join(saving)} are all off, so the run "
            "could not be resumed and a rerun would train from scratch. Set checkpoint.save_last=true "
            "or checkpoint.save_every=N (or checkpoint.allow_none=true if that is what you want).")


INDEX_BYTES = 64  # what the sampler keeps per item of a batch (a Python int in a list), beside the item


def available_memory() -> int:
    """Bytes of memory this machine can give now (MemAvailable), else its physical memory."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_batch_fits(batch_size: int, item_bytes: int, key: str = 'dataset.batch_size',
                     available: int | None = None) -> None:
    """Refuse a batch whose items (`item_bytes` each, as the dataset's first item) would take
    more than half the memory available, before the sampler or the loader allocates any of it:
    a batch of 1e9 otherwise allocates until the kernel's OOM killer ends the process."""
    available = available_memory() if available is None else available
    per_item = max(item_bytes, 0) + INDEX_BYTES
    bound = max(1, available // 2 // per_item)
    if batch_size > bound:
        raise ConfigError(
            f"{key}={batch_size} cannot fit: one batch would hold about {batch_size * per_item / 2**30:.1f} GiB "
            f"({per_item} bytes per item), more than half the {available / 2**30:.1f} GiB of memory available; "
            f"the bound here is {key} <= {bound}.")
