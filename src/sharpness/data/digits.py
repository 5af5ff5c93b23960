"""scikit-learn's 8x8 handwritten digits (1797 images), split 1437 / 360 by a fixed permutation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .record import SourceSplits

__all__ = ["SPLIT_SEED", "TEST_SIZE"]

#: seed of the fixed train/test permutation (NumPy's legacy RandomState, whose stream never changes);
#: independent of the run seed, so every run and every version sees the same test set
SPLIT_SEED = 0
TEST_SIZE = 360


def load(*, root: Path, download: bool) -> SourceSplits:
    """Registry loader: ``(1, 8, 8)`` images with pixel values 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.as_tensor(np.random.RandomState(SPLIT_SEED).permutation(len(y)))  # frozen stream (NEP 19)
    train_idx, test_idx = order[:-TEST_SIZE], order[-TEST_SIZE:]
    train = TensorDataset(x[train_idx], y[train_idx])
    return SourceSplits(train=train, train_eval=train, test=TensorDataset(x[test_idx], y[test_idx]),
                        num_classes=10, input_shape=(1, 8, 8), classes=tuple(str(d) for d in range(10)),
                        settings={"split_seed": SPLIT_SEED, "pixel_scale": 16.0})
