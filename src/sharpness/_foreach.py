"""Grouped ``torch._foreach_*`` helpers: tensors are bucketed by (device, dtype) so each call is one fused op.

The in-place list ops below (``copy_``, ``mul_``, ``div_``, ``add_``, ``addcmul_``, ``abs_``) and the
reductions (``squared_norm``, ``global_norm``, ``dot``) have two implementations with one signature, as
torch.optim's ``_foreach_*`` and ``_single_tensor_*`` kernels: the fused ``torch._foreach_*`` path (the default) and a per-tensor loop. Which one
runs is a context setting (:func:`foreach_mode`) that the optimizers set from their ``foreach`` option, so
both paths run the same algorithm code and their parity is testable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # a torch built without distributed: no parameter can be sharded
    DTensor = None

__all__: list[str] = []

_FOREACH: contextvars.ContextVar[bool] = contextvars.ContextVar("sharpness_foreach", default=True)


def _mode(enabled: bool | None) -> bool:
    return True if enabled is None else bool(enabled)


@contextlib.contextmanager
def foreach_mode(enabled: bool | None) -> Iterator[None]:
    """Run the list ops fused (``True``, also for ``None``: the default) or one tensor at a time (``False``)."""
    token = _FOREACH.set(_mode(enabled))
    try:
        yield
    finally:
        _FOREACH.reset(token)


def foreach_enabled() -> bool:
    return _FOREACH.get()


def uses_foreach_option(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an optimizer method so its list ops follow the instance's ``foreach`` option."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _FOREACH.set(_mode(getattr(self, "foreach", None)))  # (foreach_mode, without its generator)
        try:
            return method(self, *args, **kwargs)
        finally:
            _FOREACH.reset(token)

    return wrapper


def no_grad(function: Callable[..., Any]) -> Callable[..., Any]:
    """``@torch.no_grad()`` for the step path: enters no context when gradients are already off (the rules and
    the two-phase methods run inside ``step``, where a context would cost a few microseconds each, which a
    host-bound step notices)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return function(*args, **kwargs)
        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapper


