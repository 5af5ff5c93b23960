"""ASAM's scale-invariant perturbation (Kwon et al., ICML 2021, eq. 9)."""

from __future__ import annotations

import torch

from .. import _foreach
from .._foreach import group_by_device_dtype, squared_norm
from .._validation import check_non_negative
from .base import ParamGroupView, PerturbationRule

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
        self.adaptive_1d = bool(adaptive_1d)
        self.eps = check_non_negative("eps", eps)

    needs_scratch = True

    def _scales(self, params: list[torch.Tensor], out: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """``T_w = |w| + eta`` written into ``out`` (the engine's preallocated buffers) when given."""
        if out is None:
            scales = [p.abs() for p in params]
        else:
            scales = list(out)
            _foreach.copy_(scales, params)
            _foreach.abs_(scales)
        if self.eta:
            _foreach.add_(scales, self.eta)
        if not self.adaptive_1d:
            for i, p in enumerate(params):
                if p.dim() <= 1:
                    scales[i].fill_(1)
        return scales

    @torch.no_grad()
    def perturb_(self, views: list[ParamGroupView], *, grad_sq_norm: torch.Tensor | None = None) -> None:
        # ||g||^2 is not what ASAM normalizes by (it needs ||T_w g||), so grad_sq_norm is unused.
        buckets = []  # (group, params, grads, T) per (group, device, dtype)
        for view in views:
            scratch = view.scratch if view.scratch is not None else [None] * len(view.params)
            for params, grads, out in group_by_device_dtype(view.params, view.grads, scratch):
                scales = self._scales(params, None if out[0] is None else out)
                _foreach.mul_(grads, scales)  # grads <- T g
                buckets.append((view.group, params, grads, scales))
        if not buckets:
            return
        norm = squared_norm([g for _, _, grads, _ in buckets for g in grads]).sqrt_()
        for group, params, grads, scales in buckets:
            s = (group["rho"] / (norm + self.eps)).to(device=params[0].device, dtype=params[0].dtype)
            _foreach.mul_(grads, scales)  # grads <- T^2 g
            _foreach.mul_(grads, s)  # grads <- e(w)
            _foreach.add_(params, grads)

    def extra_repr(self) -> str:
        return f"eta={self.eta}, adaptive_1d={self.adaptive_1d}, eps={self.eps}"
