"""LeNet-5 (LeCun et al., 1998): two 5x5 convolutions with pooling, then fully connected 120-84-classes."""

from __future__ import annotations

import math

from torch import Tensor, nn

from ._layers import check_bool, check_dropout, check_input_shape, make_activation

__all__ = ["LeNet5"]

POOLING = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class LeNet5(nn.Module):
    """LeNet-5 for ``(C, H, W)`` images: conv(6, 5x5) pool conv(16, 5x5) pool, then Linear 120, 84, classes.

    LeNet-5 was designed for 32x32 inputs; smaller images are zero-padded by the first convolution up to
    32 pixels (MNIST's 28x28 gets ``padding=2``, the classic set-up: 61,706 parameters for 10 classes).
    ReLU and max pooling by default (the modern reading); ``activation="tanh", pooling="avg"`` is closer
    to the original.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: outputs (logits).
        activation: nonlinearity name (see :mod:`sharpness.models`).
        pooling: ``"max"`` or ``"avg"``.
        batch_norm: BatchNorm2d after each convolution.
        dropout: dropout probability after each hidden fully connected layer, ``0 <= dropout < 1``.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, activation: str = "relu",
                 pooling: str = "max", batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        channels, height, width = input_shape
        use_bn = check_bool("batch_norm", batch_norm)
        dropout = check_dropout(dropout)
        if pooling not in POOLING:
            raise ValueError(f"Unknown pooling name: {pooling!r} (expected one of {', '.join(POOLING)})")
        padding = max(0, math.ceil((32 - min(height, width)) / 2))
        features: list[nn.Module] = []
        convs = (nn.Conv2d(channels, 6, 5, padding=padding, bias=not use_bn),
                 nn.Conv2d(6, 16, 5, bias=not use_bn))
        for conv in convs:
            features.append(conv)
            if use_bn:
                features.append(nn.BatchNorm2d(conv.out_channels))
            features += [make_activation(activation), POOLING[pooling](2)]
        self.features = nn.Sequential(*features, nn.Flatten())
        # spatial size: conv 5x5 (-4), pool /2, conv 5x5 (-4), pool /2
        out_h, out_w = (((size + 2 * padding - 4) // 2 - 4) // 2 for size in (height, width))
        classifier: list[nn.Module] = [nn.Linear(16 * out_h * out_w, 120)]
        for fan_in, fan_out in ((120, 84), (84, num_classes)):
            classifier.append(make_activation(activation))
            if dropout:
                classifier.append(nn.Dropout(dropout))
            classifier.append(nn.Linear(fan_in, fan_out))
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)


def build(*, num_classes: int, input_shape: tuple[int, ...], activation: str = "relu", pooling: str = "max",
          batch_norm: bool = False, dropout: float = 0.0) -> LeNet5:
    """Registry builder: ``(C, H, W)`` images."""
    check_input_shape("lenet5", input_shape, (3,), "(C, H, W); grey images are (1, H, W)")
    return LeNet5(input_shape, num_classes, activation=activation, pooling=pooling,  # type: ignore[arg-type]
                  batch_norm=batch_norm, dropout=dropout)
