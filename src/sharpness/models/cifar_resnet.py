"""He et al.'s CIFAR ResNets, ResNet-(6n+2): ResNet-20, 32, 44, 56, 110 (He et al., 2016, section 4.2).

A 3x3 convolution of 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels on 32x32,
16x16 and 8x8 maps, global average pooling and one Linear layer. The AE-SAM paper's label-noise study
(its Figure 11) trains ResNet-32 with these. Shortcuts are the paper's option A by default: the identity,
and where a stage starts, the input subsampled by 2 between zero channels (no parameters), which gives
the published sizes: 0.27M (ResNet-20), 0.46M (ResNet-32), 0.85M (ResNet-56), 1.7M (ResNet-110) for 10
classes. Option B projects with a 1x1 convolution and BatchNorm instead.

This is not :mod:`.resnet`'s ResNet-18, the ImageNet design with a 3x3 stem (64 to 512 channels, 11.2M).

Reference: K. He, X. Zhang, S. Ren, J. Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_choice, check_int_at_least
from ._layers import batch_norm as make_norm
from ._layers import check_bool, check_input_shape, residual_stages
from .resnet import BasicBlock

__all__ = ["CifarResNet"]

SHORTCUTS = ("A", "B")


class CifarResNet(nn.Module):
    """ResNet-``depth`` for CIFAR: ``depth = 6n + 2`` (20, 32, 44, 56, 110, 1202).

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
        super().__init__()
        depth = check_int_at_least("depth", depth, 8)
        if (depth - 2) % 6:
            raise ValueError(f"Invalid depth value: {depth} (expected depth = 6n + 2 with n >= 1: 8, 20, 32, "
                             "44, 56, 110...)")
        shortcut = check_choice("shortcut", shortcut, SHORTCUTS)
        batch_norm = check_bool("batch_norm", batch_norm)
        per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=not batch_norm),
                                  make_norm("2d", 16, batch_norm), nn.ReLU())
        self.stages, channels = residual_stages(
            [[width] * per_stage for width in (16, 32, 64)],
            lambda c_in, c_out, stride: BasicBlock(c_in, c_out, stride, batch_norm, shortcut), 16)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))  # (B, C, H, W) -> (B, num_classes)


def build(*, num_classes: int, input_shape: tuple[int, ...], depth: int = 32, shortcut: str = "A",
          batch_norm: bool = True) -> CifarResNet:
    """Registry builder: ``(C, H, W)`` images (designed for 32x32); defaults to ResNet-32, option A."""
    check_input_shape("cifar_resnet", input_shape, (3,), "(C, H, W)")
    return CifarResNet(num_classes, depth=depth, shortcut=shortcut, in_channels=input_shape[0],
                       batch_norm=batch_norm)
