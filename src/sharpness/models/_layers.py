"""Small building blocks shared by the models: activations by name, normalisation on/off, shape checks."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_int_at_least

__all__: list[str] = []

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,  # a deep linear network
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation name: {name!r} "
                         f"(expected one of {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]()


def batch_norm(kind: str, features: int, enabled: bool) -> nn.Module:
    """``BatchNorm1d``/``BatchNorm2d`` over ``features`` channels, or ``Identity`` when disabled."""
    if not enabled:
        return nn.Identity()
    return nn.BatchNorm1d(features) if kind == "1d" else nn.BatchNorm2d(features)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name} type: {type(value).__name__} (expected bool)")
    return value


def check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid dropout type: {type(value).__name__} (expected a real number)")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"Invalid dropout value: {value} (expected 0 <= dropout < 1)")
    return value


def blocks_per_stage(depth: object, layers_per_block: int, examples: str) -> int:
    """``n`` of a three-stage CIFAR network of ``depth = 3 * layers_per_block * n + 2`` weighted layers (He et
    al.'s ResNets 6n + 2, ResNeXt-29 and bottleneck PyramidNets 9n + 2); ``examples`` lists valid depths for
    the error."""
    per_block = 3 * layers_per_block
    depth = check_int_at_least("depth", depth, per_block + 2)
    if (depth - 2) % per_block:
        raise ValueError(f"Invalid depth value: {depth} (expected depth = {per_block}n + 2 with n >= 1: {examples})")
    return (depth - 2) // per_block


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
            groups: int = 1) -> list[nn.Module]:
    """A convolution without bias ('same' padding for odd kernels) and its BatchNorm, as a list to splice into
    an ``nn.Sequential`` (MobileNetV2, RegNet)."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                      groups=groups, bias=False), nn.BatchNorm2d(out_channels)]


def check_input_shape(model: str, input_shape: tuple[int, ...], ranks: tuple[int, ...], meaning: str) -> None:
    """Raise ``ValueError`` unless ``len(input_shape)`` is one of ``ranks``."""
    if len(input_shape) not in ranks:
        raise ValueError(f"Invalid input_shape for {model!r}: {input_shape} (expected {meaning})")


def residual_stages(widths: list[list[int]], make_block: Callable[[int, int, int], nn.Module], in_channels: int,
                    expansion: int = 1) -> tuple[nn.Sequential, int]:
    """Stages of residual blocks and their output channels: ``widths[i][j]`` is block ``j`` of stage ``i``,
    built as ``make_block(in_channels, width, stride)`` with stride 2 at the first block of every stage after
    the first; a block outputs ``expansion * width`` channels."""
    stages, channels = [], in_channels
    for index, stage in enumerate(widths):
        blocks = []
        for position, width in enumerate(stage):
            blocks.append(make_block(channels, width, 2 if index > 0 and position == 0 else 1))
            channels = expansion * width
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), channels


def init_conv_bn_(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions, BatchNorm at scale 1 and shift 0, as the WRN and PyramidNet authors'
    code initialises them."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ZeroPadShortcut(nn.Module):
    """A parameter-free shortcut to ``extra`` more channels: ``x`` downsampled by ``stride`` (``pool="subsample"``,
    every ``stride``-th pixel, He et al.'s option A; ``"average"``, ``stride`` x ``stride`` average pooling, odd
    maps rounded up, PyramidNet's), then zero channels, split evenly before and after it (``centre=True``, the
    layout of the widely used PyTorch CIFAR ResNets, so their weights load in order) or appended (PyramidNet).
    Either way the map size is the 3x3 stride-``stride`` convolution's, ``ceil(H / stride)``."""

    def __init__(self, stride: int, extra: int, *, pool: str = "subsample", centre: bool = True) -> None:
        super().__init__()
        self.stride, self.extra, self.pool, self.centre = stride, extra, pool, centre

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = (x[:, :, ::self.stride, ::self.stride] if self.pool == "subsample"
                 else F.avg_pool2d(x, self.stride, ceil_mode=True))
        if not self.extra:
            return x
        before = self.extra // 2 if self.centre else 0
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))  # (B, C, H, W) -> (B, C + extra, H, W)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra={self.extra}, pool={self.pool}, centre={self.centre}"
