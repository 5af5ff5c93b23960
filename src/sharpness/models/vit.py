"""Vision Transformer (Dosovitskiy et al., ICLR 2021), ViT-S by default: the AE-SAM paper's fourth CIFAR
architecture (ViT-S16, 1200 epochs) and the GNR paper's ViTs.

Non-overlapping ``patch_size`` patches are embedded by one strided convolution, a learned class token and
learned position embeddings are added, ``depth`` pre-norm encoder layers (``nn.TransformerEncoderLayer``:
multi-head self-attention and a GELU MLP, each behind LayerNorm with a residual connection) follow, and the
class token's final LayerNorm feeds the Linear head. ViT-S is 384 wide with 12 layers of 6 heads and an MLP
of 4 x 384; on 224x224 images with ``patch_size=16`` (ViT-S/16) it has 22,050,664 parameters for 1,000
classes, as timm's ``vit_small_patch16_224``. On 32x32 CIFAR images 16-pixel patches leave 4 tokens, so the
default here is 4-pixel patches (64 tokens); set ``patch_size=16`` (and upsampled inputs) for the ImageNet
recipe. The AE-SAM paper does not say which it used.

Each encoder layer is built on its own (``nn.TransformerEncoder`` would deep-copy one layer, so every layer
would start from the same weights). Attention runs through ``F.scaled_dot_product_attention``; the
optimizers and measures that differentiate twice select its math kernel themselves
(``sharpness._attention``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import check_int_at_least, check_positive
from ._layers import check_dropout, check_input_shape

__all__ = ["ViT"]


class ViT(nn.Module):
    """ViT on ``(C, H, W)`` images whose sides are multiples of ``patch_size``.

    Args:
        num_classes: outputs (logits).
        image_size: ``(H, W)`` of the inputs (position embeddings are learned per patch).
        in_channels: image channels.
        patch_size: side of the square patches (4 by default, for 32x32 images; 16 for ViT-S/16 at 224).
        dim: embedding width (ViT-S 384, ViT-B 768).
        depth: encoder layers (12).
        heads: attention heads (ViT-S 6, ViT-B 12); ``dim`` must be a multiple.
        mlp_ratio: MLP width over ``dim`` (4).
        dropout: dropout in the attention weights and MLP, ``0 <= dropout < 1``.

    Position embeddings and the class token start from a normal distribution truncated at 2 standard
    deviations (std 0.02); every other weight keeps PyTorch's default initialisation.
    """

    def __init__(self, num_classes: int, *, image_size: tuple[int, int], in_channels: int = 3, patch_size: int = 4,
                 dim: int = 384, depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        patch_size = check_int_at_least("patch_size", patch_size, 1)
        dim = check_int_at_least("dim", dim, 1)
        depth = check_int_at_least("depth", depth, 1)
        heads = check_int_at_least("heads", heads, 1)
        mlp_ratio = check_positive("mlp_ratio", mlp_ratio)
        dropout = check_dropout(dropout)
        if dim % heads:
            raise ValueError(f"Invalid heads value: {heads} (expected a divisor of dim = {dim})")
        height, width = image_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"Invalid patch_size value: {patch_size} (expected a divisor of the image's height "
                             f"and width, {height} x {width})")
        tokens = (height // patch_size) * (width // patch_size)
        hidden = max(1, round(dim * mlp_ratio))
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.encoder = nn.Sequential(*(
            nn.TransformerEncoderLayer(dim, heads, hidden, dropout, activation="gelu", layer_norm_eps=1e-6,
                                       batch_first=True, norm_first=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, dim)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], 1) + self.pos_embed
        return self.fc(self.norm(self.encoder(tokens)[:, 0]))  # the class token -> (B, num_classes)


def build(*, num_classes: int, input_shape: tuple[int, ...], patch_size: int = 4, dim: int = 384, depth: int = 12,
          heads: int = 6, mlp_ratio: float = 4.0, dropout: float = 0.0) -> ViT:
    """Registry builder: ``(C, H, W)`` images; defaults to ViT-S on 4x4 patches."""
    check_input_shape("vit", input_shape, (3,), "(C, H, W)")
    return ViT(num_classes, image_size=(input_shape[1], input_shape[2]), in_channels=input_shape[0],
               patch_size=patch_size, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)
