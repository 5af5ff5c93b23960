"""A small 1-D CNN for MNIST-1D: three strided convolutions (length 40 -> 20 -> 10 -> 5) and a classifier."""

from __future__ import annotations

from torch import nn

from .._validation import check_int_at_least
from ._layers import check_bool, check_input_shape, make_activation

__all__ = ["CNN1d"]


class CNN1d(nn.Sequential):
    """Conv1d(k5, s2) act, Conv1d(k3, s2) act, Conv1d(k3, s2) act, Flatten, Linear.

    The default job's model (``sharpness train`` on MNIST-1D). A 1-D input ``(L,)`` is unflattened to one
    channel; ``(C, L)`` inputs go straight in.

    Args:
        input_shape: ``(L,)`` or ``(C, L)``.
        num_classes: outputs (logits).
        channels: channels of every convolution.
        activation: nonlinearity name.
        batch_norm: BatchNorm1d after each convolution.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, channels: int = 32,
                 activation: str = "relu", batch_norm: bool = False) -> None:
        channels = check_int_at_least("channels", channels, 1)
        use_bn = check_bool("batch_norm", batch_norm)
        in_channels, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
        layers: list[nn.Module] = [nn.Unflatten(1, (1, length)) if len(input_shape) == 1 else nn.Identity()]
        for conv in (nn.Conv1d(in_channels, channels, kernel_size=5, stride=2, padding=2),
                     nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
                     nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)):
            layers.append(conv)
            if use_bn:
                layers.append(nn.BatchNorm1d(channels))
            layers.append(make_activation(activation))
            length = (length + 1) // 2  # each stride-2 convolution halves the length, rounding up
        layers += [nn.Flatten(), nn.Linear(channels * length, num_classes)]
        super().__init__(*layers)


def build(*, num_classes: int, input_shape: tuple[int, ...], channels: int = 32, activation: str = "relu",
          batch_norm: bool = False) -> CNN1d:
    """Registry builder: signals of shape ``(L,)`` or ``(C, L)``."""
    check_input_shape("cnn1d", input_shape, (1, 2), "(L,) or (C, L)")
    return CNN1d(input_shape, num_classes, channels=channels, activation=activation, batch_norm=batch_norm)
