"""Seeded transforms of a training set, on label tensors and index sets: label noise, subsets, validation.

Each function is pure: it takes the labels (a 1-D integer tensor) and a ``torch.Generator`` and returns
new labels or sorted example indices, never touching a dataset. :func:`sharpness.data.load_dataset`
applies them in a fixed order (subset, then validation split, then label noise on what is left for
training) and records their settings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validation import check_int_at_least, check_probability, check_real

__all__ = ["first_fraction", "stratified_subset", "symmetric_label_noise", "validation_split"]


def _check_labels(labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels)
    dtype = labels.dtype
    if labels.ndim != 1 or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"Invalid labels: dtype {labels.dtype}, shape {tuple(labels.shape)} "
                        "(expected a 1-D integer tensor)")
    return labels.long()


def _check_fraction(name: str, value: object) -> float:
    value = check_real(name, value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"Invalid {name} value: {value} (expected 0 < {name} <= 1)")
    return value


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int, *,
                          generator: torch.Generator | None = None) -> Tensor:
    """Flip exactly ``round(rate * n)`` labels, each to a different class drawn uniformly from the others.

    The examples to corrupt are a uniform random ``round(rate * n)``-subset (Python's ``round``: halves go
    to the even count); a corrupted label ``y`` becomes ``(y + s) mod C`` with ``s`` uniform on
    ``{1, ..., C - 1}``, i.e. uniform over the ``C - 1`` wrong classes. This is the "-C" setting of the
    universal-SAM paper (20% of labels flipped to another class). Returns a new tensor; ``labels`` is
    unchanged.

    Args:
        labels: 1-D integer tensor with values in ``[0, num_classes)``.
        rate: fraction of labels to flip, ``0 <= rate <= 1``.
        num_classes: number of classes ``C >= 2``.
        generator: source of randomness (the same generator state gives the same flips).

    Example::

        noisy = symmetric_label_noise(y, 0.2, 10, generator=torch.Generator().manual_seed(0))
        assert (noisy != y).sum() == round(0.2 * len(y))
    """
    labels = _check_labels(labels)
    rate = check_probability("label_noise", rate)
    num_classes = check_int_at_least("num_classes", num_classes, 2)
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(f"Invalid labels: values in [{int(labels.min())}, {int(labels.max())}] "
                         f"(expected 0 <= label < num_classes = {num_classes})")
    count = round(rate * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def stratified_subset(labels: Tensor, fraction: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Sorted indices of a random ``fraction`` per class: ``max(1, round(fraction * n_c))`` of class ``c``.

    Keeps the class balance of the full set (a "-S" limited-data training set); every class present keeps
    at least one example.
    """
    labels = _check_labels(labels)
    fraction = _check_fraction("subset", fraction)
    kept = []
    for cls in torch.unique(labels):  # sorted, so the draws happen in a fixed order
        members = torch.nonzero(labels == cls).flatten()
        count = max(1, round(fraction * len(members)))
        kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.sort(torch.cat(kept)).values if kept else labels.new_empty(0)


def first_fraction(num_examples: int, fraction: float) -> Tensor:
    """Indices ``0 .. floor(fraction * n) - 1``: the first examples, as the universal-SAM code builds "-S" sets.

    ``fraction * n`` is rounded to 6 decimals before the floor, so a product that falls just short of an integer
    by floating-point error (``0.29 * 50000 = 14499.999999999998``) keeps that integer.

    Only meaningful when the stored order is random (CIFAR, SVHN); never use it on class-sorted data.
    """
    num_examples = check_int_at_least("num_examples", num_examples, 0)
    fraction = _check_fraction("subset", fraction)
    return torch.arange(math.floor(round(fraction * num_examples, 6)))


def validation_split(labels: Tensor, fraction: float, *,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Split example indices into ``(train, validation)``, stratified: ``round(fraction * n_c)`` of class
    ``c`` go to validation. Both index tensors are sorted; together they are a partition of ``range(n)``.
    """
    labels = _check_labels(labels)
    fraction = check_real("validation", fraction)
    if not (0.0 <= fraction < 1.0):
        raise ValueError(f"Invalid validation value: {fraction} (expected 0 <= validation < 1)")
    held_out = []
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        count = round(fraction * len(members))
        held_out.append(members[torch.randperm(len(members), generator=generator)[:count]])
    in_validation = torch.zeros(len(labels), dtype=torch.bool)
    if held_out:
        in_validation[torch.cat(held_out)] = True
    return torch.nonzero(~in_validation).flatten(), torch.nonzero(in_validation).flatten()
