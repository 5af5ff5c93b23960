"""Wide residual networks WRN-depth-k (Zagoruyko & Komodakis, 2016), e.g. WRN-28-10: 36,479,194 parameters
for 10 classes (36.5M), the SAM papers' main CIFAR architecture.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_int_at_least
from ._layers import batch_norm as make_norm
from ._layers import check_bool, check_dropout, check_input_shape, init_conv_bn_, residual_stages

__all__ = ["WideBasic", "WideResNet"]


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3, plus the input (projected if reshaped).

    When the block changes the shape, the projection reads the pre-activated input, as in the reference
    implementation.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float,
                 batch_norm: bool) -> None:
        super().__init__()
        self.bn1 = make_norm("2d", in_channels, batch_norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = make_norm("2d", out_channels, batch_norm)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(activated)))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: a 3x3 stem of 16 channels, three stages of ``(depth - 4) / 6`` blocks
    with ``16k``, ``32k``, ``64k`` channels (strides 1, 2, 2), BN-ReLU, global average pooling, Linear.

    Weights are initialised as in the reference code: He-normal (fan-out) convolutions, BatchNorm scale 1
    and shift 0, zero Linear bias.

    Args:
        num_classes: outputs (logits).
        depth: total depth, ``6n + 4`` (16, 22, 28, 40...).
        widen_factor: channel multiplier ``k`` >= 1.
        dropout: dropout probability between the two convolutions of a block (the paper uses 0.3 for some
            runs; the SAM papers 0), ``0 <= dropout < 1``.
        in_channels: image channels.
        batch_norm: BatchNorm before every convolution.
    """

    def __init__(self, num_classes: int, *, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0,
                 in_channels: int = 3, batch_norm: bool = True) -> None:
        super().__init__()
        depth = check_int_at_least("depth", depth, 10)
        if (depth - 4) % 6:
            raise ValueError(f"Invalid depth value: {depth} "
                             "(expected depth = 6n + 4 with n >= 1: 10, 16, 22, 28, 40...)")
        widen_factor = check_int_at_least("widen_factor", widen_factor, 1)
        dropout = check_dropout(dropout)
        batch_norm = check_bool("batch_norm", batch_norm)
        per_stage = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.stages, channels = residual_stages(
            [[base * widen_factor] * per_stage for base in (16, 32, 64)],
            lambda c_in, c_out, stride: WideBasic(c_in, c_out, stride, dropout, batch_norm), 16)
        self.head = nn.Sequential(make_norm("2d", channels, batch_norm), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn_(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.stages(self.stem(x))))  # (B, C, H, W) -> (B, num_classes)


def build(*, num_classes: int, input_shape: tuple[int, ...], depth: int = 28, widen_factor: int = 10,
          dropout: float = 0.0, batch_norm: bool = True) -> WideResNet:
    """Registry builder: ``(C, H, W)`` images (designed for 32x32); defaults to WRN-28-10 without dropout."""
    check_input_shape("wideresnet", input_shape, (3,), "(C, H, W)")
    return WideResNet(num_classes, depth=depth, widen_factor=widen_factor, dropout=dropout,
                      in_channels=input_shape[0], batch_norm=batch_norm)
