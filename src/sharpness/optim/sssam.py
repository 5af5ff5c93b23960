"""SS-SAM: a SAM step with probability p (Zhao et al., 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..policies.bernoulli import Bernoulli
from ..rules.sam import SAMPerturbation
from .engine import SharpnessAwareOptimizer

__all__ = ["SSSAM"]


class SSSAM(SharpnessAwareOptimizer):
    r"""Stochastic scheduled SAM: each step is SAM with probability ``p``, ERM otherwise.

    .. math::
        \xi_t \sim \mathrm{Bernoulli}(p), \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \xi_t \nabla L_B(w + e(w)) + (1 - \xi_t) \nabla L_B(w)\big)

    ERM steps take one pass (the second is really skipped): ``1 + p`` evaluations per step on average.

    Args:
        params_or_base, base_class, rho, eps: as for :class:`SAM`.
        p: probability of a SAM step (0 <= p <= 1).
        seed: seed of the policy's private generator (same on every rank so all ranks take the same branch;
            checkpointed with the optimizer).
        **kwargs: engine options and, in the davda54 form, the base optimizer's options.

    Reference: Y. Zhao, H. Zhang, X. Hu. SS-SAM: Stochastic Scheduled Sharpness-Aware Minimization for
    Efficiently Training Deep Neural Networks. arXiv:2203.09962, 2022.
    """

    supports_complex: ClassVar[bool] = True  # equal to the real view (tested)
    min_grad_evals_per_step = 1
    max_grad_evals_per_step = 2
    description = "SS-SAM: SAM with probability p, ERM otherwise (Zhao et al., 2022)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.05, p: float = 0.5,
                 seed: int = 0, eps: float = 1e-12, **kwargs: Any) -> None:
        super().__init__(params_or_base, base_class, rule=SAMPerturbation(eps=eps), policy=Bernoulli(p, seed=seed),
                         rho=rho, **kwargs)
