"""torch.distributed for the solver: the process group, model wrapping, and the few collectives
the run itself needs.

Rank and world size come from the environment that the launcher provides: `dora run -d`
(RANK, WORLD_SIZE, MASTER_ADDR...), torchrun (the same variables), or Slurm through Dora's
submitit launcher (read by `dora.distrib`). We build no launcher and no collective of our own.

    init(cfg)                      join the process group (nccl on GPUs, gloo on CPU)
    wrap_model(module, cfg)        DistributedDataParallel, or FSDP2 `fully_shard` (fsdp.use)
    average_metrics / sum_metrics  metrics across ranks
    checkpoint_ranks()             the group checkpoint collectives run on, handed to the manager
    any_rank(flag, ...)            decisions every rank must take together (save now, roll back)
    check_agreement(values)        after a load: ranks agree on epoch and step, or an error names them

Every collective carries the timeout `distributed.timeout_minutes`: a rank that died makes the
others fail with an error instead of waiting forever.
"""

from __future__ import annotations

import datetime
import logging
import typing as tp

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpointing.ranks import Ranks
from .errors import UserError

if tp.TYPE_CHECKING:
    from omegaconf import DictConfig

logger = logging.getLogger(__name__)
_checkpoint_group: dist.ProcessGroup | None = None


class RankMismatchError(UserError, RuntimeError):
    """Ranks that must agree (on the epoch and step after a load) do not; the message names them."""


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def is_rank_zero() -> bool:
    return rank() == 0


def backend(cfg: DictConfig) -> str:
    """`distributed.backend`, with 'auto' meaning nccl for a CUDA run and gloo otherwise."""
    name = str(cfg.distributed.backend)
    if name != 'auto':
        return name
    return 'nccl' if str(cfg.device).startswith('cuda') and torch.cuda.is_available() else 'gloo'


def init(cfg: DictConfig) -> None:
    """Join the process group the launcher describes, if there is more than one process.

    Also creates a gloo group of all ranks for checkpoint collectives, so that a save written in
    the background never interleaves with the training collectives of the main thread.
    """
    global _checkpoint_group
    import dora.distrib  # here, not at the top: the `solver` command imports this module, and dora
    # (Hydra, submitit) costs it a third of a second it never uses
    spec = dora.distrib.get_distrib_spec()
    if spec.world_size <= 1 or dist.is_initialized():
        return
    name = backend(cfg)
    if name == 'nccl':
        torch.cuda.set_device(spec.local_rank)
    dora.distrib.set_distrib_env()  # MASTER_ADDR/PORT (and RANK...) under Slurm, if not set
    timeout = datetime.timedelta(minutes=float(cfg.distributed.timeout_minutes))
    dist.init_process_group(name, init_method='env://', rank=spec.rank, world_size=spec.world_size,
                            timeout=timeout)
    _checkpoint_group = dist.new_group(backend='gloo', timeout=timeout)
    logger.info("Distributed: rank %d of %d (local rank %d, from %s), backend %s, collective timeout "
                "%s min.", spec.rank, spec.world_size, spec.local_rank, spec.source, name,
                cfg.distributed.timeout_minutes)


def checkpoint_ranks() -> Ranks:
    """The ranks and process group for checkpoint collectives, for the `CheckpointManager`."""
    return Ranks(_checkpoint_group)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if is_distributed():
        dist.barrier(group=group)


# -- models ---------------------------------------------------------------------------------------

class ReplicatedModule(DistributedDataParallel):
    """DistributedDataParallel whose state is its module's: no 'module.' prefix in checkpoints,
    so that a checkpoint of a replicated run loads in one process and the other way round."""

    def state_dict(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        return self.module.load_state_dict(*args, **kwargs)


def wrap_model(module: nn.Module, cfg: DictConfig, units: tp.Iterable[nn.Module] = ()) -> nn.Module:
    """The module made ready for data-parallel training on the process group, if any.

    - `fsdp.use=false`: a `ReplicatedModule` (DDP; works on CPU with gloo, unlike flashy's wrap).
    - `fsdp.use=true`: FSDP2 `fully_shard` over a 1-d device mesh of all ranks, in place: each
      of `units` (e.g. the model's blocks) is sharded on its own, then the whole; parameters,
      and so the states of the model, EMA, best state and optimizer, become DTensor shards.

    Call it before creating the optimizer: sharding replaces the parameters.
    """
    if not is_distributed():
        if cfg.fsdp.use:
            logger.info("fsdp.use=true in a single process: the model is not sharded.")
        return module
    device = torch.device(cfg.device)
    if cfg.fsdp.use:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world_size(),))
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    ids = [torch.cuda.current_device()] if device.type == 'cuda' else None
    return ReplicatedModule(module, device_ids=ids)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """Create an optimizer's per-parameter states (a step with zero gradients and lr 0).

    A sharded checkpoint loads each tensor into the shard this rank holds, so the shards must
    exist before loading; an optimizer creates its states only at its first step. Returns False
    (and changes nothing) when the states exist already or gradients are pending.
    """
    params = [p for group in optimizer.param_groups for p in group['params']]
    if optimizer.state or any(p.grad is not None for p in params):
        return False
    for param in params:
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    lrs = [group['lr'] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group['lr'] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group['lr'] = lr
    optimizer.zero_grad(set_to_none=True)
    return True


# -- collectives of the run -----------------------------------------------------------------------

def _device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def average_metrics(metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """The mean of each metric over ranks, each rank weighted by `weight` (e.g. its batch count)."""
    if not is_distributed() or not metrics:
        return metrics
    values = torch.tensor([*metrics.values(), 1.0], dtype=torch.float64, device=_device()) * weight
    dist.all_reduce(values)
    return dict(zip(metrics, (values[:-1] / values[-1]).tolist()))


def sum_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The sum of each metric over ranks (counts, sums of losses)."""
    if not is_distributed() or not metrics:
        return metrics
    keys = sorted(metrics)  # the same order on every rank
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any rank: for decisions all ranks must take together
    (save now, leave, roll back), which would otherwise deadlock the collectives that follow."""
    if not is_distributed():
        return tuple(flags)
    values = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def check_agreement(values: dict[str, tp.Any], what: str = 'after loading the checkpoint') -> None:
    """Raise RankMismatchError naming the ranks whose `values` differ from rank 0's."""
    if not is_distributed():
        return
    gathered: list[tp.Any] = [None] * world_size()
    dist.all_gather_object(gathered, values)
    differ = [r for r, other in enumerate(gathered) if other != gathered[0]]
    if differ:
        shown = '; '.join(f"rank {r}: " + ', '.join(f"{k}={v}" for k, v in other.items())
                          for r, other in enumerate(gathered))
        raise RankMismatchError(
            f"Ranks {differ} disagree with rank 0 {what} ({shown}). Every rank must read the same "
            "checkpoint: check that the experiment folder is on a file system all ranks share.")
