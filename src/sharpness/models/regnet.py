"""RegNetX for 32x32 images (Radosavovic et al., CVPR 2020), one of the SALR paper's CIFAR networks.

A RegNetX is a stem, four stages of X blocks and a head. An X block is a ResNeXt bottleneck with bottleneck
ratio 1: ``relu(shortcut(x) + BN(conv1x1(relu(BN(conv3x3_g(relu(BN(conv1x1(x)))))))))``, the 3x3 convolution
grouped in groups of ``group_width`` channels and carrying the stage's stride (at its first block), the
shortcut a 1x1 convolution + BN where the shape changes. A model size is the paper's quantised linear rule:
block ``j`` of ``depth`` would have width ``u_j = w_0 + w_a j``; with ``s_j = round(log(u_j / w_0) / log w_m)``
it gets ``w_0 w_m^s_j`` rounded to a multiple of 8, and blocks of equal width form a stage. Stage widths are
then rounded to multiples of their group width (the authors' pycls ``adjust_block_compatibility``; Python's
round half to even, as numpy's). :data:`REGNETX` holds the paper's ``(depth, w_0, w_a, w_m, group_width)``.

The CIFAR variant is kuangliu/pytorch-cifar's (``RegNetX_200MF``, ``RegNetX_400MF``): a 3x3 stride-1 stem of
64 channels with BN and ReLU (the paper's ImageNet stem has 32 channels and stride 2) and stage strides 1, 1,
2, 2, so the stages see 32, 32, 16, 8 pixels. RegNetX-200MF (the default) has depths (1, 1, 4, 7), widths (24,
56, 152, 368), group width 8: 2,321,946 parameters for 10 classes, 2,355,156 for 100 (kuangliu's builds the
same layers, the shortcut registered after the residual branch instead of before it). RegNetX-400MF: depths
(1, 2, 7, 12), widths (32, 64, 160, 384), group width 16, 4,779,338 for 10 classes. The ``flops`` names are
the ImageNet models' (224 px, stem stride 2); on 32x32 with this stem the models cost other amounts.

Blocks and layer order are torchvision's ``RegNet`` (``ResBottleneckBlock``: projection, then the 1x1, 3x3,
1x1 branch), so torchvision's weights for the same ``BlockParams`` and a 3x3 stride-1 stem load in order.
torchvision rounds the stage widths differently (half up, plus one group where rounding loses over 10%): its
``regnet_x_400mf`` has a last stage of 400 channels instead of the paper's 384 (timm's ``regnetx_004_tv``), and
its rule would give 4.0GF a first stage of 120 instead of 80; all other sizes agree.

Weights are initialised as in pycls and torchvision: He-normal (fan-out) convolutions, BatchNorm at scale 1
and shift 0, the Linear layer normal with standard deviation 0.01 and zero bias.

Reference: I. Radosavovic, R. P. Kosaraju, R. Girshick, K. He, P. Dollar. Designing Network Design Spaces.
CVPR 2020.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from torch import Tensor, nn

from .._validation import check_choice, check_int_at_least
from ._layers import check_input_shape, conv_bn, init_conv_bn_

__all__ = ["REGNETX", "RegNetX", "XBlock", "regnet_stages"]

# RegNetX by ImageNet FLOPs: (depth, w_0, w_a, w_m, group_width), Radosavovic et al. (2020), the pycls configs
REGNETX: dict[str, tuple[int, int, float, float, int]] = {
    "200mf": (13, 24, 36.44, 2.49, 8),
    "400mf": (22, 24, 24.48, 2.54, 16),
    "600mf": (16, 48, 36.97, 2.24, 24),
    "800mf": (16, 56, 35.73, 2.28, 16),
    "1.6gf": (18, 80, 34.01, 2.25, 24),
    "3.2gf": (25, 88, 26.31, 2.25, 48),
    "4.0gf": (23, 96, 38.65, 2.43, 40),
    "6.4gf": (17, 184, 60.83, 2.07, 56),
    "8.0gf": (23, 80, 49.56, 2.88, 120),
    "12gf": (19, 168, 73.36, 2.37, 112),
    "16gf": (22, 216, 55.59, 2.1, 128),
    "32gf": (23, 320, 69.86, 2.0, 168),
}


def regnet_stages(depth: int, w_0: int, w_a: float, w_m: float, group_width: int,
                  quantum: int = 8) -> tuple[list[int], list[int], list[int]]:
    """Per-stage ``(depths, widths, group_widths)`` of the RegNet with these parameters (bottleneck ratio 1),
    as pycls's ``generate_regnet`` and ``adjust_block_compatibility`` compute them."""
    block_widths = []
    for j in range(depth):
        s_j = round(math.log((w_0 + w_a * j) / w_0) / math.log(w_m))  # u_j = w_0 + w_a j, in steps of w_m
        block_widths.append(round(w_0 * w_m**s_j / quantum) * quantum)
    widths = sorted(set(block_widths))
    depths = [block_widths.count(width) for width in widths]
    groups = [min(group_width, width) for width in widths]
    widths = [max(g, round(width / g) * g) for width, g in zip(widths, groups, strict=True)]
    return depths, widths, groups


