"""LookSAM: SAM every k steps, reusing the flat direction in between (Liu et al., CVPR 2022)."""

from __future__ import annotations

from typing import Any

from ..policies.periodic import Periodic
from ..rules.sam import SAMPerturbation
from .engine import SharpnessAwareOptimizer

__all__ = ["LookSAM"]


class LookSAM(SharpnessAwareOptimizer):
    r"""LookSAM: a SAM step every ``k`` steps; in between, ERM plus the stored flat direction.

    At a SAM step (``t % k == 0``) with ``g = grad L(w)`` and ``g_s = grad L(w + e(w))``:

    .. math::
        g_v = g_s - \frac{\langle g, g_s \rangle}{\|g\|^2} g \quad (\text{stored}), \qquad
        w \leftarrow \mathrm{base\_step}(w, g_s)

    At the other steps, with only ``g`` computed (one pass):

    .. math::
        w \leftarrow \mathrm{base\_step}\Big(w, g + \alpha \frac{\|g\|}{\|g_v\|} g_v\Big)

    Average cost ``1 + 1/k`` gradient evaluations per step.

    Args:
        params_or_base, base_class, rho, eps: as for :class:`SAM`.
        k: SAM period (integer >= 1; ``k=1`` is SAM).
        alpha: weight of the reused direction (>= 0; paper grid {0.1, 0.3, 0.6, 0.9}).
        **kwargs: engine options and, in the davda54 form, the base optimizer's options.

    Reference: Y. Liu, S. Mai, X. Chen, C.-J. Hsieh, Y. You. Towards Efficient and Scalable Sharpness-Aware
    Minimization. CVPR 2022.
    """

    min_grad_evals_per_step = 1
    max_grad_evals_per_step = 2
    description = "LookSAM: SAM every k steps, reusing the orthogonal flat direction g_v (Liu et al., 2022)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.05, k: int = 5,
                 alpha: float = 0.7, eps: float = 1e-12, **kwargs: Any) -> None:
        super().__init__(params_or_base, base_class, rule=SAMPerturbation(eps=eps), policy=Periodic(k),
                         rho=rho, reuse_alpha=alpha, **kwargs)
