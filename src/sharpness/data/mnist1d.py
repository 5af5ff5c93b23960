"""MNIST-1D (Greydanus, 2020), generated in memory: 4000 training and 1000 test signals of length 40."""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .record import SourceSplits

__all__ = ["load_mnist1d", "mnist1d_args"]


def mnist1d_args() -> dict[str, object]:
    """The generator settings of ``mnist1d.data.get_dataset_args()`` (the package's defaults, seed 42)."""
    from mnist1d.data import get_dataset_args

    return {key: value for key, value in vars(get_dataset_args()).items() if key != "url"}


@lru_cache(maxsize=1)
def load_mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate MNIST-1D in memory: ``(x_train, y_train, x_test, y_test)``, 4000 / 1000 signals of length 40.

    ``mnist1d.data.make_dataset`` only computes (the package's ``get_dataset`` is the one that downloads and
    pickles); it reseeds Python's and NumPy's global generators, which are restored afterwards. The result
    is cached for the process (a few seconds to generate); treat the tensors as read-only.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)

    return (*as_tensors(data["x"], data["y"]), *as_tensors(data["x_test"], data["y_test"]))


def load(*, root: Path, download: bool) -> SourceSplits:
    """Registry loader: MNIST-1D as in-memory ``TensorDataset``s (``root`` and ``download`` are unused)."""
    x_train, y_train, x_test, y_test = load_mnist1d()
    train = TensorDataset(x_train, y_train)
    settings = {f"mnist1d_{key}": value for key, value in mnist1d_args().items()}
    return SourceSplits(train=train, train_eval=train, test=TensorDataset(x_test, y_test), num_classes=10,
                        input_shape=(x_train.shape[1],), classes=tuple(str(digit) for digit in range(10)),
                        settings=settings)
