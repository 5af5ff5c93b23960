"""SAM's perturbation: the normalized gradient scaled to radius rho (Foret et al., ICLR 2021, eq. 2)."""

from __future__ import annotations

import torch

from .. import _foreach
from .._foreach import global_norm, group_by_device_dtype
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
        """``g <- g / (||g|| + eps)`` then ``w <- w + rho g``, in place (the gradients are overwritten, as the
        rule contract allows): three 0-d kernels and two fused list ops, no host synchronisation."""
        grads = [g for view in views for g in view.grads]
        if grads:
            self.climb_(views, global_norm(grads) if grad_sq_norm is None else grad_sq_norm.sqrt())

    def climb_(self, views: list[ParamGroupView], norm: torch.Tensor) -> None:
        """``w <- w + rho g / (norm + eps)`` for a given ``norm`` (a 0-d tensor); overwrites the gradients."""
        denom = norm + self.eps  # a 0-d tensor: the division below needs no host read
        for view in views:
            if not view.params:
                continue
            rho = view.group["rho"]
            for params, group_grads in group_by_device_dtype(view.params, view.grads):
                _foreach.div_(group_grads, denom.to(device=params[0].device, dtype=params[0].dtype))
                if isinstance(rho, torch.Tensor):  # a tensor-valued rho (scheduled like a tensor lr)
                    _foreach.mul_(group_grads, rho.to(device=params[0].device, dtype=params[0].dtype))
                    _foreach.add_(params, group_grads)
                else:
                    _foreach.add_(params, group_grads, alpha=rho)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
