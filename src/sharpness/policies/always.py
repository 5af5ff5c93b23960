"""Always spend the second pass: plain SAM / ASAM."""

from __future__ import annotations

from .base import Policy

__all__ = ["Always"]


class Always(Policy):
    """Every step is a SAM step (Foret et al., 2021)."""

    def decide(self, step: int, grad_sq_norm: float | None) -> bool:
        return True
