"""Data sets held as tensors on the training device and served a batch at a time, without a ``DataLoader``.

A *resident* set has ``batch(index, draws)`` (``(x, y)`` for a tensor of example indices on its device),
``draw(count, generator)`` (its augmentation's random draws for ``count`` examples, or ``None``) and
``to(device)``: :class:`ResidentTensors` (in-memory inputs and labels), :class:`~sharpness.data.images.ImageTensors`
(uint8 images, batched crop and flip) and :class:`~sharpness.data.tinyshakespeare.CharWindows` (token windows).
:func:`as_resident` turns the sets :func:`~sharpness.data.load_dataset` returns, through their ``Subset`` and
:class:`~sharpness.data.Relabeled` views, into one; :func:`resident_batches` walks one in a seeded order.

An epoch then costs one ``randperm`` and one draw on the host, one copy of each to the device, and per batch a
few index kernels on the device (no per-example Python, no collate, no host-to-device copy of the inputs).
The order is ``torch.randperm(n, generator=order)`` (drawn on the CPU: the same batches on every device), the
order the harness has always used for an in-memory ``TensorDataset``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from .._validation import check_int_at_least
from .wrappers import Relabeled

__all__ = ["ResidentSet", "ResidentTensors", "as_resident", "check_shard", "is_resident", "resident_batches",
           "shard_bounds"]


class ResidentSet(Dataset):
    """Base of the sets that serve batches by index where their tensors are.

    A subclass names the tensor that says where it lives (``_anchor``), how to rebuild itself on another device
    (``_moved``) and how to cut a batch (``batch``); sets with augmentation also override ``draw``.
    """

    def _anchor(self) -> Tensor:
        raise NotImplementedError

    def _moved(self, device: torch.device) -> Any:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self._anchor().device

    def to(self, device: str | torch.device | None) -> Any:
        """This set on ``device`` (``self`` if it is there already; ``None``: where it is)."""
        if device is None or torch.device(device) == self.device:
            return self
        return self._moved(torch.device(device))

    def draw(self, count: int, generator: torch.Generator | None = None) -> Any:
        """The augmentation's random draws for ``count`` examples; ``None``: this set is not augmented."""
        return None

    def batch(self, index: Tensor, draws: Any = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class ResidentTensors(ResidentSet):
    """In-memory ``(inputs, targets)`` served by index on their device; item ``i`` is ``(inputs[i], targets[i])``."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if not isinstance(inputs, Tensor) or inputs.ndim < 1:
            raise TypeError(f"Invalid inputs: {type(inputs).__name__} (expected a tensor with one row per example)")
        targets = torch.as_tensor(targets)
        if targets.ndim < 1 or len(targets) != len(inputs):
            raise ValueError(f"Invalid targets shape: {tuple(targets.shape)} (expected {len(inputs)} rows, one per "
                             "input)")
        self.inputs = inputs
        self.targets = targets.to(inputs.device)

    def _anchor(self) -> Tensor:
        return self.inputs

    def _moved(self, device: torch.device) -> ResidentTensors:
        return ResidentTensors(self.inputs.to(device), self.targets.to(device))

    def select(self, indices: Sequence[int] | Tensor) -> ResidentTensors:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        return ResidentTensors(self.inputs[index], self.targets[index])

    def relabel(self, targets: Tensor) -> ResidentTensors:
        return ResidentTensors(self.inputs, targets)

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, index: Tensor, draws: Any = None) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


def is_resident(dataset: object) -> bool:
    """Whether ``dataset`` serves batches by index (``batch``, ``draw`` and ``to``)."""
    return all(callable(getattr(dataset, name, None)) for name in ("batch", "draw", "to"))


def _resolve(dataset: Dataset) -> Any:
    """``dataset`` as a resident set where it is (views applied: a copy of the selected examples), or ``None``."""
    if is_resident(dataset):
        return dataset
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return ResidentTensors(*dataset.tensors)
    if isinstance(dataset, Subset):
        inner = _resolve(dataset.dataset)
        return inner.select(dataset.indices) if hasattr(inner, "select") else None
    if isinstance(dataset, Relabeled):
        inner = _resolve(dataset.dataset)
        return inner.relabel(dataset.targets) if hasattr(inner, "relabel") else None
    return None


def as_resident(dataset: Dataset, device: str | torch.device | None = None) -> Any:
    """``dataset`` as a resident set on ``device`` (``None``: where its tensors are), or ``None`` when it is not
    held in tensors (a file-backed set, a custom per-item transform: those go through a ``DataLoader``).

    Understands ``TensorDataset`` of ``(inputs, labels)``, :class:`~sharpness.data.images.ImageTensors`,
    :class:`~sharpness.data.tinyshakespeare.CharWindows`, and ``Subset`` / :class:`Relabeled` views of those.
    """
    resident = _resolve(dataset)
    return None if resident is None else resident.to(device)


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous part of ``size`` examples split ``world`` ways, as
    ``torch.tensor_split`` splits them (the first ``size % world`` ranks take one example more)."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def check_shard(shard: tuple[int, int] | None, batch_size: int | None = None) -> tuple[int, int]:
    """``shard`` as ``(rank, world)``; ``None`` is ``(0, 1)`` (the whole batch). With ``batch_size``, a global
    batch smaller than the world is refused: every batch would be skipped, an epoch without a step."""
    if shard is None:
        return 0, 1
    try:
        rank, world = shard
    except (TypeError, ValueError):
        raise TypeError(f"Invalid shard: {shard!r} (expected (rank, world_size))") from None
    world = check_int_at_least("world_size", world, 1)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world:
        raise ValueError(f"Invalid rank value: {rank!r} (expected an integer in [0, {world - 1}] for world_size "
                         f"{world})")
    if batch_size is not None and batch_size < world:
        raise ValueError(f"Invalid batch_size value: {batch_size} (expected batch_size >= world_size = {world}: "
                         "the global batch is split across the ranks, one example at least for each)")
    return rank, world


def resident_batches(dataset: Any, batch_size: int, *, order: torch.Generator | None = None,
                     augment: torch.Generator | None = None,
                     shard: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches of one epoch of a resident set, on its device.

    Args:
        order: shuffle with ``torch.randperm(len(dataset), generator=order)``; ``None``: in stored order.
        augment: draw the epoch's augmentation from this generator (after the permutation, so with
            ``augment=order`` one generator's state holds the whole epoch); ``None``: no augmentation.
        shard: ``(rank, world_size)`` for data-parallel training: ``batch_size`` is the global batch, and this
            rank gets its contiguous part of each one (split as ``tensor_split`` splits it), cut and augmented
            alone. Every rank must pass the same ``order`` and ``augment`` seeds: the ranks' parts then
            concatenate to the single-process batch, pixel for pixel. A last global batch with fewer than
            ``world_size`` examples is skipped on every rank (no rank is left without an example).
    """
    batch_size = check_int_at_least("batch_size", batch_size, 1)
    rank, world = check_shard(shard, batch_size)
    if not is_resident(dataset):
        raise TypeError(f"Invalid dataset: {type(dataset).__name__} does not serve batches by index (expected a "
                        "resident set; convert it with as_resident(dataset, device))")
    n = len(dataset)
    device = dataset.device
    index = torch.randperm(n, generator=order) if order is not None else torch.arange(n)
    draws = dataset.draw(n, augment) if augment is not None else None
    index = index.to(device, non_blocking=True)
    if draws is not None:
        draws = tuple(None if t is None else t.to(device, non_blocking=True) for t in draws)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        if size < world:
            continue
        low, high = shard_bounds(size, rank, world)
        part = slice(start + low, start + high)
        yield dataset.batch(index[part], None if draws is None else
                            tuple(None if t is None else t[part] for t in draws))
