"""ASAM: adaptive (scale-invariant) SAM (Kwon et al., ICML 2021)."""

from __future__ import annotations

from typing import Any

from ..policies.always import Always
from ..rules.asam import ASAMPerturbation
from .engine import SharpnessAwareOptimizer

__all__ = ["ASAM"]


class ASAM(SharpnessAwareOptimizer):
    r"""Adaptive SAM: the neighbourhood is scaled by the weights, making sharpness scale-invariant.

    Update rule (``T_w = diag(|w| + eta)``, ``g = grad L_B(w)``):

    .. math::
        e(w) = \rho \frac{T_w^2 g}{\|T_w g\| + \epsilon}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L_B(w + e(w))\big)

    Args:
        params_or_base, base_class: as for :class:`SAM`.
        rho: radius in the normalized space (>= 0; the paper uses about 10x SAM's, e.g. 0.5 for SGD).
        eta: keeps ``T_w`` away from zero (>= 0; paper 0.01). ``eta=0`` matches pytorch-optimizer's
            ``SAM(adaptive=True)``.
        adaptive_1d: when False, 1-D parameters (biases, normalization weights) use ``T = 1``.
        eps: guards the normalization for a zero gradient.
        **kwargs: engine options and, in the davda54 form, the base optimizer's options.

    Reference: J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
    """

    min_grad_evals_per_step = 2
    max_grad_evals_per_step = 2
    description = "ASAM: SAM in a weight-scaled neighbourhood, e = rho T^2 g/||T g|| (Kwon et al., 2021)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.5, eta: float = 0.01,
                 adaptive_1d: bool = True, eps: float = 1e-12, **kwargs: Any) -> None:
        rule = ASAMPerturbation(eta=eta, adaptive_1d=adaptive_1d, eps=eps)
        super().__init__(params_or_base, base_class, rule=rule, policy=Always(), rho=rho, **kwargs)
