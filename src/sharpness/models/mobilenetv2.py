"""MobileNetV2 for 32x32 images (Sandler et al., CVPR 2018), one of the SALR paper's CIFAR networks.

The paper's network (its Table 2; torchvision's ``mobilenet_v2``): a 3x3 convolution of 32 channels, 17
inverted-residual blocks in seven stages ``(t, c, n, s)`` = (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2),
(6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1) (expansion ``t``, ``c`` channels, ``n`` blocks,
stride ``s`` at the first), a 1x1 convolution to 1280 channels, global average pooling and a Linear layer.
A block is ``x -> [1x1 conv to t*c_in, BN, ReLU6] -> 3x3 depthwise conv (stride s), BN, ReLU6 -> 1x1 conv to
c, BN`` (no activation: the linear bottleneck), plus ``x`` when the stride is 1 and the channels do not change.

The CIFAR variant (kuangliu/pytorch-cifar, used by most CIFAR papers) sets the stride of the stem and of the
second stage to 1, so the stages see 32, 32, 16, 8, 8, 4, 4 pixels. Otherwise this is the paper's and
torchvision's network (ReLU6, no expansion convolution in the first block, no shortcut where the channels
change): 2,236,682 parameters for 10 classes, 2,351,972 for 100. Kuangliu's version has 2,296,922 for 10: it
adds a 1x1 expansion convolution to the ``t = 1`` block and a 1x1 convolution + BN shortcut to the four
stride-1 blocks that change the channels, and uses ReLU.

Weights are initialised as torchvision does: He-normal (fan-out) convolutions, BatchNorm at scale 1 and shift
0, the Linear layer normal with standard deviation 0.01 and zero bias. torchvision puts dropout 0.2 before
the Linear layer; here ``dropout`` defaults to 0 (kuangliu's CIFAR network has none).

Reference: M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen. MobileNetV2: Inverted Residuals and Linear
Bottlenecks. CVPR 2018.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_positive
from ._layers import check_dropout, check_input_shape, conv_bn, init_conv_bn_

__all__ = ["InvertedResidual", "MobileNetV2"]

# (t, c, n, s): expansion, output channels, blocks, stride of the first block; the CIFAR strides (the second
# stage's is 2 in the paper)
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))
STEM, HEAD = 32, 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """The paper's channel rounding (torchvision's ``_make_divisible``): ``value`` to the nearest multiple of
    ``divisor`` (at least ``divisor``), one ``divisor`` more if rounding lost over 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
             activation: bool = True) -> nn.Sequential:
    """Convolution without bias ('same' padding), BatchNorm, then ReLU6 unless ``activation=False``."""
    layers = conv_bn(in_channels, out_channels, kernel_size, stride, groups)
    return nn.Sequential(*layers, nn.ReLU6()) if activation else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1 to ``expand_ratio * in_channels``, skipped when the ratio is 1), filter (3x3 depthwise,
    ``stride``), project linearly (1x1 to ``out_channels``, BN, no activation); the input is added when the
    shapes agree (``stride == 1`` and ``in_channels == out_channels``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        expand = [_conv_bn(in_channels, hidden, 1)] if expand_ratio != 1 else []
        self.residual = nn.Sequential(*expand, _conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                      _conv_bn(hidden, out_channels, 1, activation=False))
        self.identity = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.residual(x)
        return x + out if self.identity else out

    def extra_repr(self) -> str:
        return f"identity={self.identity}"


class MobileNetV2(nn.Module):
    """MobileNetV2 with the CIFAR strides (see the module docstring).

    Args:
        num_classes: outputs (logits).
        in_channels: image channels.
        width_mult: the paper's width multiplier (1.0; it studies 0.35 to 1.4): every layer's channels times
            ``width_mult``, rounded to a multiple of 8; the last convolution keeps 1280 when ``width_mult < 1``.
        dropout: dropout probability before the Linear layer (torchvision: 0.2), ``0 <= dropout < 1``.
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        width_mult = check_positive("width_mult", width_mult)
        dropout = check_dropout(dropout)
        channels = make_divisible(STEM * width_mult)
        self.stem = _conv_bn(in_channels, channels, 3, stride=1)  # stride 2 in the paper
        stages = []
        for expand_ratio, width, blocks, stride in STAGES:
            width = make_divisible(width * width_mult)
            stage = []
            for index in range(blocks):
                stage.append(InvertedResidual(channels, width, stride if index == 0 else 1, expand_ratio))
                channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        head = make_divisible(HEAD * max(1.0, width_mult))
        self.head = nn.Sequential(_conv_bn(channels, head, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(head, num_classes)
        init_conv_bn_(self)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.head(self.stages(self.stem(x)))))  # (B, C, H, W) -> (B, num_classes)


def build(*, num_classes: int, input_shape: tuple[int, ...], width_mult: float = 1.0,
          dropout: float = 0.0) -> MobileNetV2:
    """Registry builder: ``(C, H, W)`` images (designed for 32x32; any size runs)."""
    check_input_shape("mobilenetv2", input_shape, (3,), "(C, H, W)")
    return MobileNetV2(num_classes, in_channels=input_shape[0], width_mult=width_mult, dropout=dropout)
