"""Small ``torch.distributed`` helpers used by the engine (all collectives are no-ops in a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ._compile import uncompiled
from ._foreach import group_by_device_dtype

__all__ = ["ddp_module", "is_distributed"]


def ddp_module(model: object) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` module behind ``model`` (``torch.compile(ddp_model)`` included), or None.

    The optimizers take it to run a pass under its ``no_sync`` and to reduce their non-finite checks over the
    ranks; a compiled wrapper must not hide it (its ``no_sync`` works on the compiled module)."""
    model = uncompiled(model)
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


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
def all_reduce_grads_mean_(grads: list[Tensor]) -> None:
    """Average gradients over ranks, one flattened collective per (device, dtype) bucket."""
    if not is_distributed() or not grads:
        return
    world = dist.get_world_size()
    for (bucket,) in group_by_device_dtype(grads):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            grad.copy_(reduced)
