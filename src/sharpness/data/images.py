"""Images held as one uint8 tensor and augmented a batch at a time, on whatever device holds them.

The papers' image pipeline (random 32x32 crop of the image padded with 4 zero pixels, random horizontal flip,
then ``ToTensor`` and per-channel ``Normalize``) is usually run one PIL image at a time in a ``DataLoader``:
about 400 us of host time per CIFAR image on one core, 20 s per epoch, longer than a GPU needs for the
epoch's ResNet-18 passes. Here the whole set stays a ``(N, C, H, W)`` uint8 tensor (on the GPU when the
model is there, as airbench keeps it), and a batch is cut out with two ``gather`` kernels:

    x_b[c, i, j] = pad(images[k_b], p)[c, r_b + i, s_b + (W - 1 - j if f_b else j)]
    x_b <- (x_b / 255 - mean_c) / std_c

for example ``k_b`` with crop offsets ``(r_b, s_b)`` uniform on ``{0, ..., 2p}`` and flip ``f_b`` with
probability 1/2: the distribution of torchvision's ``RandomCrop(H, padding=p)`` then ``RandomHorizontalFlip()``,
and the same float32 operations as ``ToTensor()`` then ``Normalize(mean, std)`` (so equal offsets and flips give
bit-identical inputs; a test checks this against torchvision).

The random draws of an epoch come from a CPU ``torch.Generator`` (:meth:`ImageTensors.draw`), so a seeded run
sees the same crops and flips on every device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .._validation import check_int_at_least
from .resident import ResidentSet

__all__ = ["Draws", "ImageTensors", "crop_flip"]

#: one epoch's (or one batch's) augmentation draws: crop offsets ``(n, 2)`` (row, column) and flips ``(n,)``,
#: each ``None`` when the set does not crop / flip
Draws = tuple[Tensor | None, Tensor | None]


def crop_flip(images: Tensor, padding: int, offsets: Tensor | None = None, flips: Tensor | None = None) -> Tensor:
    """Crop every image of a batch out of its zero-padded copy, and mirror the flagged ones left to right.

    Args:
        images: ``(B, C, H, W)``, any dtype (the harness passes uint8).
        padding: zero pixels added on each side before cropping, ``p >= 0``.
        offsets: ``(B, 2)`` integer row and column of each ``H x W`` window in the padded ``(H + 2p) x (W + 2p)``
            image, each in ``[0, 2p]`` (``p``: the centre, no shift); ``None``: no crop.
        flips: ``(B,)`` bool, mirror image ``b`` after cropping; ``None``: no flip.

    Returns:
        A new ``(B, C, H, W)`` tensor of the dtype of ``images``.
    """
    if images.ndim != 4:
        raise ValueError(f"Invalid images shape: {tuple(images.shape)} (expected (B, C, H, W))")
    batch, channels, height, width = images.shape
    device = images.device
    columns = torch.arange(width, device=device)
    if offsets is not None and padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = offsets[:, 0, None] + torch.arange(height, device=device)  # (B, H)
        padded = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, width + 2 * padding))
        columns = offsets[:, 1, None] + columns  # (B, W)
    else:
        padded = images
        columns = columns.expand(batch, width)
    if flips is not None:
        columns = torch.where(flips[:, None], columns.flip(1), columns)
    elif padded is images:
        return images.clone()
    return padded.gather(3, columns[:, None, None, :].expand(batch, channels, height, width))


def _check_statistics(name: str, values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != channels:
        raise ValueError(f"Invalid {name}: {len(values)} values for {channels} channels (expected one per channel)")
    return values


class ImageTensors(ResidentSet):
    """A classification set of images held as one uint8 tensor, normalised (and augmented) a batch at a time.

    Item ``i`` (for a ``DataLoader``) is ``(x, y)``: a float32 ``(C, H, W)`` tensor and a 0-d label, augmented with
    draws from torch's global generator, as torchvision's transforms draw. The harness calls :meth:`batch`
    instead: one gather for the whole batch, with the draws of a seeded generator (:meth:`draw`).

    Args:
        images: ``(N, C, H, W)`` uint8 pixels.
        targets: ``(N,)`` class indices.
        mean, std: per-channel statistics of ``Normalize`` (applied to the pixels divided by 255).
        padding: random crop with this many zero pixels on each side (0: no crop).
        flip: random horizontal flip.
    """

    def __init__(self, images: Tensor, targets: Tensor, *, mean: Sequence[float], std: Sequence[float],
                 padding: int = 0, flip: bool = False) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"Invalid images: {getattr(images, 'dtype', type(images).__name__)}, shape "
                            f"{tuple(getattr(images, 'shape', ()))} (expected a (N, C, H, W) uint8 tensor)")
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.shape != (len(images),):
            raise ValueError(f"Invalid targets shape: {tuple(targets.shape)} (expected ({len(images)},), one label "
                             "per image)")
        channels = images.shape[1]
        self.mean = _check_statistics("mean", mean, channels)
        self.std = _check_statistics("std", std, channels)
        if not all(s > 0 for s in self.std):
            raise ValueError(f"Invalid std: {self.std} (expected every std > 0)")
        self.padding = check_int_at_least("padding", padding, 0)
        if not isinstance(flip, bool):
            raise TypeError(f"Invalid flip type: {type(flip).__name__} (expected bool)")
        self.flip = flip
        self.images = images
        self.targets = targets.to(images.device)
        self._scale = self._shift = None  # the normalisation constants, made on the images' device once

    # ------------------------------------------------------------------------------------------ views
    def _like(self, images: Tensor, targets: Tensor, **changes: Any) -> ImageTensors:
        options = {"mean": self.mean, "std": self.std, "padding": self.padding, "flip": self.flip, **changes}
        return ImageTensors(images, targets, **options)

    @property
    def augmented(self) -> bool:
        """Whether batches get random crops or flips."""
        return self.padding > 0 or self.flip

    def without_augmentation(self) -> ImageTensors:
        """The same images (shared storage) and labels, only normalised."""
        return self._like(self.images, self.targets, padding=0, flip=False)

    def _anchor(self) -> Tensor:
        return self.images

    def _moved(self, device: torch.device) -> ImageTensors:
        return self._like(self.images.to(device), self.targets.to(device))

    def select(self, indices: Sequence[int] | Tensor) -> ImageTensors:
        """The examples at ``indices``, in that order (a copy)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        return self._like(self.images[index], self.targets[index])

    def relabel(self, targets: Tensor) -> ImageTensors:
        """The same images with other labels."""
        return self._like(self.images, torch.as_tensor(targets, dtype=torch.long))

    # ----------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.images)

    def draw(self, count: int, generator: torch.Generator | None = None) -> Draws | None:
        """Crop offsets and flips for ``count`` examples from ``generator`` (on its device: the CPU for a seeded
        run), or ``None`` for a set without augmentation (nothing is drawn then)."""
        if not self.augmented:
            return None
        device = generator.device if generator is not None else torch.device("cpu")
        offsets = flips = None
        if self.padding:
            offsets = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=generator, device=device)
        if self.flip:
            flips = torch.rand(count, generator=generator, device=device) < 0.5
        return offsets, flips

    def batch(self, index: Tensor, draws: Draws | None = None) -> tuple[Tensor, Tensor]:
        """``(x, y)`` for the examples at ``index`` (on this set's device): cropped and flipped by ``draws`` (from
        :meth:`draw`, one row per index; ``None``: neither), then ``(x / 255 - mean) / std`` in float32."""
        images = self.images[index]
        if draws is not None:
            for name, drawn in zip(("offsets", "flips"), draws):
                if drawn is not None and len(drawn) != len(images):
                    raise ValueError(f"Invalid draws: {len(drawn)} {name} for {len(images)} images (expected one "
                                     "row per index)")
            offsets, flips = (None if t is None else t.to(self.device, non_blocking=True) for t in draws)
            images = crop_flip(images, self.padding, offsets, flips)
        return self._normalise(images), self.targets[index]

    def _normalise(self, images: Tensor) -> Tensor:
        if self._scale is None or self._scale.device != images.device:
            shape = (len(self.mean), 1, 1)
            self._shift = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(shape)
            self._scale = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(shape)
        # ToTensor() then Normalize(mean, std), the same float32 operations in the same order
        return images.float().div_(255).sub_(self._shift).div_(self._scale)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        position = torch.tensor([index % len(self)], device=self.device)
        x, y = self.batch(position, self.draw(1))
        return x[0], y[0]

    def __repr__(self) -> str:
        return (f"ImageTensors({len(self)} x {tuple(self.images.shape[1:])} uint8 on {self.device}, padding="
                f"{self.padding}, flip={self.flip})")
