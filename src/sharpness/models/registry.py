"""A registry of models by name: ``create_model(name, num_classes=..., input_shape=..., **options)``.

Example::

    from sharpness.models import create_model, list_models

    for info in list_models():
        print(info.name, "-", info.description, dict(info.options))
    model = create_model("wideresnet", num_classes=10, input_shape=(3, 32, 32), depth=28, widen_factor=10)
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from . import (
    allcnn,
    char_lstm,
    cifar_resnet,
    cnn1d,
    lenet,
    mlp,
    mobilenetv2,
    pyramidnet,
    regnet,
    resnet,
    resnext,
    vit,
    wideresnet,
)

__all__ = ["ModelInfo", "create_model", "get_model_info", "list_models", "register_model"]


@dataclass(frozen=True)
class ModelInfo:
    """One registered model: its name, builder, one-line description and options with their defaults."""

    name: str
    description: str
    builder: Callable[..., nn.Module]
    options: Mapping[str, Any]


_REGISTRY: dict[str, ModelInfo] = {}
_BUILDER_ARGUMENTS = ("num_classes", "input_shape")


def _key(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"Invalid model name type: {type(name).__name__} (expected str)")
    return name.lower().replace("-", "_")


def register_model(name: str, builder: Callable[..., nn.Module], *, description: str) -> ModelInfo:
    """Register ``builder(num_classes=..., input_shape=..., **options)`` as ``name``; returns its record."""
    key = _key(name)
    if key in _REGISTRY:
        raise ValueError(f"Model name already registered: {key!r}")
    parameters = inspect.signature(builder).parameters
    missing = [arg for arg in _BUILDER_ARGUMENTS if arg not in parameters]
    if missing:
        raise TypeError(f"Model builder for {key!r} lacks the keyword argument(s) {missing}")
    options = {arg: p.default for arg, p in parameters.items() if arg not in _BUILDER_ARGUMENTS}
    info = ModelInfo(name=key, description=description, builder=builder, options=MappingProxyType(options))
    _REGISTRY[key] = info
    return info


def list_models() -> list[ModelInfo]:
    """All registered models, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_model_info(name: str) -> ModelInfo:
    """The record of the model registered as ``name``; an unknown name raises ``ValueError`` listing all."""
    key = _key(name)
    if key not in _REGISTRY:
        raise ValueError(f"Unknown model name: {name!r} (expected one of {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[key]


def _check_shape(input_shape: object) -> tuple[int, ...]:
    if not isinstance(input_shape, (tuple, list)) or not all(
            isinstance(size, numbers.Integral) and not isinstance(size, bool) for size in input_shape):
        raise TypeError(f"Invalid input_shape type: {input_shape!r} "
                        "(expected a tuple of integers, e.g. (3, 32, 32))")
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"Invalid input_shape value: {tuple(input_shape)} (expected one or more sizes >= 1)")
    return tuple(int(size) for size in input_shape)


def create_model(name: str, *, num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
    """Build the model registered as ``name`` for inputs of ``input_shape`` (no batch dimension).

    Args:
        name: a registered name, see :func:`list_models`.
        num_classes: number of outputs (for ``char_lstm``: the vocabulary size), >= 1.
        input_shape: shape of one input, e.g. ``(3, 32, 32)``, ``(40,)`` or ``(block_size,)``; a data set's
            ``DatasetSplits.input_shape`` fits.
        **options: the model's own options (``get_model_info(name).options`` lists them with defaults).

    Models return logits with the class dimension second: ``(B, num_classes)``, or ``(B, V, T)`` for
    ``char_lstm``, so ``nn.CrossEntropyLoss()(model(x), y)`` works for all of them.
    """
    info = get_model_info(name)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown} for model {info.name!r} "
                        f"(valid options: {', '.join(info.options) or 'none'})")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"Invalid num_classes type: {type(num_classes).__name__} (expected an integer >= 1)")
    if num_classes < 1:
        raise ValueError(f"Invalid num_classes value: {num_classes} (expected num_classes >= 1)")
    return info.builder(num_classes=int(num_classes), input_shape=_check_shape(input_shape), **options)


register_model("mlp", mlp.build,
               description="fully connected net: depth Linear layers (default 3), width units (default 128)")
register_model("mlp6", mlp.build_universal_sam,
               description="the universal-SAM MNIST net: MLP of 6 Linear layers, 128 units, ReLU")
register_model("lenet5", lenet.build,
               description="LeNet-5: two 5x5 conv + pool, FC 120-84 (small images padded to 32)")
register_model("cnn1d", cnn1d.build,
               description="three strided Conv1d + linear, for MNIST-1D (the default job's model)")
register_model("resnet18", resnet.build,
               description="ResNet-18, CIFAR variant (3x3 stem, no max pool), 11.2M parameters (10 classes)")
register_model("resnet", resnet.build_by_depth,
               description="ResNet-depth (18, 34, 50, 101, 152), CIFAR variant, default ResNet-50 (23.5M "
                           "parameters for 10 classes; ResNet-101 42.5M)")
register_model("resnext", resnext.build,
               description="ResNeXt-29 for CIFAR (Xie et al.), default 8x64d (34.4M parameters for 10 classes; "
                           "16x64d 68.2M)")
register_model("cifar_resnet", cifar_resnet.build,
               description="He et al.'s CIFAR ResNet-(6n+2), default ResNet-32 (0.46M parameters, "
                           "zero-padded shortcuts)")
register_model("pyramidnet", pyramidnet.build,
               description="PyramidNet, default PyramidNet-110 with alpha 270 (28.5M parameters for 10 classes)")
register_model("vit", vit.build,
               description="Vision Transformer, default ViT-S (384 wide, 12 layers, 6 heads) on 4x4 patches")
register_model("wideresnet", wideresnet.build,
               description="Wide ResNet WRN-depth-k, default WRN-28-10 (36.5M parameters for 10 classes)")
register_model("allcnn", allcnn.build,
               description="All-CNN-C with BatchNorm (All-CNN-BN) as in Entropy-SGD, dropout 0.2/0.5 "
                           "(1.67M parameters for 10 classes)")
register_model("mobilenetv2", mobilenetv2.build,
               description="MobileNetV2, CIFAR strides (stem and second stage stride 1), width_mult 1.0 "
                           "(2.24M parameters for 10 classes)")
register_model("regnetx", regnet.build,
               description="RegNetX, CIFAR stem (3x3, 64 channels, stride 1), default 200MF (2.32M parameters "
                           "for 10 classes)")
register_model("char_lstm", char_lstm.build,
               description="character LSTM language model: embedding, LSTM, linear; logits (B, vocab, T)")
