"""Grouped ``torch._foreach_*`` helpers: tensors are bucketed by (device, dtype) so each call is one fused op."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__: list[str] = []


def group_by_device_dtype(*tensor_lists: Sequence[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel lists of tensors into buckets sharing the first list's (device, dtype)."""
    first = tensor_lists[0]
    if first:
        device, dtype = first[0].device, first[0].dtype
        if all(t.device == device and t.dtype == dtype for t in first):  # the common case: one bucket
            return [tuple(list(tensors) for tensors in tensor_lists)]
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = defaultdict(
        lambda: tuple([] for _ in tensor_lists)
    )
    for items in zip(*tensor_lists, strict=True):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for dst, item in zip(bucket, items, strict=True):
            dst.append(item)
    return list(buckets.values())


def squared_norm(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """Sum of squared L2 norms of ``tensors`` as a float32/float64 0-d tensor (no host sync).

    The result lives on ``device`` (default: the first tensor's device). An empty list gives 0.
    """
    if not tensors:
        return torch.zeros((), device=device or "cpu")
    device = device or tensors[0].device
    parts = []
    for (bucket,) in group_by_device_dtype(tensors):
        # Norms of bf16/fp16 tensors are computed in float32: a low-precision result loses ~3 digits.
        acc = torch.promote_types(bucket[0].dtype, torch.float32)
        if bucket[0].dtype == acc:
            norms = torch._foreach_norm(bucket)
        else:
            try:
                norms = torch._foreach_norm(bucket, 2, dtype=acc)
            except TypeError:  # torch without the dtype argument
                norms = [t.to(acc).norm() for t in bucket]
        parts.append(torch.stack(norms).to(device=device, dtype=acc).square().sum())
    total = parts[0]
    for part in parts[1:]:
        total = total + part.to(total.dtype)
    return total


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """Sum over tensor pairs of the inner product ``<x, y>`` (no host sync, no parameter-sized temporaries)."""
    if not xs:
        return torch.zeros((), device=device or "cpu")
    device = device or xs[0].device
    parts = []
    for x, y in zip(xs, ys, strict=True):
        acc = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == acc:
            parts.append(torch.dot(x.reshape(-1), y.reshape(-1)).to(device))
        else:  # low precision: accumulate in float32
            parts.append(torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)).to(device))
    total = parts[0]
    for part in parts[1:]:
        total = total + part.to(total.dtype)
    return total