class XBlock(nn.Module):
    """The X block: 1x1, BN, ReLU, 3x3 grouped (``out_channels // group_width`` groups, ``stride``), BN, ReLU,
    1x1, BN; plus the input, projected by a 1x1 convolution + BN where the shape changes; then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:  # first, as torchvision registers it
            self.shortcut = nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride))
        self.residual = nn.Sequential(
            *conv_bn(in_channels, out_channels, 1), nn.ReLU(),
            *conv_bn(out_channels, out_channels, 3, stride, groups=out_channels // group_width), nn.ReLU(),
            *conv_bn(out_channels, out_channels, 1))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.shortcut(x) + self.residual(x))


class RegNetX(nn.Module):
    """RegNetX with the CIFAR stem: 3x3 stride-1 convolution, BN, ReLU; stages of :class:`XBlock`; global
    average pooling; Linear. The first two stages keep the stem's resolution, each later one halves it.

    Args:
        num_classes: outputs (logits).
        depths: blocks per stage.
        widths: channels per stage, each a multiple of its group width.
        group_width: channels per group of the 3x3 convolutions (a stage narrower than that has one group).
        stem_width: channels of the stem (64 in the CIFAR variant, 32 in the paper).
        in_channels: image channels.
    """

    def __init__(self, num_classes: int, depths: Sequence[int], widths: Sequence[int], group_width: int, *,
                 stem_width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, stem_width, 3), nn.ReLU())
        stages, channels = [], stem_width
        for index, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            group = min(group_width, width)
            stride = 1 if index < 2 else 2
            stages.append(nn.Sequential(*(XBlock(channels if block == 0 else width, width,
                                                 stride if block == 0 else 1, group) for block in range(depth))))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn_(self)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))  # (B, C, H, W) -> (B, num_classes)


def _check_sizes(name: str, value: object) -> list[int]:
    """A non-empty sequence of integers >= 1, one per stage."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
            or not all(isinstance(size, numbers.Integral) and not isinstance(size, bool) for size in value)):
        raise TypeError(f"Invalid {name} type: {type(value).__name__} {value!r} "
                        "(expected a sequence of integers, one per stage)")
    if not value or min(value) < 1:
        raise ValueError(f"Invalid {name} value: {list(value)} (expected one or more integers >= 1)")
    return [int(size) for size in value]


def build(*, num_classes: int, input_shape: tuple[int, ...], flops: str = "200mf",
          depths: Sequence[int] | None = None, widths: Sequence[int] | None = None,
          group_width: int | None = None, stem_width: int = 64) -> RegNetX:
    """Registry builder: ``(C, H, W)`` images (designed for 32x32); defaults to the CIFAR RegNetX-200MF.

    ``flops`` picks the paper's model by ImageNet FLOPs (a key of :data:`REGNETX`); ``depths``, ``widths`` and
    ``group_width``, where given, replace its values (e.g. ``widths=(8, 16, 32, 64), group_width=8`` for a
    small test model)."""
    check_input_shape("regnetx", input_shape, (3,), "(C, H, W)")
    flops = check_choice("flops", flops, tuple(REGNETX))
    preset_depths, preset_widths, _ = regnet_stages(*REGNETX[flops])
    depths = preset_depths if depths is None else _check_sizes("depths", depths)
    widths = preset_widths if widths is None else _check_sizes("widths", widths)
    group_width = REGNETX[flops][4] if group_width is None else check_int_at_least("group_width", group_width, 1)
    if len(depths) != len(widths):
        raise ValueError(f"Invalid depths and widths values: {list(depths)} and {list(widths)} "
                         "(expected one depth and one width per stage)")
    uneven = [width for width in widths if width % min(group_width, width)]
    if uneven:
        raise ValueError(f"Invalid widths value: {list(widths)} "
                         f"(expected multiples of group_width = {group_width}; {uneven} are not)")
    return RegNetX(num_classes, depths, widths, group_width,
                   stem_width=check_int_at_least("stem_width", stem_width, 1), in_channels=input_shape[0])
