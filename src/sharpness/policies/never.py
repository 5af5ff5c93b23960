"""Never spend the second pass: plain ERM through the same engine (the harness's baseline)."""

from __future__ import annotations

from .base import Policy

__all__ = ["Never"]


class Never(Policy):
    """Every step is an ERM step: the wrapper reduces to its base optimizer (with the engine's counters)."""

    def decide(self, step: int, grad_sq_norm: float | None) -> bool:
        return False
