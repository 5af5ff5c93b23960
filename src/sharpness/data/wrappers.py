"""Dataset views (new labels, a per-item transform) and access to the labels and tensors underneath them.

The transforms of :mod:`sharpness.data.transforms` work on label tensors and index sets; these helpers
read the labels out of any dataset the loaders return (in-memory ``TensorDataset``s, torchvision sets,
and ``Subset``/``ConcatDataset``/:class:`Relabeled`/:class:`Transformed` views of them) without
iterating over the items.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

__all__ = ["Relabeled", "Transformed", "labels_of", "tensors_of"]


class Relabeled(Dataset):
    """``dataset`` with its labels replaced: item ``i`` is ``(dataset[i][0], targets[i])``.

    ``clean_targets`` keeps the labels it replaced, so ``flipped`` marks the corrupted examples (e.g. to
    measure how many noisy labels a model memorises).
    """

    def __init__(self, dataset: Dataset, targets: Tensor, clean_targets: Tensor | None = None) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.ndim != 1 or len(targets) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"Invalid targets shape: {tuple(targets.shape)} "
                             f"(expected ({len(dataset)},), one label per example)")  # type: ignore[arg-type]
        self.dataset = dataset
        self.targets = targets
        self.clean_targets = labels_of(dataset) if clean_targets is None else clean_targets

    @property
    def flipped(self) -> Tensor:
        """Boolean mask of the examples whose label differs from the clean one."""
        return self.targets != self.clean_targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        return self.dataset[index][0], self.targets[index]


class Transformed(Dataset):
    """``dataset`` with ``transform`` applied to each input: item ``i`` is ``(transform(x_i), y_i)``.

    One loaded dataset can serve two views this way, e.g. augmented training inputs and the same
    examples without augmentation for a validation split carved from them.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.dataset[index]
        return self.transform(x), y


def labels_of(dataset: Dataset) -> Tensor:
    """The labels of every example of ``dataset``, as a 1-D ``torch.long`` tensor, read without iterating.

    Understands ``TensorDataset`` (its last tensor), ``Subset``, ``ConcatDataset``, :class:`Relabeled`,
    :class:`Transformed` and datasets with a ``targets`` or ``labels`` attribute (torchvision's).
    """
    if isinstance(dataset, Relabeled):
        return dataset.targets
    if isinstance(dataset, Transformed):
        return labels_of(dataset.dataset)
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([labels_of(part) for part in dataset.datasets])
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1].long()
    for name in ("targets", "labels"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return torch.as_tensor(np.asarray(labels), dtype=torch.long)
    raise TypeError(f"Cannot read the labels of a {type(dataset).__name__} (expected a TensorDataset, a "
                    "dataset with a 'targets' or 'labels' attribute, or a Subset/ConcatDataset/Relabeled/"
                    "Transformed view of one)")


def tensors_of(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of an in-memory dataset as two tensors, for training with the data resident.

    Works for a ``TensorDataset`` of ``(inputs, labels)`` and ``Subset``/:class:`Relabeled` views of one
    (the indexing is applied, so the result is a copy where a view selects examples); raises ``TypeError``
    for file-backed sets, whose items must go through a ``DataLoader``.
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        x, y = tensors_of(dataset.dataset)
        index = torch.as_tensor(dataset.indices, dtype=torch.long)
        return x[index], y[index]
    if isinstance(dataset, Relabeled):
        return tensors_of(dataset.dataset)[0], dataset.targets
    raise TypeError(f"{type(dataset).__name__} is not an in-memory dataset (expected a TensorDataset of "
                    "(inputs, labels) or a Subset/Relabeled view of one); iterate it with a DataLoader")
