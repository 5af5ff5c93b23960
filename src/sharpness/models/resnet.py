"""ResNet-18 for 32x32 images (He et al., 2016, the CIFAR variant used by the SAM papers).

The CIFAR variant replaces ImageNet's 7x7 stride-2 stem and max pooling with one 3x3 stride-1 convolution,
so the four stages see 32, 16, 8 and 4 pixels. 11,173,962 parameters for 10 classes (11.2M).
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_int_at_least
from ._layers import ZeroPadShortcut, check_bool, check_input_shape, residual_stages
from ._layers import batch_norm as make_norm

__all__ = ["BasicBlock", "ResNet"]


def _conv3x3(in_channels: int, out_channels: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection, then ReLU. Where the shape changes the
    shortcut is a 1x1 projection with BatchNorm (``shortcut="B"``) or :class:`ZeroPadShortcut` (``"A"``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool = True,
                 shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride, bias=not batch_norm)
        self.bn1 = make_norm("2d", out_channels, batch_norm)
        self.conv2 = _conv3x3(out_channels, out_channels, 1, bias=not batch_norm)
        self.bn2 = make_norm("2d", out_channels, batch_norm)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(stride, out_channels - in_channels)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not batch_norm),
                    make_norm("2d", out_channels, batch_norm))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet of :class:`BasicBlock` stages; ``blocks=(2, 2, 2, 2)`` is ResNet-18.

    Args:
        blocks: blocks per stage; stage ``i`` has ``width * 2**i`` channels and stride 2 after the first.
        num_classes: outputs (logits).
        in_channels: image channels.
        width: channels of the stem and first stage (64 in the paper; smaller for quick tests).
        batch_norm: BatchNorm after every convolution (``False``: convolutions get biases instead).
        shortcut: where a block changes the shape, ``"B"`` (1x1 projection + BN) or ``"A"`` (zero-padded).
    """

    def __init__(self, blocks: tuple[int, ...], num_classes: int, *, in_channels: int = 3, width: int = 64,
                 batch_norm: bool = True, shortcut: str = "B") -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_channels, width, 1, bias=not batch_norm),
                                  make_norm("2d", width, batch_norm), nn.ReLU())
        self.stages, channels = residual_stages(
            [[width * 2**index] * count for index, count in enumerate(blocks)],
            lambda c_in, c_out, stride: BasicBlock(c_in, c_out, stride, batch_norm, shortcut), width)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))  # (B, C, H, W) -> (B, num_classes)


def build(*, num_classes: int, input_shape: tuple[int, ...], width: int = 64,
          batch_norm: bool = True) -> ResNet:
    """Registry builder of ResNet-18: ``(C, H, W)`` images (designed for 32x32; any size >= 8 runs)."""
    check_input_shape("resnet18", input_shape, (3,), "(C, H, W)")
    width = check_int_at_least("width", width, 1)
    return ResNet((2, 2, 2, 2), num_classes, in_channels=input_shape[0], width=width,
                  batch_norm=check_bool("batch_norm", batch_norm))
