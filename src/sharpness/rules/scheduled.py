"""A perturbation radius proportional to the learning rate (GSAM's rho schedule, Zhuang et al., ICLR 2022)."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .. import _foreach
from .._validation import check_non_negative, check_positive
from .base import ParamGroupView, PerturbationRule

__all__ = ["LRProportionalRho"]


class LRProportionalRho(PerturbationRule):
    r"""Runs ``inner`` with each group's radius mapped linearly from its current learning rate:

    .. math::
        \rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min}) \frac{lr_t - lr_{\min}}{lr_{\max} - lr_{\min}}

    with ``rho_max = group["rho"]`` and ``lr_t = group["lr"]`` read at every perturbation, so any torch LR
    scheduler drives the radius too (no second scheduler to step). The param groups are not modified.

    Args:
        inner: the rule that applies the perturbation (e.g. :class:`~sharpness.rules.SAMPerturbation`).
        rho_min: radius at ``lr = lr_min`` (>= 0).
        lr_max: learning rate at which the radius is ``rho_max`` (> lr_min).
        lr_min: learning rate at which the radius is ``rho_min`` (>= 0).
    """

    name = "lr_proportional_rho"

    def __init__(self, inner: PerturbationRule, *, rho_min: float, lr_max: float, lr_min: float = 0.0) -> None:
        if not isinstance(inner, PerturbationRule):
            raise TypeError(f"Invalid inner rule: {inner!r} (expected a sharpness.rules.PerturbationRule)")
        self.inner = inner
        self.rho_min = check_non_negative("rho_min", rho_min)
        self.lr_min = check_non_negative("lr_min", lr_min)
        self.lr_max = check_positive("lr_max", lr_max)
        if self.lr_max <= self.lr_min:
            raise ValueError(f"Invalid lr_max value: {lr_max} (expected lr_max > lr_min = {lr_min})")

    def rho_at(self, rho_max: float, lr: float) -> float:
        """The scheduled radius for a group with ``rho = rho_max`` at learning rate ``lr``."""
        rho = self.rho_min + (rho_max - self.rho_min) * (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return max(rho, 0.0)  # an lr below lr_min never flips the ascent into a descent

    @_foreach.no_grad
    def perturb_(self, views: list[ParamGroupView], *, grad_sq_norm: Tensor | None = None) -> None:
        scheduled = [
            dataclasses.replace(view, group={**view.group, "rho": self.rho_at(view.group["rho"], view.group["lr"])})
            for view in views
        ]
        self.inner.perturb_(scheduled, grad_sq_norm=grad_sq_norm)

    def extra_repr(self) -> str:
        return f"{self.inner!r}, rho_min={self.rho_min}, lr_max={self.lr_max}, lr_min={self.lr_min}"
