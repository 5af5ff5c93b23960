"""PyramidNet for CIFAR (Han, Kim, Kim, CVPR 2017): channels grow by ``alpha / N`` at every block.

PyramidNet-110 with ``alpha = 270`` (28,485,477 parameters for 10 classes, as the authors' code builds it;
their Table 4 rounds to 28.3M) is the third CIFAR architecture of the AE-SAM, ESAM, LookSAM and SS-SAM
tables (300 epochs), and SALR reports PyramidNet too. ``bottleneck=True`` gives the bottleneck variant (depth
``9n + 2``, 4x wider outputs), e.g. the PyramidNet-272 (``alpha = 200``, 26.2M; the table says 26.0M) that
Foret et al. train with SAM (their ShakeDrop regularisation is not included).

Widths follow the authors' code: a running width ``d`` starts at 16, grows by ``alpha / N`` per block
(``N`` = all blocks of the three stages), and each block has ``round(d)`` channels (Python's rounding).
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_non_negative
from ._layers import ZeroPadShortcut, blocks_per_stage, check_bool, check_input_shape, init_conv_bn_, residual_stages

__all__ = ["PyramidNet", "pyramid_widths"]


def pyramid_widths(blocks: int, alpha: float, start: int = 16) -> list[int]:
    """The channels of the ``blocks`` blocks, in order: ``round(start + k alpha / blocks)`` accumulated in
    floating point as the authors' code does (``d += alpha / N`` per block, then ``round(d)``)."""
    rate, width, widths = alpha / blocks, float(start), []
    for _ in range(blocks):
        width += rate
        widths.append(round(width))
    return widths


class _Block(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN (basic) or BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN (bottleneck,
    4x outputs), plus a shortcut: the input (average-pooled 2x2 where the block has stride 2), with zero
    channels appended up to the block's width. No ReLU after the addition, none before the first conv."""

    def __init__(self, in_channels: int, width: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        if bottleneck:
            out_channels = 4 * width
            layers = [nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, width, 1, bias=False),
                      nn.BatchNorm2d(width), nn.ReLU(),
                      nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
                      nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, out_channels, 1, bias=False),
                      nn.BatchNorm2d(out_channels)]
        else:
            out_channels = width
            layers = [nn.BatchNorm2d(in_channels),
                      nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False),
                      nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False),
                      nn.BatchNorm2d(width)]
        self.residual = nn.Sequential(*layers)
        self.shortcut = ZeroPadShortcut(stride, out_channels - in_channels, pool="average", centre=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x) + self.shortcut(x)


class PyramidNet(nn.Module):
    """PyramidNet-``depth`` with widening factor ``alpha``, for 32x32 images.

    Stem: 3x3 convolution of 16 channels and BN (no ReLU); three stages of ``n`` blocks (stride 2 at the
    first block of stages 2 and 3) whose widths grow linearly from 16 to ``16 + alpha``; BN, ReLU, global
    average pooling, Linear. Convolutions are initialised He-normal (fan-out), BN at scale 1, shift 0, as in the
    authors' code (the Linear layer keeps PyTorch's default).

    Args:
        num_classes: outputs (logits).
        depth: ``6n + 2`` (basic blocks) or ``9n + 2`` (bottleneck blocks), ``n`` >= 1.
        alpha: total widening, >= 0 (270 for PyramidNet-110 in the SAM papers; 48 is the paper's smallest,
            1.7M parameters).
        bottleneck: bottleneck blocks instead of basic ones.
        in_channels: image channels.
    """

    def __init__(self, num_classes: int, *, depth: int = 110, alpha: float = 270.0, bottleneck: bool = False,
                 in_channels: int = 3) -> None:
        super().__init__()
        bottleneck = check_bool("bottleneck", bottleneck)
        per_stage = blocks_per_stage(depth, 3 if bottleneck else 2,
                                     "11, 20, 164, 272..." if bottleneck else "8, 20, 110...")
        alpha = check_non_negative("alpha", alpha)
        widths = pyramid_widths(3 * per_stage, alpha)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.stages, channels = residual_stages(
            [widths[i * per_stage:(i + 1) * per_stage] for i in range(3)],
            lambda c_in, width, stride: _Block(c_in, width, stride, bottleneck), 16, 4 if bottleneck else 1)
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.stages(self.stem(x))))  # (B, C, H, W) -> (B, num_classes)


def build(*, num_classes: int, input_shape: tuple[int, ...], depth: int = 110, alpha: float = 270.0,
          bottleneck: bool = False) -> PyramidNet:
    """Registry builder: ``(C, H, W)`` images (designed for 32x32); defaults to PyramidNet-110, alpha 270."""
    check_input_shape("pyramidnet", input_shape, (3,), "(C, H, W)")
    return PyramidNet(num_classes, depth=depth, alpha=alpha, bottleneck=bottleneck, in_channels=input_shape[0])
