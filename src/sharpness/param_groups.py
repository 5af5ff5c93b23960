"""Param groups for the base optimizer: weight decay on matrices and kernels only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["weight_decay_groups"]


def weight_decay_groups(params: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into a group with ``weight_decay`` and a group without it.

    Parameters with at most one dimension (biases, the scales and shifts of BatchNorm/LayerNorm/GroupNorm)
    get weight decay 0; the rest (linear and convolution weights, embeddings, ViT's position embedding) get
    ``weight_decay``. This is the rule of nanoGPT and of timm's ViT recipes. Parameters that do not require a
    gradient are left out; an empty group is dropped. Give the result to the base optimizer::

        base = torch.optim.AdamW(sharpness.weight_decay_groups(model, 0.05), lr=1e-3)
        opt = sharpness.SAM(base, rho=0.05)

    The groups keep the parameters' order within each group (decayed first), so a seeded method draws the
    same numbers for the same groups.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (expected weight_decay >= 0)")
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    trainable = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": float(weight_decay)},
              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
