"""A fully connected network, and the universal-SAM MNIST preset (6 Linear layers, 128 units, ReLU)."""

from __future__ import annotations

import math

from torch import nn

from .._validation import check_int_at_least
from ._layers import check_bool, check_dropout, make_activation

__all__ = ["MLP", "UNIVERSAL_SAM_MNIST"]

#: the universal-SAM paper's MNIST network (its Fig. 2): registered as ``"mlp6"``
UNIVERSAL_SAM_MNIST = {"depth": 6, "width": 128, "activation": "relu"}


class MLP(nn.Sequential):
    """Flatten, ``depth - 1`` hidden blocks ``Linear(width) [BatchNorm1d] activation [Dropout]``, ``Linear``.

    ``depth`` counts Linear layers, output layer included: the default ``depth=3`` has two hidden layers,
    ``depth=1`` is multinomial logistic regression, and ``depth=6, width=128, activation="relu"`` (registry
    name ``"mlp6"``) is the network of the universal-SAM paper's explicit-bias experiment on MNIST ("a simple
    6-layer ReLU network with 128 hidden units"; 167,818 parameters for 28x28 inputs). Weights keep
    PyTorch's default initialisation, as in that paper's code; deep ReLU stacks then start with small
    signals and need more steps (or ``batch_norm=True``) to get going.

    Args:
        in_features: size of a flattened input.
        num_classes: outputs (logits).
        depth: number of Linear layers, >= 1.
        width: units of each hidden layer, >= 1.
        activation: name of the nonlinearity (``"relu"``, ``"tanh"``, ``"gelu"``, ``"identity"``...).
        batch_norm: BatchNorm1d after each hidden Linear layer.
        dropout: dropout probability after each hidden activation, ``0 <= dropout < 1``.
    """

    def __init__(self, in_features: int, num_classes: int, *, depth: int = 3, width: int = 128,
                 activation: str = "relu", batch_norm: bool = False, dropout: float = 0.0) -> None:
        depth = check_int_at_least("depth", depth, 1)
        width = check_int_at_least("width", width, 1)
        use_bn = check_bool("batch_norm", batch_norm)
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth - 1):
            layers.append(nn.Linear(features, width, bias=not use_bn))  # BatchNorm's shift replaces the bias
            if use_bn:
                layers.append(nn.BatchNorm1d(width))
            layers.append(make_activation(activation))
            if dropout:
                layers.append(nn.Dropout(dropout))
            features = width
        layers.append(nn.Linear(features, num_classes))
        super().__init__(*layers)


def build(*, num_classes: int, input_shape: tuple[int, ...], depth: int = 3, width: int = 128,
          activation: str = "relu", batch_norm: bool = False, dropout: float = 0.0) -> MLP:
    """Registry builder: any input shape (flattened)."""
    return MLP(math.prod(input_shape), num_classes, depth=depth, width=width, activation=activation,
               batch_norm=batch_norm, dropout=dropout)


def build_universal_sam(*, num_classes: int, input_shape: tuple[int, ...], batch_norm: bool = False,
                        dropout: float = 0.0) -> MLP:
    """Registry builder of ``"mlp6"``: :class:`MLP` with ``UNIVERSAL_SAM_MNIST`` (6 Linear, 128, ReLU)."""
    return build(num_classes=num_classes, input_shape=input_shape, batch_norm=batch_norm, dropout=dropout,
                 **UNIVERSAL_SAM_MNIST)  # type: ignore[arg-type]
