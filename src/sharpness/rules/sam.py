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

    @_foreach.no_grad
    def perturb_(self, views: list[ParamGroupView], *, grad_sq_norm: torch.Tensor | None = None) -> None:
        """``w <- w + rho g / (||g|| + eps)`` in place (see :func:`climb_`); no host synchronisation."""
        grads = [g for view in views for g in view.grads]
        if grads:
            climb_(views, global_norm(grads) if grad_sq_norm is None else grad_sq_norm.sqrt(), self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def climb_(views: list[ParamGroupView], norm: torch.Tensor, eps: float) -> None:
    """``w <- w + rho g / (norm + eps)`` for each view (``rho`` its group's) and a given ``norm`` (a 0-d tensor);
    may overwrite the gradients. Shared by SAM, the masked rules, ASAM (which climbs along ``T^2 g``) and GNR
    (along ``H g``, to ``w_adv``).

    On a device (CUDA, ...): ``g <- g / (norm + eps)``, then ``w <- w + rho g``: two fused list kernels
    and no host read. On the CPU, where reading the 0-d norm waits for nothing, the scale is read and the
    climb is one fused pass, ``w <- w + (rho / (norm + eps)) g``, with the gradients left as they are (one
    read and one write of every gradient less: 1.8-2.5 x faster for the benchmark MLP's climb).
    """
    denom = _foreach.read_if_free(norm) + eps  # a float on the CPU, else a 0-d tensor: no host read
    for view in views:
        if not view.params:
            continue
        rho = view.group["rho"]
        for params, group_grads in group_by_device_dtype(view.params, view.grads):
            if not isinstance(denom, torch.Tensor):
                if denom != 0:  # (0 only for eps = 0 and g = 0, where e = 0; a NaN norm propagates, as on a device)
                    _foreach.add_scaled_(params, group_grads, rho / denom)
                continue
            _foreach.div_(group_grads, _foreach.like(denom, params[0]))
            if isinstance(rho, torch.Tensor):  # a tensor-valued rho (scheduled like a tensor lr)
                _foreach.mul_(group_grads, _foreach.like(rho, params[0]))
                _foreach.add_(params, group_grads)
            else:
                _foreach.add_(params, group_grads, alpha=rho)
