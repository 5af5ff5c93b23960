"""Data held as tensors on the training device (#9): batched crop/flip against torchvision's per-image transforms,
the order and the draws of an epoch, every dataset view, and what the harness gains (no DataLoader, no host read
of the loss per step)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from sharpness._ops import OpCounter
from sharpness.data import CharWindows, Relabeled, Transformed, load_dataset
from sharpness.data.images import ImageTensors, crop_flip
from sharpness.data.resident import ResidentTensors, as_resident, is_resident, resident_batches
from sharpness.harness import TrainConfig, train
from sharpness.harness.train import _Run, batches
from test_data import write_cifar

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)


def _torchvision_pipeline(image_chw: torch.Tensor, padding: int, offset, flip: bool, mean, std) -> torch.Tensor:
    """The papers' pipeline on one PIL image, with the crop window and the flip given instead of drawn:
    ``RandomCrop(H, padding)`` is ``pad`` then ``crop``, ``RandomHorizontalFlip`` is ``hflip``."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    array = image_chw.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, mode="L" if array.shape[-1] == 1 else None)
    size = image_chw.shape[-1]
    if padding:
        image = TF.crop(TF.pad(image, padding), int(offset[0]), int(offset[1]), size, size)
    if flip:
        image = TF.hflip(image)
    return TF.normalize(TF.to_tensor(image), mean, std)


@pytest.mark.parametrize("channels, padding, flip", [(3, 4, True), (3, 4, False), (3, 0, True), (1, 0, False),
                                                     (1, 2, True)])
def test_batched_crop_flip_and_normalise_equal_torchvision_per_image(channels, padding, flip):
    images = _images(12, channels)
    mean, std = CIFAR_MEAN[:channels], CIFAR_STD[:channels]
    data = ImageTensors(images, torch.arange(12), mean=mean, std=std, padding=padding, flip=flip)
    index = torch.tensor([3, 0, 11, 5, 5, 7, 1, 9])
    draws = data.draw(len(index), torch.Generator().manual_seed(1))
    if padding == 0 and not flip:
        assert draws is None
    offsets, flips = draws if draws is not None else (None, None)
    x, y = data.batch(index, draws)
    assert x.dtype == torch.float32 and x.shape == (8, channels, 32, 32) and torch.equal(y, index)
    for b, k in enumerate(index.tolist()):
        expected = _torchvision_pipeline(images[k], padding, None if offsets is None else offsets[b],
                                         flips is not None and bool(flips[b]), mean, std)
        assert torch.equal(x[b], expected)  # the same float32 operations: bit for bit


def test_crop_flip_by_hand_on_a_small_image():
    image = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)  # rows 1 2 3 / 4 5 6 / 7 8 9
    shifted = crop_flip(image, 1, offsets=torch.tensor([[0, 2]]))  # window one row up, one column right
    assert shifted[0, 0].tolist() == [[0, 0, 0], [2, 3, 0], [5, 6, 0]]
    mirrored = crop_flip(image, 1, offsets=torch.tensor([[1, 1]]), flips=torch.tensor([True]))
    assert mirrored[0, 0].tolist() == [[3, 2, 1], [6, 5, 4], [9, 8, 7]]
    assert torch.equal(crop_flip(image, 0), image) and crop_flip(image, 0) is not image
    with pytest.raises(ValueError, match=r"Invalid images shape: \(3, 3\)"):
        crop_flip(image[0, 0], 1)


def test_draws_are_uniform_seeded_and_only_what_the_set_uses():
    data = ImageTensors(_images(2), torch.zeros(2), mean=CIFAR_MEAN, std=CIFAR_STD, padding=4, flip=True)
    n = 45_000
    offsets, flips = data.draw(n, torch.Generator().manual_seed(0))
    for column in (0, 1):  # each offset uniform on {0, ..., 8}: counts within 5 binomial standard deviations
        counts = torch.bincount(offsets[:, column], minlength=9)
        assert len(counts) == 9 and (counts - n / 9).abs().max() < 5 * math.sqrt(n / 9 * (8 / 9))
    assert abs(int(flips.sum()) - n / 2) < 5 * math.sqrt(n / 4)
    again = data.draw(n, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], offsets) and torch.equal(again[1], flips)
    crop_only = ImageTensors(_images(2), torch.zeros(2), mean=CIFAR_MEAN, std=CIFAR_STD, padding=4)
    generator = torch.Generator().manual_seed(0)
    assert crop_only.draw(5, generator)[1] is None
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # offsets drawn
    plain = crop_only.without_augmentation()
    generator = torch.Generator().manual_seed(0)
    assert plain.draw(5, generator) is None and plain.images is crop_only.images
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn


