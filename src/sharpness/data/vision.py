"""Image classification sets read through torchvision: CIFAR-10/100, SVHN, MNIST, Fashion-MNIST.

torchvision is optional (``pip install "sharpness[vision]"``); SVHN also needs scipy. Files are expected
where torchvision puts them under ``root`` and are fetched only with ``download=True``. Training inputs
get the papers' standard augmentation (CIFAR: random 32x32 crop with 4 pixels of zero padding and a
horizontal flip; SVHN: the crop only, since flipped digits change meaning; MNIST sets: none) and every
split is normalised with the data set's per-channel mean and standard deviation. The pixels are read once
into :class:`~sharpness.data.images.ImageTensors` (uint8), which augments and normalises a batch at a time on
the training device (the harness) or an item at a time (a ``DataLoader``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from .images import ImageTensors
from .paths import missing_data_error
from .record import SourceSplits

__all__ = ["VISION_SETS", "VisionSet", "import_torchvision"]


@dataclass(frozen=True)
class VisionSet:
    """How to read one torchvision data set and what to do to its images."""

    title: str
    class_name: str  # the torchvision.datasets class
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: bool  # random 32x32 crop, 4 pixels of padding
    flip: bool  # random horizontal flip
    location: str  # where torchvision expects the files, relative to root (for the error message)
    split_argument: str  # "train" (train=True/False) or "split" (split="train"/"test")


VISION_SETS = {
    "cifar10": VisionSet("CIFAR-10", "CIFAR10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                         (0.2470, 0.2435, 0.2616), True, True, "cifar-10-batches-py/", "train"),
    "cifar100": VisionSet("CIFAR-100", "CIFAR100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                          (0.2673, 0.2564, 0.2762), True, True, "cifar-100-python/", "train"),
    "svhn": VisionSet("SVHN", "SVHN", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                      True, False, "train_32x32.mat and test_32x32.mat", "split"),
    "mnist": VisionSet("MNIST", "MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,), False, False, "MNIST/raw/",
                       "train"),
    "fashion_mnist": VisionSet("Fashion-MNIST", "FashionMNIST", 10, (1, 28, 28), (0.2860,), (0.3530,), False,
                               False, "FashionMNIST/raw/", "train"),
}


def import_torchvision(purpose: str) -> ModuleType:
    """``torchvision``, or an ``ImportError`` that says what needs it and how to install it."""
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(f"{purpose} needs torchvision, which is not installed: pip install "
                          "\"sharpness[vision]\" (or the torchvision build matching your torch)") from err
    return torchvision


def _open(spec: VisionSet, torchvision: ModuleType, root: Path, split: str, download: bool) -> Dataset:
    """One split as torchvision's dataset (PIL images, no transform); missing files: FileNotFoundError."""
    cls = getattr(torchvision.datasets, spec.class_name)
    if spec.split_argument == "split":
        kwargs: dict[str, Any] = {"split": split}
    else:
        kwargs = {"train": split == "train"}
    try:
        return cls(str(root), download=download, **kwargs)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True"
        if "not found" not in str(err):
            raise
        raise missing_data_error(spec.title, root / spec.location,
                                 detail=f"{split} split missing or failing its checksum") from err


def _pixels(raw: Dataset) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of a torchvision set as a ``(N, C, H, W)`` uint8 tensor and a long tensor, read from the
    arrays torchvision keeps (no PIL round trip): CIFAR's ``data`` is ``(N, H, W, C)``, SVHN's ``(N, C, H, W)``,
    the MNIST sets' ``(N, H, W)``."""
    if isinstance(raw, ConcatDataset):
        parts = [_pixels(part) for part in raw.datasets]
        return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])
    data = torch.as_tensor(np.asarray(raw.data))
    if data.ndim == 3:  # MNIST, Fashion-MNIST: grey
        data = data[:, None]
    elif data.shape[-1] in (1, 3):  # CIFAR: channels last
        data = data.permute(0, 3, 1, 2)
    labels = getattr(raw, "targets", None)
    if labels is None:
        labels = raw.labels  # SVHN (the digit 0 already mapped from 10 by torchvision)
    return data.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long)


def load_vision(name: str, *, root: Path, download: bool, augment: bool = True,
                include_extra: bool = False) -> SourceSplits:
    """Load ``VISION_SETS[name]``; ``include_extra`` (SVHN only) adds the 531k-image "extra" split."""
    spec = VISION_SETS[name]
    if not isinstance(augment, bool):
        raise TypeError(f"Invalid augment type: {type(augment).__name__} (expected bool)")
    if not isinstance(include_extra, bool):  # a string "False" from --data-opt would add 531k images
        raise TypeError(f"Invalid include_extra type: {type(include_extra).__name__} (expected bool)")
    if include_extra and name != "svhn":
        raise ValueError(f"Invalid include_extra value: True for {name!r} (only 'svhn' has an extra split)")
    torchvision = import_torchvision(f"The {name!r} data set")
    train_raw = _open(spec, torchvision, root, "train", download)
    if include_extra:
        train_raw = ConcatDataset([train_raw, _open(spec, torchvision, root, "extra", download)])
    test_raw = _open(spec, torchvision, root, "test", download)
    classes = getattr(test_raw, "classes", None) or [str(digit) for digit in range(spec.num_classes)]
    padding = 4 if augment and spec.crop else 0
    train = ImageTensors(*_pixels(train_raw), mean=spec.mean, std=spec.std, padding=padding,
                         flip=augment and spec.flip)
    test = ImageTensors(*_pixels(test_raw), mean=spec.mean, std=spec.std)
    settings = {
        "root": str(root.resolve()),
        "torchvision_version": torchvision.__version__,
        "augment": augment,
        "random_crop_padding": padding,
        "random_horizontal_flip": augment and spec.flip,
        "normalization_mean": spec.mean,
        "normalization_std": spec.std,
    }
    if name == "svhn":
        settings["include_extra"] = include_extra
    return SourceSplits(train=train, train_eval=train.without_augmentation(), test=test,
                        num_classes=spec.num_classes,
                        input_shape=spec.input_shape, classes=tuple(str(c) for c in classes),
                        settings=settings)


def _loader(name: str):
    """The registry loader of one set (options: ``augment``; SVHN also ``include_extra``)."""
    if name == "svhn":
        def load(*, root: Path, download: bool, augment: bool = True,
                 include_extra: bool = False) -> SourceSplits:
            return load_vision(name, root=root, download=download, augment=augment,
                               include_extra=include_extra)
    else:
        def load(*, root: Path, download: bool, augment: bool = True) -> SourceSplits:  # type: ignore[misc]
            return load_vision(name, root=root, download=download, augment=augment)
    load.__doc__ = f"Registry loader of {VISION_SETS[name].title} (torchvision)."
    return load


LOADERS = {name: _loader(name) for name in VISION_SETS}
