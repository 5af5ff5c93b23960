"""SALR's normalized descent/ascent walk (Definition 1, Algorithm 2) in offset form, for the measures.

:func:`sharpness.measures.salr_sharpness_hat` and ``salr_stochastic_sharpness`` apply the offsets with
``shifted_parameters``. :class:`sharpness.optim.SALR` walks the live weights instead (``w <- w + sign gamma d``,
no offset buffer); tests check that both give the same ``S_hat`` (float64, to rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _foreach
from ._foreach import group_by_device_dtype

__all__: list[str] = []

Direction = Callable[[list[Tensor]], Sequence[Tensor]]


def normalized_walk_(offset: list[Tensor], direction_at: Direction, gamma: float, steps: int,
                     sign: float) -> list[Tensor]:
    """Walk ``e_{i+1} = e_i + sign * gamma * d(w + e_i)`` for ``steps`` steps from ``e_0 = 0``, in place.

    Args:
        offset: parameter-shaped buffers receiving ``e`` (zeroed first; no allocation here).
        direction_at: ``e -> d(w + e)``, the (already normalized) step direction at ``w + e``.
        gamma: step length ``> 0``; sign: ``+1`` ascent, ``-1`` descent.

    Returns ``offset``.
    """
    for (bucket,) in group_by_device_dtype(offset):
        _foreach.zero_(bucket)
    for _ in range(steps):
        for e, x in group_by_device_dtype(offset, list(direction_at(offset))):
            _foreach.add_(e, x, alpha=sign * gamma)
    return offset


def per_sample_inverse_norms(grads: Sequence[Tensor]) -> Tensor:
    """``1 / ||g_j||`` of per-sample gradients (``grads``: one ``[B, *p.shape]`` tensor per parameter), float64,
    shape ``[B]``; 0 where ``g_j = 0`` (that sample adds nothing to Algorithm 2's mean of normalized gradients)."""
    sq = sum(g.flatten(1).to(torch.float64).square().sum(1) for g in grads)  # ||g_j||^2
    return torch.where(sq > 0, sq.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
