"""ASAM's scale-invariant perturbation (Kwon et al., ICML 2021, eq. 9)."""

from __future__ import annotations

import torch

from .. import _foreach
from .._foreach import global_norm, group_by_device_dtype
from .._validation import check_bool, check_non_negative
from .base import ParamGroupView, PerturbationRule
from .sam import climb_

__all__ = ["ASAMPerturbation"]


class ASAMPerturbation(PerturbationRule):
    r"""``e(w) = rho * T_w^2 g / (||T_w g|| + eps)`` with ``T_w = diag(|w| + eta)``.

    Args:
        eta: offset keeping the normalization away from zero (paper: 0.01). ``eta=0`` gives the
            ``pytorch-optimizer`` ``SAM(adaptive=True)`` rule.
        adaptive_1d: when False, one-dimensional parameters (biases, normalization weights) use ``T = 1``,
            as the official ASAM code does for parameters that are not weights.
        eps: guards the division for a zero gradient.

    Reference: J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
    """

    name = "asam"

    def __init__(self, *, eta: float = 0.01, adaptive_1d: bool = True, eps: float = 1e-12) -> None:
        self.eta = check_non_negative("eta", eta)
        self.adaptive_1d = check_bool("adaptive_1d", adaptive_1d)
        self.eps = check_non_negative("eps", eps)

    def _scales_(self, scales: list[torch.Tensor]) -> None:
        """``T_w = |w| + eta`` in place: ``scales`` holds a copy of (or is) the weights on entry."""
        _foreach.abs_(scales)
        if self.eta:
            _foreach.add_(scales, self.eta)
        if not self.adaptive_1d:
            for t in scales:
                if t.dim() <= 1:
                    t.fill_(1)

    @_foreach.no_grad
    def perturb_(self, views: list[ParamGroupView], *, grad_sq_norm: torch.Tensor | None = None) -> None:
        # ||g||^2 is not what ASAM normalizes by (it needs ||T_w g||), so grad_sq_norm is unused.
        # T_w is built in the parameters themselves when the engine hands over its backup (view.origin): the
        # weights are rebuilt as origin + e at the end, so ASAM keeps no buffer beyond SAM's backup.
        buckets = []  # (group, params, grads, T, origin) per (group, device, dtype)
        for view in views:
            origin = view.origin if view.origin is not None else [None] * len(view.params)
            for params, grads, orig in group_by_device_dtype(view.params, view.grads, origin):
                if orig[0] is None:  # called on its own: T_w in temporaries, the weights untouched
                    scales, orig = [p.clone() for p in params], None
                else:
                    scales = params
                self._scales_(scales)
                _foreach.mul_(grads, scales)  # grads <- T g
                buckets.append((view.group, params, grads, scales, orig))
        if not buckets:
            return
        # ||T_w g||, over the views' own lists: the buckets hold a DTensor's local shard, the views the DTensor
        norm = global_norm([g for view in views for g in view.grads])
        for _, params, grads, scales, orig in buckets:
            _foreach.mul_(grads, scales)  # grads <- T^2 g (the unnormalized e(w))
            if orig is not None:
                _foreach.copy_(params, orig)  # the parameters were T_w: back to w
        # w <- w + rho T^2 g / (||T_w g|| + eps): SAM's climb along T^2 g (one fused pass on the CPU; on a
        # device two fused kernels and no host read)
        climb_([ParamGroupView(group, params, grads) for group, params, grads, _, _ in buckets], norm, self.eps)

    def extra_repr(self) -> str:
        return f"eta={self.eta}, adaptive_1d={self.adaptive_1d}, eps={self.eps}"
