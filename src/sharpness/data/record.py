"""The records a data set is delivered in: what a loader produces and what ``load_dataset`` returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch.utils.data import Dataset

__all__ = ["DatasetSplits", "SourceSplits", "freeze_settings"]

#: the two kinds of task a data set can pose
TASKS = ("classification", "next_token")


def freeze_settings(settings: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy of ``settings`` with lists turned into tuples; ``json.dumps(dict(...))`` works on it.

    Values must be plain: ``None``, ``bool``, ``int``, ``float``, ``str`` or sequences of those.
    """
    frozen = {}
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = tuple(value)
            members = value
        else:
            members = (value,)
        for member in members:
            if member is not None and not isinstance(member, (bool, int, float, str)):
                raise TypeError(f"Invalid setting {key!r}: {type(member).__name__} "
                                "(expected None, bool, int, float, str or a sequence of those)")
        frozen[key] = value
    return MappingProxyType(frozen)


@dataclass(frozen=True)
class SourceSplits:
    """What a registered loader returns, before the seeded transforms of ``load_dataset``.

    ``train_eval`` holds the same examples as ``train`` in the same order but without training-time
    augmentation (the same object for in-memory sets); validation splits are carved from it. Loaders of
    ``next_token`` sets split validation themselves and fill ``validation``.
    """

    train: Dataset
    train_eval: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    validation: Dataset | None = None


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded data set: its splits, its shape and every setting that produced it.

    Attributes:
        name: the registered name (``"cifar10"``...).
        train: training examples, after subset, validation split and label noise; items ``(x, y)``.
        test: the official test split (never transformed).
        validation: examples carved from the training data (clean labels, no augmentation), or ``None``.
        num_classes: number of classes (the vocabulary size for ``next_token`` sets).
        input_shape: shape of one input ``x`` (without the batch dimension).
        classes: a name per class (for text: the character of each token id).
        task: ``"classification"`` (``y`` is a class index) or ``"next_token"`` (``y`` is ``x`` shifted
            by one).
        settings: everything needed to rebuild the same splits (seed, rates, sizes, file checksums...),
            read-only; ``json.dumps(dict(splits.settings))`` stores it.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    task: str
    settings: Mapping[str, Any]
    validation: Dataset | None = None

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(data)}" for split, data in  # type: ignore[arg-type]
                          (("train", self.train), ("validation", self.validation), ("test", self.test))
                          if data is not None)
        return (f"DatasetSplits(name={self.name!r}, {sizes}, num_classes={self.num_classes}, "
                f"input_shape={self.input_shape}, task={self.task!r})")