def _per_tensor(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i] <- src[i]``."""
    if _FOREACH.get():
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def mul_(tensors: Sequence[Tensor], other: Any) -> None:
    """``t[i] <- t[i] * other[i]`` (``other``: a number, a 0-d tensor, or a list of tensors/numbers)."""
    if _FOREACH.get():
        torch._foreach_mul_(tensors, other)
    else:
        for t, o in zip(tensors, _per_tensor(other, len(tensors)), strict=True):
            t.mul_(o)


def add_(tensors: Sequence[Tensor], other: Any, *, alpha: float = 1) -> None:
    """``t[i] <- t[i] + alpha * other[i]`` (``other``: a number or a list of tensors)."""
    if _FOREACH.get():
        if isinstance(other, (list, tuple)):
            torch._foreach_add_(tensors, other, alpha=alpha)
        else:
            torch._foreach_add_(tensors, other if alpha == 1 else other * alpha)
    else:
        for t, o in zip(tensors, _per_tensor(other, len(tensors)), strict=True):
            if isinstance(o, Tensor):
                t.add_(o, alpha=alpha)
            else:
                t.add_(o if alpha == 1 else o * alpha)


def addcmul_(tensors: Sequence[Tensor], a: Sequence[Tensor], b: Sequence[Tensor] | Any, value: Any = 1) -> None:
    """``t[i] <- t[i] + value[i] * a[i] * b[i]`` (``b``: a list of tensors; ``value``: a number or a list of
    numbers / 0-d tensors). With ``b`` a number or a list of 0-d tensors it is ``t[i] + a[i] * b[i]``."""
    if _FOREACH.get():
        if isinstance(value, (int, float)) and value == 1:
            torch._foreach_addcmul_(tensors, a, b)
        else:
            torch._foreach_addcmul_(tensors, a, b, value)
    else:
        bs = _per_tensor(b, len(tensors))
        for t, x, y, v in zip(tensors, a, bs, _per_tensor(value, len(tensors)), strict=True):
            if isinstance(y, Tensor) and y.dim() == 0 and x.dim() > 0:
                t.addcmul_(x, y.expand_as(x), value=v)
            elif isinstance(y, Tensor):
                t.addcmul_(x, y, value=v)
            else:
                t.add_(x, alpha=y * v)


def lerp_(tensors: Sequence[Tensor], ends: Sequence[Tensor], weight: float) -> None:
    """``t[i] <- t[i] + weight * (e[i] - t[i])`` in place, one pass (``torch.lerp``'s formula)."""
    if _FOREACH.get():
        torch._foreach_lerp_(tensors, ends, weight)
    else:
        for t, e in zip(tensors, ends, strict=True):
            t.lerp_(e, weight)


def scaled_copy_(dst: Sequence[Tensor], src: Sequence[Tensor], scale: Tensor | float) -> None:
    """``dst[i] <- scale * src[i]`` for a number or a 0-d tensor ``scale``.

    A number, or a CPU tensor (read for free), is one pass per tensor (``torch.mul(src, scale, out=dst)``). A
    tensor on a device stays there: a fused copy, then a fused multiply by the 0-d factor (no host read).
    """
    scale = read_if_free(scale)
    if isinstance(scale, Tensor):
        copy_(dst, src)
        mul_(dst, like(scale, dst[0]))
    else:
        for d, s in zip(dst, src, strict=True):
            torch.mul(s, scale, out=d)


def div_(tensors: Sequence[Tensor], other: Tensor) -> None:
    """``t[i] <- t[i] / other`` (``other``: one 0-d tensor on the tensors' device, no host synchronisation)."""
    if _FOREACH.get():
        torch._foreach_div_(tensors, other)
    else:
        for t in tensors:
            t.div_(other)


def sub_(tensors: Sequence[Tensor], other: Any, *, alpha: float = 1) -> None:
    """``t[i] <- t[i] - alpha * other[i]``."""
    add_(tensors, other, alpha=-alpha)


def zero_(tensors: Sequence[Tensor]) -> None:
    """``t[i] <- 0``."""
    if _FOREACH.get():
        torch._foreach_zero_(tensors)
    else:
        for t in tensors:
            t.zero_()


def abs_(tensors: Sequence[Tensor]) -> None:
    """``t[i] <- |t[i]|``."""
    if _FOREACH.get():
        torch._foreach_abs_(tensors)
    else:
        for t in tensors:
            t.abs_()


def host_read_is_free(tensor: Tensor) -> bool:
    """Whether reading ``tensor`` into Python waits for nothing: a CPU tensor (on CUDA or MPS a read is a host
    synchronisation). Fast paths that read a 0-d scale on the CPU ask this; ``tests/test_memory.py`` turns it
    off to count, on the CPU, the reads a GPU step would make."""
    return tensor.is_cpu


def read_if_free(scalar: Tensor | float) -> Tensor | float:
    """``float(scalar)`` where reading the 0-d tensor waits for nothing (:func:`host_read_is_free`), else the
    tensor itself (a number stays a number). Scalar arithmetic (``rho / (norm + eps)``) is then Python
    arithmetic on the CPU, a few microseconds less per operation than a 0-d kernel, and stays on the device
    elsewhere."""
    return float(scalar) if isinstance(scalar, Tensor) and host_read_is_free(scalar) else scalar


def divide_floored(numerator: Tensor | float, denominator: Tensor | float) -> Tensor | float:
    """``numerator / max(denominator, tiny)`` (``tiny``: float32's smallest normal number), for a coefficient
    ``<x, y> / ||y||^2`` whose ``y`` may be zero: numbers where both read for free, else a 0-d tensor."""
    numerator, denominator = read_if_free(numerator), read_if_free(denominator)
    tiny = torch.finfo(torch.float32).tiny
    if isinstance(denominator, Tensor):
        return numerator / denominator.clamp_min(tiny)
    return numerator / max(denominator, tiny)


def add_scaled_(tensors: Sequence[Tensor], others: Sequence[Tensor], scale: Tensor | float) -> None:
    """``t[i] <- t[i] + scale * o[i]`` in place, for a number or a 0-d tensor ``scale`` (any device and dtype).

    A number, or a CPU tensor (read for free), goes in as ``alpha``: one fused add. A tensor on a device stays
    there, broadcast as a 0-d factor of ``addcmul_``: no host synchronisation.
    """
    if not tensors:
        return
    scale = read_if_free(scale)
    if isinstance(scale, Tensor):
        addcmul_(tensors, others, [like(scale, tensors[0])] * len(tensors))
    else:
        add_(tensors, others, alpha=scale)


def like(scalar: Tensor | float, tensor: Tensor) -> Tensor | float:
    """``scalar`` (a 0-d tensor) on ``tensor``'s device and in its dtype; itself when it already is, or when it
    is a number (a no-op ``.to()`` still costs a dispatch, which counts in a host-bound step)."""
    if not isinstance(scalar, Tensor) or (scalar.device == tensor.device and scalar.dtype == tensor.dtype):
        return scalar
    return scalar.to(device=tensor.device, dtype=tensor.dtype)


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype for sums of many values (losses, counts) on ``device``: float64, except on MPS (no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


@functools.cache
def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: the dtype norms and inner products of ``dtype`` tensors are accumulated in (bf16/fp16
    results would lose about 3 digits). Cached: ``torch.promote_types`` is a dispatched op, a few microseconds
    a call."""
    return torch.promote_types(dtype, torch.float32)


def _one_device_and_dtype(tensors: Sequence[Tensor]) -> bool:
    """Whether all ``tensors`` share one (device, dtype): torch's C++ grouping (what torch.optim's foreach paths
    use) when available, 2x faster than the Python check for hundreds of tensors."""
    try:
        return len(torch._C._group_tensors_by_device_and_dtype([list(tensors)], False)) == 1
    except (AttributeError, RuntimeError, TypeError):  # a torch without it: the same check in Python
        device, dtype = tensors[0].device, tensors[0].dtype
        return all(t.device == device and t.dtype == dtype for t in tensors)


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2's ``fully_shard``, or its gradient)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def _any_sharded(tensor_lists: Sequence[Sequence[Tensor]]) -> bool:
    """Whether a list holds ``DTensor`` s (judged by its first tensor; a loop, not ``any()``: a step calls this
    in every list op)."""
    if DTensor is not None:
        for tensors in tensor_lists:
            if tensors and isinstance(tensors[0], DTensor):
                return True
    return False


def local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """This rank's shards of ``tensors``: a ``DTensor``'s local tensor (an alias under ``no_grad``: writing to it
    writes the ``DTensor``), other tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def group_by_device_dtype(*tensor_lists: Sequence[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel lists of tensors into buckets sharing the first list's (device, dtype).

    ``DTensor`` s (FSDP2) are replaced by their local shards: the list ops are elementwise, so each rank updates
    its own shard with plain fused kernels (no sharding propagation per op). The reductions below sum their
    per-rank values over the shards."""
    if _any_sharded(tensor_lists):
        tensor_lists = tuple(local(tensors) for tensors in tensor_lists)
    first = tensor_lists[0]
    if first and _one_device_and_dtype(first):  # the common case: one bucket
        return [tuple(list(tensors) for tensors in tensor_lists)]
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = defaultdict(
        lambda: tuple([] for _ in tensor_lists)
    )
    for items in zip(*tensor_lists, strict=True):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for dst, item in zip(bucket, items, strict=True):
            dst.append(item)
    return list(buckets.values())


def copy_grouped_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i] <- src[i]`` over lists that may mix devices and dtypes (one foreach copy per bucket).

    A function rather than a loop in the caller: an optimizer that calls the closure again later must not
    keep a loop variable bound to ``src``'s gradient tensors, or the closure's ``zero_grad`` cannot free them
    before its backward allocates new ones (one parameter-sized set more at the peak)."""
    for d, s in group_by_device_dtype(dst, src):
        copy_(d, s)


def _bucket_norms(bucket: Sequence[Tensor]) -> Tensor:
    """The 1-d tensor of the L2 norms of one (device, dtype) bucket's tensors, on their device (one fused norm)."""
    # Norms of bf16/fp16 tensors are computed in float32: a low-precision result loses ~3 digits.
    acc = accumulation_dtype(bucket[0].dtype)
    if not _FOREACH.get():
        norms = [torch.linalg.vector_norm(t, dtype=acc) for t in bucket]
    elif bucket[0].dtype == acc:
        norms = torch._foreach_norm(bucket)
    else:
        try:
            norms = torch._foreach_norm(bucket, 2, dtype=acc)
        except TypeError:  # torch without the dtype argument
            norms = [t.to(acc).norm() for t in bucket]
    return torch.stack(norms)


def _norm_stacks(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Per (device, dtype) bucket: the 1-d tensor of the bucket's L2 norms, on ``device``, in float32 or wider."""
    stacks = []
    for (bucket,) in group_by_device_dtype(tensors):
        stack, acc = _bucket_norms(bucket), accumulation_dtype(bucket[0].dtype)
        stacks.append(stack if stack.device == device and stack.dtype == acc else stack.to(device=device, dtype=acc))
    return stacks


def _sum_parts(parts: list[Tensor]) -> Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part.to(total.dtype)
    return total


def squared_norm(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """Sum of squared L2 norms of ``tensors`` as a float32/float64 0-d tensor (no host sync).

    The result lives on ``device`` (default: the first tensor's device). An empty list gives 0.
    """
    if not tensors:
        return torch.zeros((), device=device or "cpu")
    if _any_sharded([tensors]):
        return _sum_over_shards(squared_norm, tensors, device=device)
    return _sum_parts([stack.square().sum() for stack in _norm_stacks(tensors, device or tensors[0].device)])


def largest_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The largest per-tensor L2 norm of ``tensors``, a 0-d real tensor (a ``DTensor`` counts its local shard).
    NaN or inf if any element is, so it is the finiteness probe of a list: one fused norm, one stack and one max
    per (device, dtype) bucket (20x faster on the CPU than an inf-norm), on the buckets' own devices. A tensor
    whose norm is beyond its dtype's range (float32: elements near 1e19) also reads inf: callers confirm on
    that rare path."""
    parts = []
    for (bucket,) in group_by_device_dtype(tensors):
        stack = _bucket_norms(bucket)
        parts.append((stack.real if stack.is_complex() else stack).max())  # (a complex tensor's norm is real)
    if not parts:
        return torch.zeros(())
    # (float32 across buckets: no float64 on MPS; a float64 norm beyond float32's range reads inf, see above)
    return parts[0] if len(parts) == 1 else torch.stack([part.float().to(parts[0].device) for part in parts]).max()


def global_norm(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """The L2 norm of all ``tensors`` together, ``sqrt(squared_norm(tensors))``, in one kernel fewer per bucket
    (three kernels in all for one (device, dtype): the per-tensor norms, their stack, the norm of the stack)."""
    if not tensors:
        return torch.zeros((), device=device or "cpu")
    if _any_sharded([tensors]):
        return squared_norm(tensors, device).sqrt()
    stacks = _norm_stacks(tensors, device or tensors[0].device)
    if len(stacks) == 1:
        return torch.linalg.vector_norm(stacks[0])
    return _sum_parts([stack.square().sum() for stack in stacks]).sqrt()


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor], device: torch.device | None = None, *,
        scratch: Sequence[Tensor] | None = None) -> Tensor:
    """Sum over tensor pairs of the inner product ``<x, y>`` (no host sync, no parameter-sized temporaries).

    One ``torch.dot`` per tensor, which on a GPU is one launch per tensor. Given ``scratch`` (writable tensors
    shaped like ``xs``, overwritten), a float32/float64 bucket on a device uses the polarization identity
    ``<x, y> = (||x + y||^2 - ||x - y||^2) / 4`` instead: two fused norms, about 10 kernels for any number of
    tensors. Its rounding error is that of the norms, ``~eps (||x||^2 + ||y||^2)``, the same order as the dots'
    (``~eps sum |x_i y_i|``) when ``x`` and ``y`` have similar norms (LookSAM's and GSAM's ``g`` and ``g_s``).
    """
    if not xs:
        return torch.zeros((), device=device or "cpu")
    if _any_sharded([xs, ys]):  # (the scratch list is grouped with them, so it stays aligned with xs)
        return _sum_over_shards(lambda x, y, *s: dot(x, y, device, scratch=s[0] if s else None),
                                xs, ys, *([scratch] if scratch is not None else []))
    device = device or xs[0].device
    parts = []
    for bucket_x, bucket_y, *bucket_s in group_by_device_dtype(xs, ys, *([scratch] if scratch is not None else [])):
        acc = accumulation_dtype(bucket_x[0].dtype)
        if bucket_s and bucket_x[0].dtype == acc and not host_read_is_free(bucket_x[0]):
            (tmp,) = bucket_s
            copy_(tmp, bucket_x)
            add_(tmp, bucket_y)  # x + y
            plus = squared_norm(tmp)
            add_(tmp, bucket_y, alpha=-2)  # x - y
            parts.append(((plus - squared_norm(tmp)) / 4).to(device))
            continue
        if bucket_x[0].dtype == acc:
            products = [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(bucket_x, bucket_y, strict=True)]
        else:  # low precision: accumulate in float32
            products = [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc))
                        for x, y in zip(bucket_x, bucket_y, strict=True)]
        parts.append(torch.stack(products).sum().to(device))
    return _sum_parts(parts)


def _sum_over_shards(reduce: Callable[..., Tensor], *tensor_lists: Sequence[Tensor], **options: Any) -> Tensor:
    """``reduce`` (a sum over elements: :func:`squared_norm`, :func:`dot`) of lists holding ``DTensor`` s.

    Tensors are grouped by their first list's layout (device mesh and placements); each group is reduced over
    this rank's local shards, and the partial sums are added over the mesh dimensions the layout shards (a
    ``Partial`` DTensor made whole by DTensor's own collective); replicated dimensions hold equal copies and
    are not summed. Plain tensors are whole on every rank. One all-reduce per layout (FSDP2: one)."""
    groups: dict[Any, tuple[list[Tensor], ...]] = {}
    for items in zip(*tensor_lists, strict=True):
        lead = items[0]
        key = (lead.device_mesh, lead.placements) if isinstance(lead, DTensor) else None
        members = groups.setdefault(key, tuple([] for _ in tensor_lists))
        for dst, item in zip(members, items, strict=True):
            dst.append(item.to_local() if isinstance(item, DTensor) else item)
    parts = []
    for key, members in groups.items():
        part = reduce(*members, **options)
        if key is not None:
            mesh, placements = key
            if any(placement.is_partial() for placement in placements):
                raise ValueError(f"Invalid DTensor placements {placements} (expected Shard or Replicate: a Partial "
                                 "gradient has not been reduced yet)")
            part = DTensor.from_local(part, mesh, [Partial() if placement.is_shard() else Replicate()
                                                   for placement in placements], run_check=False).full_tensor()
        parts.append(part)
    return _sum_parts(parts)
