"""ERM: the base optimizer alone, behind the engine's interface (counters, closure, checkpoints)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..policies.never import Never
from ..rules.sam import SAMPerturbation
from .engine import SharpnessAwareOptimizer

__all__ = ["ERM"]


class ERM(SharpnessAwareOptimizer):
    r"""Empirical risk minimization: ``w <- base_step(w, grad L_B(w))``, one gradient evaluation per step.

    The baseline every comparison needs, run through the same loop as the sharpness-aware methods so its
    ``grad_evals``, ``steps`` and checkpoints are counted and saved the same way. ``rho`` is accepted and
    ignored (no perturbation is ever applied).
    """

    supports_complex: ClassVar[bool] = True  # equal to the real view (tested)
    min_grad_evals_per_step = 1
    max_grad_evals_per_step = 1
    supports_maximize: ClassVar[bool] = True  # the base optimizer's own update
    description = "ERM: the base optimizer alone (one gradient evaluation per step), the baseline"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params_or_base, base_class, rule=SAMPerturbation(), policy=Never(), rho=rho, **kwargs)