def test_items_draw_from_the_global_generator_like_torchvision():
    data = ImageTensors(_images(3), torch.tensor([4, 5, 6]), mean=CIFAR_MEAN, std=CIFAR_STD, padding=4, flip=True)
    torch.manual_seed(0)
    first = data[1]
    torch.manual_seed(0)
    assert torch.equal(data[1][0], first[0]) and int(first[1]) == 5
    assert any(not torch.equal(data[1][0], first[0]) for _ in range(8))
    x, y = next(iter(DataLoader(data, batch_size=3)))  # usable in a DataLoader
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [4, 5, 6]
    with pytest.raises(IndexError):
        data[3]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"images": torch.zeros(2, 3, 4, 4)}, TypeError, "expected a (N, C, H, W) uint8 tensor"),
    ({"targets": torch.zeros(3)}, ValueError, "Invalid targets shape: (3,) (expected (2,)"),
    ({"mean": (0.5,)}, ValueError, "Invalid mean: 1 values for 3 channels"),
    ({"std": (0.5, 0.0, 0.5)}, ValueError, "expected every std > 0"),
    ({"padding": -1}, ValueError, "Invalid padding value: -1"),
    ({"flip": 1}, TypeError, "Invalid flip type: int"),
])
def test_image_tensors_reject_bad_input(kwargs, error, message):
    arguments = {"images": _images(2), "targets": torch.zeros(2), "mean": CIFAR_MEAN, "std": CIFAR_STD, **kwargs}
    with pytest.raises(error) as raised:
        ImageTensors(arguments.pop("images"), arguments.pop("targets"), **arguments)
    assert message in str(raised.value)


def test_in_memory_views_are_served_in_the_seeded_order_with_their_items():
    """An in-memory set and its views (subset, relabelled): batch ``j`` is items ``perm[4j:4j+4]`` of the view,
    ``perm = torch.randperm(n, generator)`` (the order the harness always used for in-memory tensors)."""
    x, y = torch.randn(23, 5), torch.arange(23) % 4
    base = TensorDataset(x, y)
    views = [base, Subset(base, [2, 5, 7, 11, 13, 17, 19, 3, 1, 0]),
             Relabeled(Subset(base, list(range(1, 20))), (torch.arange(19) + 1) % 4)]
    for view in views:
        resident = as_resident(view)
        assert isinstance(resident, ResidentTensors) and len(resident) == len(view)
        ours = list(resident_batches(resident, 4, order=torch.Generator().manual_seed(3)))
        perm = torch.randperm(len(view), generator=torch.Generator().manual_seed(3)).tolist()
        assert len(ours) == math.ceil(len(view) / 4)
        for j, (a, b) in enumerate(ours):
            items = [view[i] for i in perm[4 * j:4 * j + 4]]
            assert torch.equal(a, torch.stack([item[0] for item in items]))
            assert torch.equal(b, torch.stack([torch.as_tensor(item[1]) for item in items]))
        in_order = list(batches(view, 6, None))
        assert torch.equal(torch.cat([b for _, b in in_order]), torch.stack([view[i][1] for i in range(len(view))]))


def test_sets_not_held_in_tensors_go_through_a_dataloader():
    base = TensorDataset(torch.randn(6, 2), torch.arange(6))
    transformed = Transformed(base, lambda x: x * 2)
    assert as_resident(transformed) is None and not is_resident(transformed)
    (x, y), = list(batches(transformed, 6, None))
    assert torch.equal(x, base.tensors[0] * 2) and torch.equal(y, torch.arange(6))


