"""SAM's perturbation: the normalized gradient scaled to radius rho (Foret et al., ICLR 2021, eq. 2)."""

from __future__ import annotations

import torch

from .. import _foreach
from .._foreach import group_by_device_dtype, squared_norm
from .._validation import check_non_negative
from .base import ParamGroupView, PerturbationRule

__all__ = ["SAMPerturbation"]


class SAMPerturbation(PerturbationRule):
    r"""``e(w) = rho * g / (||g|| + eps)`` with ``g`` the gradient at ``w``.

    ``||g||`` is the global L2 norm over every parameter that has a gradient (all groups); each group uses its
    own ``rho``. A zero gradient gives ``e = 0`` (never NaN). ``eps`` only guards the division.

    Reference: P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for Efficiently
    Improving Generalization. ICLR 2021.
    """

    name = "sam"

    def __init__(self, *, eps: float = 1e-12) -> None:
        self.eps = check_non_negative("eps", eps)

    @torch.no_grad()
    def perturb_(self, views: list[ParamGroupView], *, grad_sq_norm: torch.Tensor | None = None) -> None:
        grads = [g for view in views for g in view.grads]
        if not grads:
            return
        norm = (squared_norm(grads) if grad_sq_norm is None else grad_sq_norm).sqrt()
        for view in views:
            if not view.params:
                continue
            # scale = rho / (||g|| + eps): a 0-d tensor, so no host synchronisation.
            scale = (view.group["rho"] / (norm + self.eps))
            for params, group_grads in group_by_device_dtype(view.params, view.grads):
                s = scale.to(device=params[0].device, dtype=params[0].dtype)
                # climb to w + e(w) in one fused pass over memory: w <- w + s * g (s a 0-d tensor, no sync)
                _foreach.addcmul_(params, group_grads, [s] * len(params))

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
