"""Builders from config: the solver class, optimizers, schedulers and data loaders."""

from __future__ import annotations

import importlib
import logging
import typing as tp

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from . import distrib, locations, startup, validation
from .errors import ConfigError
from .sampler import ResumableBatchSampler

logger = logging.getLogger(__name__)
__all__ = ['ConfigError', 'check_config', 'get_solver', 'solver_class', 'get_optimizer', 'get_lr_scheduler',
           'get_train_loader', 'get_eval_loader', 'known_solvers', 'freeze_prefixes', 'freeze_parameters',
           'check_freeze']


def known_solvers() -> list[str]:
    """Solver configs available as `solver=<name>`: the project's config/solver/ and the framework's."""
    folders = {locations.shipped('config') / 'solver', locations.config_dir(locations.project_package()) / 'solver'}
    return sorted({str(p.relative_to(root).with_suffix('')) for root in folders if root.is_dir()
                   for p in root.rglob('*.yaml')})


def check_config(cfg: DictConfig) -> None:
    """Refuse impossible values before anything is built or written: the framework's keys
    (`validation`), then the task's (its solver class's `check_config`)."""
    validation.check_config(cfg)
    solver_class(cfg.get('solver_class')).check_config(cfg)


def get_solver(cfg: DictConfig) -> tp.Any:
    """Instantiate the solver class that `solver_class` names (e.g. solver.drums.DrumRNNSolver)."""
    return solver_class(cfg.get('solver_class'))(cfg)


def solver_class(name: tp.Any) -> tp.Any:
    """The class that `solver_class` names (e.g. solver.drums.DrumRNNSolver), imported."""
    if not name or '.' not in str(name):
        raise ConfigError(f"solver_class={name!r} does not name a class; pick a solver config with "
                          f"solver=<name>, one of {known_solvers()}.")
    module_name, _, class_name = str(name).rpartition('.')
    startup.reached('config')
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"solver_class={name}: cannot import it ({err}). Known solver configs: "
                          f"{known_solvers()}.") from err
    finally:
        startup.reached('imports')  # the task's modules (the first time)


