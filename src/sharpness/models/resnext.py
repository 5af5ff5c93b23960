"""ResNeXt-29 for CIFAR (Xie et al., CVPR 2017, section 5.3 and Table 7): bottleneck blocks whose 3x3
convolution is split into ``cardinality`` groups.

A 3x3 convolution of 64 channels, three stages of ``n = (depth - 2) / 9`` bottleneck blocks with 256, 512 and
1024 output channels on 32x32, 16x16 and 8x8 maps, global average pooling and one Linear layer. In stage ``i``
(0, 1, 2) a block reduces to ``C * d * 2**i`` channels (1x1), convolves them in ``C`` groups (3x3, the stride
in the first block of stages 1 and 2), and expands to ``256 * 2**i`` (1x1); shortcuts are 1x1 projections with
BatchNorm where the shape changes. This is the authors' block form (c) (facebookresearch/ResNeXt,
``resnext_bottleneck_C`` with shortcut type B), the form prlz77/ResNeXt.pytorch ports.

The same :class:`.resnet.ResNet` and :class:`.resnet.Bottleneck` as ``resnet`` (``groups=C``,
``base_width=d``, three stages from 64 planes). ResNeXt-29 8x64d has 34,426,698 parameters for 10 classes
(Table 7: 34.4M) and 34,518,948 for 100; 16x64d has 68,155,210 for 10 classes (Table 7: 68.1M).

Reference: S. Xie, R. Girshick, P. Dollar, Z. Tu, K. He. Aggregated Residual Transformations for Deep Neural
Networks. CVPR 2017.
"""

from __future__ import annotations

from torch import nn

from .._validation import check_int_at_least
from ._layers import blocks_per_stage, check_bool, check_input_shape, init_conv_bn_
from .resnet import Bottleneck, ResNet

__all__ = ["ResNeXt"]


class ResNeXt(ResNet):
    """ResNeXt-``depth`` ``C`` x ``d``: :class:`ResNet` with three stages of ``(depth - 2) / 9``
    :class:`Bottleneck` blocks of cardinality ``C`` and bottleneck width ``d``, from a 64-channel stem.

    Weights are initialised as in the authors' code: He-normal (fan-out) convolutions, BatchNorm at scale 1 and
    shift 0, zero Linear bias.

    Args:
        num_classes: outputs (logits).
        depth: ``9n + 2`` weighted layers (11, 20, 29, 38...), ``n`` >= 1 blocks per stage.
        cardinality: ``C``, groups of the 3x3 convolutions, >= 1.
        base_width: ``d``, channels per group in the first stage (doubled at each later stage), >= 1.
        in_channels: image channels.
        batch_norm: BatchNorm after every convolution (``False``: convolutions get biases instead).
    """

    def __init__(self, num_classes: int, *, depth: int = 29, cardinality: int = 8, base_width: int = 64,
                 in_channels: int = 3, batch_norm: bool = True) -> None:
        per_stage = blocks_per_stage(depth, 3, "11, 20, 29, 38...")
        super().__init__((per_stage,) * 3, num_classes, block=Bottleneck, in_channels=in_channels,
                         width=64, groups=check_int_at_least("cardinality", cardinality, 1),
                         base_width=check_int_at_least("base_width", base_width, 1),
                         batch_norm=check_bool("batch_norm", batch_norm))
        init_conv_bn_(self)
        nn.init.zeros_(self.fc.bias)


def build(*, num_classes: int, input_shape: tuple[int, ...], depth: int = 29, cardinality: int = 8,
          base_width: int = 64, batch_norm: bool = True) -> ResNeXt:
    """Registry builder: ``(C, H, W)`` images (designed for 32x32); defaults to ResNeXt-29 8x64d."""
    check_input_shape("resnext", input_shape, (3,), "(C, H, W)")
    return ResNeXt(num_classes, depth=depth, cardinality=cardinality, base_width=base_width,
                   in_channels=input_shape[0], batch_norm=batch_norm)