@pytest.mark.parametrize("n, batch_size, world", [(23, 8, 2), (23, 8, 3), (10, 4, 4), (9, 9, 2)])
def test_data_parallel_shards_concatenate_to_the_single_process_batches(n, batch_size, world):
    """Each rank cuts and augments only its part of a global batch; the parts are ``tensor_split``'s and, with the
    same seeds on every rank, concatenate to the single-process batch pixel for pixel (crops and flips included).
    A last global batch smaller than ``world`` is skipped on every rank."""
    data = ImageTensors(_images(n, size=8), torch.arange(n), mean=CIFAR_MEAN, std=CIFAR_STD, padding=2, flip=True)

    def epoch(shard):
        return list(resident_batches(data, batch_size, order=torch.Generator().manual_seed(3),
                                     augment=torch.Generator().manual_seed(4), shard=shard))

    whole = [b for b in epoch(None) if len(b[1]) >= world]
    parts = [epoch((rank, world)) for rank in range(world)]
    assert all(len(p) == len(whole) for p in parts)
    for index, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[index][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[index][1] for p in parts]), y)
        assert [len(p[index][1]) for p in parts] == [len(t) for t in y.tensor_split(world)]
    # the DataLoader path of the harness splits the same way
    loose = Transformed(TensorDataset(torch.randn(n, 2), torch.arange(n)), lambda x: x)
    single = [y for _, y in batches(loose, batch_size, None) if len(y) >= world]
    for rank in range(world):
        assert [y.tolist() for _, y in batches(loose, batch_size, None, shard=(rank, world))] == [
            y.tensor_split(world)[rank].tolist() for y in single]


@pytest.mark.parametrize("shard, error, message", [
    ((2, 2), ValueError, r"Invalid rank value: 2 \(expected an integer in \[0, 1\] for world_size 2\)"),
    ((-1, 2), ValueError, "Invalid rank value: -1"),
    ((0, 0), ValueError, r"Invalid world_size value: 0"),
    ((0.5, 2), ValueError, "Invalid rank value: 0.5"),
    (3, TypeError, r"Invalid shard: 3 \(expected \(rank, world_size\)\)"),
    # a global batch below the world: every batch would be skipped, an epoch without a step
    ((0, 3), ValueError, r"Invalid batch_size value: 2 \(expected batch_size >= world_size = 3"),
])
def test_bad_shards_say_what_is_wrong(shard, error, message):
    data = ResidentTensors(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(error, match=message):
        next(resident_batches(data, 2, shard=shard))
    from sharpness.harness.train import batches  # the per-item (DataLoader) path checks the same
    with pytest.raises(error, match=message):
        next(batches(torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4)), 2, None, shard=shard))


def test_bad_batches_and_draws_say_what_is_wrong():
    data = ImageTensors(_images(4), torch.zeros(4), mean=CIFAR_MEAN, std=CIFAR_STD, padding=4, flip=True)
    with pytest.raises(ValueError, match=r"Invalid batch_size value: 0 \(expected an integer batch_size >= 1\)"):
        next(resident_batches(data, 0))
    with pytest.raises(TypeError, match="does not serve batches by index.*as_resident"):
        next(resident_batches(TensorDataset(torch.zeros(3, 2), torch.zeros(3)), 2))
    with pytest.raises(ValueError, match="Invalid draws: 3 offsets for 2 images"):
        data.batch(torch.tensor([0, 1]), data.draw(3, torch.Generator()))


def test_char_windows_batch_like_their_items():
    windows = CharWindows(torch.arange(40) % 7, 5)
    index = torch.tensor([0, 9, 34, 17])
    x, y = windows.batch(index)
    assert torch.equal(x, torch.stack([windows[i][0] for i in index.tolist()]))
    assert torch.equal(y, torch.stack([windows[i][1] for i in index.tolist()]))
    assert as_resident(windows) is windows and windows.draw(4, torch.Generator()) is None


