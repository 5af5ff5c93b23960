"""He et al.'s CIFAR ResNets, ResNet-(6n+2): ResNet-20, 32, 44, 56, 110 (He et al., 2016, section 4.2).

A 3x3 convolution of 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels on 32x32,
16x16 and 8x8 maps, global average pooling and one Linear layer. The AE-SAM paper's label-noise study
(its Figure 11) trains ResNet-32 with these. Shortcuts are the paper's option A by default: the identity,
and where a stage starts, the input subsampled by 2 between zero channels (no parameters), which gives
the published sizes: 0.27M (ResNet-20), 0.46M (ResNet-32), 0.85M (ResNet-56), 1.7M (ResNet-110) for 10
classes. Option B projects with a 1x1 convolution and BatchNorm instead.

The same :class:`.resnet.ResNet` as ``resnet18`` (four stages of 64 to 512 channels, 11.2M), with three
stages from 16 channels.

Reference: K. He, X. Zhang, S. Ren, J. Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
"""

from __future__ import annotations

from torch import nn

from .._validation import check_choice
from ._layers import blocks_per_stage, check_bool, check_input_shape
from .resnet import ResNet

__all__ = ["CifarResNet"]

SHORTCUTS = ("A", "B")


class CifarResNet(ResNet):
    """ResNet-``depth`` for CIFAR: ``depth = 6n + 2`` (20, 32, 44, 56, 110, 1202), i.e. :class:`ResNet` with
    three stages of ``n`` blocks, a width of 16 and (by default) option A shortcuts.

    Weights are initialised He-normal (fan-in) for the convolutions and the Linear layer, as in the paper
    (its reference [13]); BatchNorm starts at scale 1, shift 0.

    Args:
        num_classes: outputs (logits).
        depth: ``6n + 2`` weighted layers, ``n`` >= 1 blocks per stage.
        shortcut: ``"A"`` (zero-padded identity, the paper's CIFAR choice) or ``"B"`` (1x1 projection + BN
            where the shape changes).
        in_channels: image channels.
        batch_norm: BatchNorm after every convolution (``False``: convolutions get biases instead).
    """

    def __init__(self, num_classes: int, *, depth: int = 32, shortcut: str = "A", in_channels: int = 3,
                 batch_norm: bool = True) -> None:
        per_stage = blocks_per_stage(depth, 2, "8, 20, 32, 44, 56, 110...")
        super().__init__((per_stage,) * 3, num_classes, in_channels=in_channels, width=16,
                         batch_norm=check_bool("batch_norm", batch_norm),
                         shortcut=check_choice("shortcut", shortcut, SHORTCUTS))
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)


def build(*, num_classes: int, input_shape: tuple[int, ...], depth: int = 32, shortcut: str = "A",
          batch_norm: bool = True) -> CifarResNet:
    """Registry builder: ``(C, H, W)`` images (designed for 32x32); defaults to ResNet-32, option A."""
    check_input_shape("cifar_resnet", input_shape, (3,), "(C, H, W)")
    return CifarResNet(num_classes, depth=depth, shortcut=shortcut, in_channels=input_shape[0],
                       batch_norm=batch_norm)
