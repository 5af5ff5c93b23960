"""Small ``torch.distributed`` helpers used by the engine (all collectives are no-ops in a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ._compile import uncompiled
from ._foreach import group_by_device_dtype, is_sharded

__all__ = ["ddp_module", "is_distributed"]


def ddp_module(model: object) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` module behind ``model`` (``torch.compile(ddp_model)`` included), or None.

    The optimizers take it to run a pass under its ``no_sync`` and to reduce their non-finite checks over the
    ranks; a compiled wrapper must not hide it (its ``no_sync`` works on the compiled module)."""
    model = uncompiled(model)
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


def has_sharded_params(param_groups: list[dict]) -> bool:
    """Whether the groups hold parameters sharded by FSDP2 (``DTensor`` s), judged by each group's first
    parameter (``fully_shard`` converts every parameter of the modules it wraps)."""
    return any(group["params"] and is_sharded(group["params"][0]) for group in param_groups)


def check_not_sharded(name: str, param_groups: list[dict], setting: str, instead: str) -> None:
    """Refuse a ``setting`` that cannot run on parameters sharded by FSDP2 (``DTensor`` s): ``NotImplementedError``
    naming what to use ``instead``."""
    if has_sharded_params(param_groups):
        raise NotImplementedError(f"{name}({setting}) does not support parameters sharded by FSDP2 (DTensor); "
                                  f"{instead}")


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """In-place mean over ranks (SUM then divide: gloo has no AVG)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


@torch.no_grad()
def all_reduce_grads_mean_(grads: list[Tensor], present: list[bool] | None = None) -> list[bool] | None:
    """Average gradients over ranks in place, one flattened collective per (device, dtype) bucket.

    ``present``: which of ``grads`` this rank's pass computed; the others are zeros standing in for parameters
    it did not reach (DDP ``find_unused_parameters=True``), so that every rank reduces the same layout. Each
    bucket's collective then also counts the ranks that computed each gradient, and the result says, per
    gradient, whether any rank did (DDP leaves a gradient no rank computed as None). The counts are read on
    the host only by a rank that lacks a gradient.
    """
    if not is_distributed() or not grads:
        return None if present is None else list(present)
    world = dist.get_world_size()
    found = None if present is None else list(present)
    for bucket, index in group_by_device_dtype(grads, list(range(len(grads)))):
        tensors = list(bucket)
        lacking = [] if found is None else [k for k, i in enumerate(index) if not found[i]]
        if found is not None:  # the count of ranks that computed each gradient rides in the same collective
            tensors.append(torch.ones(len(bucket), dtype=bucket[0].dtype, device=bucket[0].device))
            if lacking:
                tensors[-1][lacking] = 0
        flat = _flatten_dense_tensors(tensors)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)  # (a count divided by the world is still > 0 where some rank computed the gradient)
        reduced = _unflatten_dense_tensors(flat, tensors)
        for grad, mean in zip(bucket, reduced, strict=False):  # (the counts, if any, come last)
            grad.copy_(mean)
        if lacking:
            for k, count in zip(lacking, reduced[-1][lacking].tolist(), strict=True):
                found[index[k]] = count > 0
    return found
