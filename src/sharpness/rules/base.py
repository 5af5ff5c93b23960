"""The perturbation-rule interface: how far and in which direction to climb before the second pass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["ParamGroupView", "PerturbationRule"]


@dataclass(frozen=True)
class ParamGroupView:
    """The parameters of one param group that have a gradient, with their gradients and the group's options.

    ``origin``: an exact copy of ``params`` (the engine's backup of ``w``, taken just before the perturbation),
    or None. When it is given, a rule may use the parameters themselves as scratch memory, as long as it leaves
    them at ``origin + e``: ASAM's ``|w| + eta`` and ESAM's mask are built there, so neither needs a
    parameter-sized buffer of its own. Without it (a rule called on its own) the rule allocates temporaries.
    """

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    origin: list[Tensor] | None = None


class PerturbationRule(ABC):
    """Computes the ascent perturbation ``e(w)`` from the gradients at ``w`` and applies ``w <- w + e(w)``.

    A rule reads each group's ``rho`` (the radius) from the param group, so LR-scheduler-style per-group
    values and rho schedules work. ``perturb_`` runs under ``torch.no_grad()``; it may overwrite the
    gradients (the engine has already copied what it needs), which saves one parameter-sized buffer.
    """

    #: Short name used in ``repr`` and the registry.
    name: str = "rule"

    @abstractmethod
    def perturb_(self, views: list[ParamGroupView], *, grad_sq_norm: Tensor | None = None) -> None:
        """Add the perturbation to ``view.params`` in place for every view.

        ``grad_sq_norm``, when given, is ``||g||^2`` over all the views' gradients, already computed by the
        engine (for a policy); a rule that needs it may use it instead of recomputing it.
        """

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