def test_image_views_select_and_relabel_without_changing_pixels(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch)
    data = load_dataset("cifar10", root=tmp_path, validation=0.5, label_noise=0.5, seed=1)
    train_set, validation = as_resident(data.train), as_resident(data.validation)
    assert isinstance(train_set, ImageTensors) and train_set.augmented and not validation.augmented
    assert torch.equal(train_set.targets, torch.stack([data.train[i][1] for i in range(len(data.train))]))
    x, _ = validation.batch(torch.arange(len(validation)))
    assert torch.equal(x, torch.stack([data.validation[i][0] for i in range(len(data.validation))]))
    torch.manual_seed(0)
    items = [data.train[i][0] for i in range(3)]
    torch.manual_seed(0)
    resident_items = [train_set[i][0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(items, resident_items))


# ---------------------------------------------------------------------------------------------- the harness
def _cifar_config(**overrides) -> TrainConfig:
    base = dict(dataset="cifar10", model="mlp", model_options={"depth": 2, "width": 16},
                optimizer="sam", lr=0.05, batch_size=8, epochs=3, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def test_an_augmented_vision_run_is_seeded_and_resumes_bit_identically(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch, per_batch=6)
    data = load_dataset("cifar10", root=tmp_path)
    config = _cifar_config()
    full = train(config, data=data, log=None)
    again = train(config, data=data, log=None)
    strip = lambda records: [{k: v for k, v in r.items() if k != "wall_time"} for r in records]  # noqa: E731
    assert strip(again.epochs) == strip(full.epochs)
    path = tmp_path / "run.pt"
    train(config, data=data, checkpoint=path, log=None, stop_after_epochs=1)
    torch.manual_seed(123)  # the augmentation does not draw from the global generator
    resumed = train(config, data=data, checkpoint=path, log=None)
    assert strip(resumed.epochs) == strip(full.epochs)
    other = train(_cifar_config(seed=1), data=data, log=None)
    assert other.epochs[-1]["train_loss"] != full.epochs[-1]["train_loss"]


def test_a_training_step_reads_nothing_beyond_the_optimizer(monkeypatch):
    """The harness keeps the loss on the device (one read per epoch): a host read per step would stall a GPU's
    queue. Counted at the dispatcher: the reads of a step are the optimizer's own."""
    data = load_dataset("digits", seed=0)
    config = TrainConfig(dataset="digits", model="mlp", model_options={"depth": 2}, optimizer="sam", lr=0.1,
                         batch_size=64, epochs=1, seed=0)
    torch.manual_seed(0)
    from sharpness.models import create_model

    model = create_model("mlp", num_classes=10, input_shape=data.input_shape, depth=2)
    run = _Run(config, data, model, torch.device("cpu"))
    counter = OpCounter()
    inside = []
    step = run.optimizer.step

    def counted_step(closure):
        before = counter.reads
        try:
            return step(closure)
        finally:
            inside.append(counter.reads - before)

    monkeypatch.setattr(run.optimizer, "step", counted_step)
    x, y = next(batches(run.train_set, 64, None))
    with counter:
        for _ in range(3):
            loss = run.step(x, y)
    assert len(inside) == 3 and sum(inside) > 0  # the optimizer reads (its non-finite check, the CPU's norm)
    assert counter.reads == sum(inside)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_measures_and_the_swa_pass_see_unaugmented_or_seeded_inputs(tmp_path, monkeypatch):
    from sharpness.harness.measure import load_for_measurement

    write_cifar(tmp_path, monkeypatch)
    data = load_dataset("cifar10", root=tmp_path)
    path = tmp_path / "run.pt"
    train(_cifar_config(epochs=1), data=data, checkpoint=path, log=None)
    monkeypatch.setattr("sharpness.data.load_dataset", lambda *args, **kwargs: data)
    *_, measured = load_for_measurement(path, examples=10, batch_size=4)
    x = torch.cat([xb for xb, _ in measured])
    expected, _ = as_resident(data.train).without_augmentation().batch(torch.arange(10))
    assert [len(yb) for _, yb in measured] == [4, 4, 2] and torch.equal(x, expected)
    first = train(_cifar_config(epochs=2, swa_start=0.5, swa_lr=0.01, model="lenet5",
                                       model_options={"batch_norm": True}),
                  data=data, log=None)
    second = train(_cifar_config(epochs=2, swa_start=0.5, swa_lr=0.01, model="lenet5",
                                       model_options={"batch_norm": True}),
                   data=data, log=None)
    assert first.summary["swa_snapshots"] >= 1
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)  # BatchNorm statistics recomputed from seeded augmented batches
    assert np.isfinite(first.summary["test_loss"])
