"""All-CNN-C with BatchNorm ("All-CNN-BN"), the all-convolutional CIFAR network of the Entropy-SGD and SALR
experiments.

Springenberg et al.'s All-CNN-C replaces max pooling with stride-2 convolutions and the fully connected layers
with a 1x1 convolution to the classes and global average pooling. Chaudhari et al. (Entropy-SGD, 2017) add
BatchNorm and ReLU after every convolution; SALR (Yue et al.) follows their setting. ``layout="entropy_sgd"``
(the default) is their network, layer for layer as in ``ucla-vision/entropy-sgd`` (``python/models.py``,
class ``allcnn``)::

    dropout 0.2
    conv3x3  96, conv3x3  96, conv3x3  96 stride 2, dropout 0.5        (32 -> 16 pixels)
    conv3x3 192, conv3x3 192, conv3x3 192 stride 2, dropout 0.5        (16 -> 8)
    conv3x3 192, conv3x3 192, conv1x1 num_classes, global average pool

each convolution with padding 1 (0 for the 1x1), a bias, then BatchNorm and ReLU, the last one included: the
logits are averages of ReLU outputs, hence >= 0, in both references. 1,667,166 parameters for 10 classes
(1.67M; 1,684,716 for 100). ``layout="all_cnn_c"`` is Springenberg et al.'s Table 2 model C instead: the
seventh convolution unpadded (8 -> 6 pixels) and the eighth a 1x1 of 192 channels; with ``batch_norm=False``
that is the paper's network exactly, 1,369,738 parameters for 10 classes (the paper says 1.3M), 1,372,254 with
BatchNorm.

Weights keep PyTorch's default initialisation, as both reference implementations do (Chaudhari et al.'s code
sets none): uniform convolutions of bound ``1/sqrt(fan_in)`` (``kaiming_uniform_`` with ``a = sqrt(5)``),
BatchNorm at scale 1 and shift 0.

References: J. T. Springenberg, A. Dosovitskiy, T. Brox, M. Riedmiller. Striving for Simplicity: The All
Convolutional Net. ICLR 2015 workshop. P. Chaudhari et al. Entropy-SGD: Biasing Gradient Descent into Wide
Valleys. ICLR 2017.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_choice, check_int_at_least
from ._layers import batch_norm as make_norm
from ._layers import check_bool, check_dropout, check_input_shape

__all__ = ["AllCNN"]

LAYOUTS = ("entropy_sgd", "all_cnn_c")
DROPOUT = (0.2, 0.5)  # on the input, after each stride-2 block (Springenberg et al.; Chaudhari et al.)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                  batch_norm: bool) -> nn.Sequential:
    """Convolution (with a bias, as in both references), BatchNorm (or nothing), ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding),
                         make_norm("2d", out_channels, batch_norm), nn.ReLU())


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p else nn.Identity()


def _check_dropout_rates(value: object) -> tuple[float, float]:
    """``True`` (the references' rates 0.2 on the input, 0.5 after each stride-2 block), ``False`` (none)
    or a pair ``(input, block)`` of rates in ``[0, 1)``."""
    if isinstance(value, bool):
        return DROPOUT if value else (0.0, 0.0)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"Invalid dropout type: {type(value).__name__} {value!r} "
                        "(expected a bool or a pair of rates (input, block), e.g. (0.2, 0.5))")
    return check_dropout(value[0]), check_dropout(value[1])


class AllCNN(nn.Module):
    """All-CNN-C for 32x32 images, by default with BatchNorm as in Entropy-SGD (see the module docstring).

    Args:
        num_classes: outputs (logits, >= 0: the last convolution is followed by BN and ReLU).
        in_channels: image channels.
        width: channels of the first three convolutions (96); the others have ``2 * width`` (192).
        layout: ``"entropy_sgd"`` (Chaudhari et al.'s, all 3x3 but the last) or ``"all_cnn_c"``
            (Springenberg et al.'s: an unpadded 3x3 and a 1x1 before the class layer).
        batch_norm: BatchNorm after every convolution (the "BN" of All-CNN-BN).
        dropout: ``True`` (0.2 on the input, 0.5 after each stride-2 block), ``False``, or a pair of rates
            ``(input, block)``.
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, width: int = 96, layout: str = "entropy_sgd",
                 batch_norm: bool = True, dropout: bool | tuple[float, float] = True) -> None:
        super().__init__()
        width = check_int_at_least("width", width, 1)
        layout = check_choice("layout", layout, LAYOUTS)
        batch_norm = check_bool("batch_norm", batch_norm)
        input_rate, block_rate = _check_dropout_rates(dropout)
        c1, c2 = width, 2 * width

        def block(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Module:
            return _conv_bn_relu(c_in, c_out, kernel_size, stride, padding, batch_norm)

        tail = ([block(c2, c2), block(c2, c2)] if layout == "entropy_sgd"
                else [block(c2, c2, padding=0), block(c2, c2, kernel_size=1, padding=0)])
        self.features = nn.Sequential(
            _dropout(input_rate),
            block(in_channels, c1), block(c1, c1), block(c1, c1, stride=2), _dropout(block_rate),
            block(c1, c2), block(c2, c2), block(c2, c2, stride=2), _dropout(block_rate),
            *tail, block(c2, num_classes, kernel_size=1, padding=0))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # the references' AvgPool2d(8) at 32 px

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x))  # (B, C, H, W) -> (B, num_classes, H/4, W/4) -> (B, num_classes)


def build(*, num_classes: int, input_shape: tuple[int, ...], width: int = 96, layout: str = "entropy_sgd",
          batch_norm: bool = True, dropout: bool | tuple[float, float] = True) -> AllCNN:
    """Registry builder: ``(C, H, W)`` images (designed for 32x32; ``all_cnn_c`` needs >= 9 pixels a side,
    ``entropy_sgd`` any size); defaults to Chaudhari et al.'s All-CNN-BN with dropout."""
    check_input_shape("allcnn", input_shape, (3,), "(C, H, W)")
    if layout == "all_cnn_c" and min(input_shape[1:]) < 9:
        raise ValueError(f"Invalid input_shape for 'allcnn' with layout 'all_cnn_c': {input_shape} "
                         "(expected images of at least 9 x 9 pixels: its unpadded 3x3 convolution sees H/4)")
    return AllCNN(num_classes, in_channels=input_shape[0], width=width, layout=layout, batch_norm=batch_norm,
                  dropout=dropout)
