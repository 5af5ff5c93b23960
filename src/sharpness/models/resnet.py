"""ResNet-18, 34, 50, 101 and 152 for 32x32 images (He et al., 2016, the CIFAR variant used by the SAM papers).

The CIFAR variant replaces ImageNet's 7x7 stride-2 stem and max pooling with one 3x3 stride-1 convolution,
so the four stages see 32, 16, 8 and 4 pixels. ResNet-18 and 34 stack :class:`BasicBlock` s, ResNet-50, 101
and 152 :class:`Bottleneck` s (stride on the 3x3 convolution: torchvision's "ResNet v1.5", also the layout of
the widely used CIFAR code kuangliu/pytorch-cifar). For 10 classes: 11,173,962 parameters (ResNet-18, 11.2M),
21,282,122 (ResNet-34), 23,520,842 (ResNet-50, 23.5M), 42,512,970 (ResNet-101, 42.5M) and 58,156,618
(ResNet-152), the counts of kuangliu/pytorch-cifar. The SALR and GNR papers train ResNet-50 and 101 on CIFAR.

Reference: K. He, X. Zhang, S. Ren, J. Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
"""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from .._validation import _type_and_value, check_int_at_least
from ._layers import ZeroPadShortcut, check_bool, check_input_shape, residual_stages
from ._layers import batch_norm as make_norm

__all__ = ["DEPTHS", "BasicBlock", "Bottleneck", "ResNet"]


