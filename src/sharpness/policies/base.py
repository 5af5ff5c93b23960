"""The policy interface: decide, per step, whether to spend the extra (perturbed) gradient pass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

__all__ = ["Policy"]


class Policy(ABC):
    """Decides at each step whether the optimizer takes a SAM step (two passes) or an ERM step (one pass).

    ``decide`` is called once per optimizer step, after the first gradient pass, with the step index
    ``t`` (0-based count of completed optimizer steps) and, when ``needs_grad_sq_norm`` is True, the squared
    global gradient norm ``||g_t||^2`` as a Python float (identical on every rank in distributed runs: the
    engine all-reduces it first). A policy must be deterministic given its state so that every rank of a
    distributed job takes the same branch.
    """

    #: Whether ``decide`` needs ``||g_t||^2`` (costs one host synchronisation per step).
    needs_grad_sq_norm: ClassVar[bool] = False

    @abstractmethod
    def decide(self, step: int, grad_sq_norm: float | None) -> bool:
        """Return True for a SAM step, False for an ERM step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but got keys {sorted(state)}")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
