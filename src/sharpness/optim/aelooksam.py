"""AE-LookSAM: the adaptive policy combined with LookSAM's reuse (Jiang et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any

from ..policies.adaptive import Adaptive
from ..rules.sam import SAMPerturbation
from .engine import SharpnessAwareOptimizer

__all__ = ["AELookSAM"]


class AELookSAM(SharpnessAwareOptimizer):
    r"""Algorithm 1 of the paper, AE-LookSAM branch.

    SAM steps (``s_t >= mu_t + c_t sigma_t``, see :class:`~sharpness.policies.Adaptive`) compute
    ``g_s = grad L(w + rho g/||g||)``, store ``g_v = g_s - (<g, g_s>/||g||^2) g`` and update with ``g_s``;
    ERM steps (one pass) update with ``g + alpha ||g||/||g_v|| g_v``.

    Args:
        params_or_base, base_class, rho, eps: as for :class:`SAM`.
        total_steps: T (integer >= 1).
        lambda1, lambda2: threshold coefficients, ``lambda1 <= lambda2`` (paper 0 and 2: about 20% SAM steps).
        delta: EMA forgetting rate in (0, 1) (paper 0.9).
        alpha: weight of the reused direction (>= 0).
        **kwargs: engine options and, in the davda54 form, the base optimizer's options.

    Reference: W. Jiang, H. Yang, Y. Zhang, J. Kwok. An Adaptive Policy to Employ Sharpness-Aware
    Minimization. ICLR 2023.
    """

    min_grad_evals_per_step = 1
    max_grad_evals_per_step = 2
    description = "AE-LookSAM: adaptive SAM steps, LookSAM's reused flat direction otherwise (Jiang et al., 2023)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.05,
                 total_steps: int, lambda1: float = 0.0, lambda2: float = 2.0, delta: float = 0.9,
                 alpha: float = 0.7, eps: float = 1e-12, **kwargs: Any) -> None:
        policy = Adaptive(total_steps=total_steps, lambda1=lambda1, lambda2=lambda2, delta=delta)
        super().__init__(params_or_base, base_class, rule=SAMPerturbation(eps=eps), policy=policy, rho=rho,
                         reuse_alpha=alpha, **kwargs)