def _conv3x3(in_channels: int, out_channels: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def _shortcut(in_channels: int, out_channels: int, stride: int, batch_norm: bool, shortcut: str) -> nn.Module:
    """The identity, or where the shape changes a 1x1 projection with BatchNorm (``shortcut="B"``) or
    :class:`ZeroPadShortcut` (``"A"``)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if shortcut == "A":
        return ZeroPadShortcut(stride, out_channels - in_channels)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not batch_norm),
                         make_norm("2d", out_channels, batch_norm))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection, then ReLU. Where the shape changes the
    shortcut is a 1x1 projection with BatchNorm (``shortcut="B"``) or :class:`ZeroPadShortcut` (``"A"``).

    ``groups`` and ``base_width`` exist so that :class:`ResNet` calls both blocks alike; a basic block has no
    bottleneck to split or widen and accepts only 1 and 64 (as torchvision's does).
    """

    expansion = 1  # outputs per unit of ``out_channels``

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool = True,
                 shortcut: str = "B", *, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if (groups, base_width) != (1, 64):
            raise ValueError(f"Invalid groups and base_width values for BasicBlock: {groups}, {base_width} "
                             "(expected 1 and 64; grouped or widened 3x3 convolutions need Bottleneck)")
        self.conv1 = _conv3x3(in_channels, out_channels, stride, bias=not batch_norm)
        self.bn1 = make_norm("2d", out_channels, batch_norm)
        self.conv2 = _conv3x3(out_channels, out_channels, 1, bias=not batch_norm)
        self.bn2 = make_norm("2d", out_channels, batch_norm)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_channels, out_channels, stride, batch_norm, shortcut)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 with the stride, 1x1 expand to ``4 * planes``, BatchNorm after each, ReLU after the
    first two and after the residual sum; the shortcut as in :class:`BasicBlock`.

    The 3x3 convolution is ``planes * base_width // 64 * groups`` channels wide in ``groups`` groups: ``planes``
    in a ResNet (``groups=1, base_width=64``), ``C`` groups of ``d`` channels per 64 of ``planes`` in a ResNeXt
    (cardinality ``C``, bottleneck width ``d``), as in torchvision's ``Bottleneck`` and the ResNeXt authors'
    code (``D = floor(n * baseWidth / 64)``, ``D * C`` channels).
    """

    expansion = 4  # outputs per unit of ``planes``

    def __init__(self, in_channels: int, planes: int, stride: int, batch_norm: bool = True, shortcut: str = "B",
                 *, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        inner, out_channels = planes * base_width // 64 * groups, self.expansion * planes
        if inner < 1:
            raise ValueError(f"Invalid base_width value: {base_width} (expected planes * base_width >= 64, "
                             f"planes = {planes}, so that the bottleneck has channels)")
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=not batch_norm)
        self.bn1 = make_norm("2d", inner, batch_norm)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, groups=groups, bias=not batch_norm)
        self.bn2 = make_norm("2d", inner, batch_norm)
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=not batch_norm)
        self.bn3 = make_norm("2d", out_channels, batch_norm)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_channels, out_channels, stride, batch_norm, shortcut)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))  # (B, inner, H / stride, W / stride)
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


# depth -> block type and blocks per stage (He et al., 2016, Table 1)
DEPTHS: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """A CIFAR-style ResNet: a 3x3 stem, stages of ``block`` s, global average pooling, one Linear layer.
    ``blocks=(2, 2, 2, 2)`` is ResNet-18, ``blocks=(3, 4, 6, 3), block=Bottleneck`` ResNet-50 (see
    :data:`DEPTHS`), ``block=Bottleneck, groups=C, base_width=d`` a ResNeXt.

    Weights keep PyTorch's default initialisation (as kuangliu/pytorch-cifar does).

    Args:
        blocks: blocks per stage; stage ``i`` has ``width * 2**i`` planes (``block.expansion`` times as many
            output channels) and stride 2 after the first.
        num_classes: outputs (logits).
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        in_channels: image channels.
        width: channels of the stem and planes of the first stage (64 in the paper; smaller for quick tests).
        groups: groups of the bottleneck's 3x3 convolution (a ResNeXt's cardinality; 1 for basic blocks).
        base_width: bottleneck channels per group per 64 planes (a ResNeXt's ``d``; 64 for basic blocks).
        batch_norm: BatchNorm after every convolution (``False``: convolutions get biases instead).
        shortcut: where a block changes the shape, ``"B"`` (1x1 projection + BN) or ``"A"`` (zero-padded).
    """

    def __init__(self, blocks: tuple[int, ...], num_classes: int, *,
                 block: type[BasicBlock | Bottleneck] = BasicBlock, in_channels: int = 3, width: int = 64,
                 groups: int = 1, base_width: int = 64, batch_norm: bool = True, shortcut: str = "B") -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_channels, width, 1, bias=not batch_norm),
                                  make_norm("2d", width, batch_norm), nn.ReLU())
        self.stages, channels = residual_stages(
            [[width * 2**index] * count for index, count in enumerate(blocks)],
            lambda c_in, planes, stride: block(c_in, planes, stride, batch_norm, shortcut, groups=groups,
                                               base_width=base_width),
            width, block.expansion)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))  # (B, C, H, W) -> (B, num_classes)


def _check_depth(depth: object) -> int:
    valid = ", ".join(map(str, DEPTHS))
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise TypeError(f"Invalid depth type: {_type_and_value(depth)} (expected an integer, one of {valid})")
    if depth not in DEPTHS:
        raise ValueError(f"Invalid depth value: {depth} (expected one of {valid})")
    return int(depth)


def _build(name: str, depth: int, num_classes: int, input_shape: tuple[int, ...], width: int,
           batch_norm: bool) -> ResNet:
    check_input_shape(name, input_shape, (3,), "(C, H, W)")
    width = check_int_at_least("width", width, 1)
    block, blocks = DEPTHS[depth]
    return ResNet(blocks, num_classes, block=block, in_channels=input_shape[0], width=width,
                  batch_norm=check_bool("batch_norm", batch_norm))


def build(*, num_classes: int, input_shape: tuple[int, ...], width: int = 64,
          batch_norm: bool = True) -> ResNet:
    """Registry builder of ResNet-18: ``(C, H, W)`` images (designed for 32x32; any size >= 8 runs)."""
    return _build("resnet18", 18, num_classes, input_shape, width, batch_norm)


def build_by_depth(*, num_classes: int, input_shape: tuple[int, ...], depth: int = 50, width: int = 64,
                   batch_norm: bool = True) -> ResNet:
    """Registry builder of ResNet-``depth``, 18, 34, 50, 101 or 152: ``(C, H, W)`` images (designed for 32x32).
    ResNet-50 by default, the smallest of the bottleneck depths the SALR and GNR papers train (``resnet18``
    already names ResNet-18)."""
    depth = _check_depth(depth)
    return _build("resnet", depth, num_classes, input_shape, width, batch_norm)