def get_optimizer(params: tp.Iterable[torch.nn.Parameter], optim: DictConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD from `optim.optimizer`, `optim.lr` and `optim.<name>` options.

    Parameters that do not require a gradient (frozen: `freeze_parameters`) are left out.
    """
    name = str(optim.optimizer).lower()
    options = dict(optim.get(name, {}) or {})
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError(f"No trainable parameters left for the optimizer: optim.freeze={freeze_prefixes(optim)} "
                          "freezes them all. Freeze fewer prefixes.")
    if name == 'adam':
        return torch.optim.Adam(params, lr=optim.lr, **options)
    if name == 'adamw':
        return torch.optim.AdamW(params, lr=optim.lr, **options)
    if name == 'sgd':
        return torch.optim.SGD(params, lr=optim.lr, **options)
    raise ConfigError(f"optim.optimizer={optim.optimizer!r} is unknown; use adam, adamw or sgd.")


def freeze_prefixes(optim: DictConfig) -> list[str]:
    """`optim.freeze` as strings (Hydra reads `[0]` as a number)."""
    return [str(prefix) for prefix in optim.get('freeze') or []]


def freeze_parameters(module: torch.nn.Module, prefixes: tp.Sequence[str]) -> set[str]:
    """Freeze (`requires_grad=False`) the parameters of `module` named `prefix` or `prefix.*`.

    `optim.freeze`, applied by `StandardSolver.distribute` to the module before it is wrapped
    (so DDP and the optimizer see only what trains). Logs the counts of frozen and trainable
    parameters; returns the prefixes that matched something (an unmatched one is an error,
    raised by `check_freeze` once every module was seen).
    """
    matched: set[str] = set()
    frozen = trainable = 0
    for name, param in module.named_parameters():
        hits = [p for p in prefixes if name == p or name.startswith(p.rstrip('.') + '.')]
        if hits:
            param.requires_grad_(False)
            matched.update(hits)
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    if prefixes:
        logger.info("optim.freeze=%s: %s parameters frozen, %s trainable (%s).", list(prefixes),
                    f"{frozen:,}", f"{trainable:,}", type(module).__name__)
    return matched


def check_freeze(prefixes: tp.Sequence[str], matched: set[str], names: tp.Iterable[str]) -> None:
    """Raise naming each `optim.freeze` prefix that matched no parameter (`names`: some known)."""
    unknown = [p for p in prefixes if p not in matched]
    if unknown:
        known = sorted({name.rsplit('.', 1)[0] for name in names})
        raise ConfigError(f"optim.freeze: {unknown} match no parameter name. Prefixes are dotted "
                          f"module paths, e.g. one of {known[:12]}.")


class Freeze:
    """`optim.freeze` for one solver: `apply` to each module as it is built (`StandardSolver.distribute`),
    then `check` once, which names any prefix that matched no parameter."""

    def __init__(self, optim: DictConfig) -> None:
        self.prefixes = freeze_prefixes(optim)
        self.matched: set[str] = set()
        self.names: list[str] = []

    def apply(self, module: torch.nn.Module) -> None:
        self.matched |= freeze_parameters(module, self.prefixes)
        self.names += [name for name, _ in module.named_parameters()]

    def check(self) -> None:
        check_freeze(self.prefixes, self.matched, self.names)


def get_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: DictConfig | None,
                     total_updates: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """None, 'cosine' (to zero over the run, with `warmup` steps) or 'step' (`step_size`, `gamma`)."""
    name = schedule.get('lr_scheduler') if schedule else None
    if not name:
        return None
    assert schedule is not None
    if name == 'cosine':
        warmup = int(schedule.get('warmup', 0))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_updates - warmup))
            return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == 'step':
        return torch.optim.lr_scheduler.StepLR(optimizer, schedule.step_size, schedule.get('gamma', 0.1))
    raise ConfigError(f"schedule.lr_scheduler={name!r} is unknown; use null or one of "
                      f"{', '.join(validation.SCHEDULERS)}.")


def get_train_loader(dataset: Dataset, cfg: DictConfig, seed: int,
                     collate_fn: tp.Callable | None = None) -> DataLoader:
    """Training loader over a resumable, rank-aware batch stream (see `sampler`)."""
    try:  # the sampler's messages name the keys (batch size against ranks or data): user errors
        sampler = ResumableBatchSampler(len(dataset), cfg.dataset.batch_size, seed=seed,  # type: ignore
                                        rank=distrib.rank(), world_size=distrib.world_size())
    except ValueError as err:
        raise ConfigError(str(err)) from err
    validation.check_batch_fits(cfg.dataset.batch_size, _item_bytes(dataset))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                      num_workers=cfg.dataset.num_workers, generator=_own_generator(seed))


def _item_bytes(dataset: Dataset) -> int:
    """Bytes of the tensors and arrays of the dataset's first item (0 if it has none)."""
    total = 0
    stack = [dataset[0]] if len(dataset) else []  # type: ignore[arg-type]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, 'nbytes') and isinstance(value.nbytes, int):
            total += value.nbytes
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


def _own_generator(seed: int) -> torch.Generator:
    """A loader draws its workers' base seed from this, not from the global RNG: otherwise
    creating an iterator (once per epoch, or again on resume) would shift the training RNG."""
    return torch.Generator().manual_seed(seed)


def get_eval_loader(dataset: Dataset, cfg: DictConfig, collate_fn: tp.Callable | None = None) -> DataLoader:
    """In-order loader for valid/evaluate; each rank takes its own share.

    Shares are the same size (with N ranks, up to N-1 items at the start are read twice): every
    rank then runs the same number of forwards, which a sharded model (FSDP) needs.
    """
    world, rank, size = distrib.world_size(), distrib.rank(), len(dataset)  # type: ignore[arg-type]
    indices = [index % size for index in range(rank, -(-size // world) * world, world)]
    subset = torch.utils.data.Subset(dataset, indices)
    batch = max(1, cfg.dataset.batch_size // world)
    validation.check_batch_fits(cfg.dataset.batch_size, _item_bytes(dataset))
    return DataLoader(subset, batch_size=batch, shuffle=False, collate_fn=collate_fn,
                      num_workers=cfg.dataset.num_workers, generator=_own_generator(0))
