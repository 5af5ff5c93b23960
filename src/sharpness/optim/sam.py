"""SAM: sharpness-aware minimization (Foret et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..policies.always import Always
from ..rules.sam import SAMPerturbation
from .engine import SharpnessAwareOptimizer

__all__ = ["SAM"]


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-aware minimization: descend with the gradient taken at the worst nearby point.

    Update rule (per step, ``g = grad L_B(w)``):

    .. math::
        e(w) = \rho \frac{g}{\|g\| + \epsilon}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L_B(w + e(w))\big)

    Two gradient evaluations per step. ``rho=0`` reproduces the base optimizer exactly.

    Args:
        params_or_base: a base optimizer instance, e.g. ``torch.optim.SGD(model.parameters(), lr=0.1)``;
            or parameters together with ``base_class`` and its keyword options (davda54 form).
        base_class: optimizer class for the davda54 form ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)``.
        rho: neighbourhood radius (>= 0; paper grid {0.01, 0.02, 0.05, 0.1, 0.2, 0.5}); per group as ``rho``.
        eps: guards the normalization for a zero gradient.
        **kwargs: engine options (``model``, ``grad_scaler``, ``max_grad_norm``, ``sync_perturbation``, see
            :class:`SharpnessAwareOptimizer`) and, in the davda54 form, the base optimizer's options.

    Example::

        opt = sharpness.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)

    Reference: P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for Efficiently
    Improving Generalization. ICLR 2021.
    """

    supports_complex: ClassVar[bool] = True  # equal to the real view (tested)
    min_grad_evals_per_step = 2
    max_grad_evals_per_step = 2
    description = "SAM: gradient at w + rho g/||g|| every step (Foret et al., 2021)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.05, eps: float = 1e-12,
                 **kwargs: Any) -> None:
        super().__init__(params_or_base, base_class, rule=SAMPerturbation(eps=eps), policy=Always(), rho=rho,
                         **kwargs)
