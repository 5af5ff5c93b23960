"""AE-SAM: SAM only where the loss landscape is locally sharp (Jiang et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any

from ..policies.adaptive import Adaptive
from ..rules.sam import SAMPerturbation
from .engine import SharpnessAwareOptimizer

__all__ = ["AESAM"]


class AESAM(SharpnessAwareOptimizer):
    r"""Adaptive policy to employ SAM (Algorithm 1 of the paper, AE-SAM branch).

    With ``s_t = ||g_t||^2`` and EMA estimates ``mu_t``, ``sigma_t^2`` of its mean and variance
    (see :class:`~sharpness.policies.Adaptive`), and ``c_t`` moving linearly from ``lambda2`` to ``lambda1``
    over ``total_steps``:

    .. math::
        g_s = \begin{cases} \nabla L_B\big(w + \rho g/\|g\|\big) & s_t \ge \mu_t + c_t \sigma_t
        \ (\text{SAM, two passes}) \\ g & \text{otherwise (ERM, one pass)} \end{cases}, \qquad
        w \leftarrow \mathrm{base\_step}(w, g_s)

    The paper's Algorithm 1 writes the ascent point as ``w + rho g``; like SAM and the authors' experiments
    we use the normalized ``rho g / ||g||``. ``sam_fraction`` reports the fraction of SAM steps (the paper's
    %SAM), about 50% with the defaults. Costs one host synchronisation per step (the scalar ``s_t``).

    Args:
        params_or_base, base_class, rho, eps: as for :class:`SAM`.
        total_steps: T, the number of optimizer steps of the run (integer >= 1).
        lambda1, lambda2: final and initial threshold coefficients, ``lambda1 <= lambda2`` (paper -1, 1).
        delta: EMA forgetting rate in (0, 1) (paper 0.9).
        **kwargs: engine options and, in the davda54 form, the base optimizer's options.

    Reference: W. Jiang, H. Yang, Y. Zhang, J. Kwok. An Adaptive Policy to Employ Sharpness-Aware
    Minimization. ICLR 2023.
    """

    min_grad_evals_per_step = 1
    max_grad_evals_per_step = 2
    description = "AE-SAM: SAM only when ||g||^2 >= mu + c_t sigma of its EMA normal model (Jiang et al., 2023)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.05,
                 total_steps: int, lambda1: float = -1.0, lambda2: float = 1.0, delta: float = 0.9,
                 eps: float = 1e-12, **kwargs: Any) -> None:
        policy = Adaptive(total_steps=total_steps, lambda1=lambda1, lambda2=lambda2, delta=delta)
        super().__init__(params_or_base, base_class, rule=SAMPerturbation(eps=eps), policy=policy, rho=rho,
                         **kwargs)
