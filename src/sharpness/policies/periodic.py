"""Every k steps (LookSAM)."""

from __future__ import annotations

from .._validation import check_int_at_least
from .base import Policy

__all__ = ["Periodic"]


class Periodic(Policy):
    """SAM at steps ``t`` with ``t % k == 0`` (so the first step is a SAM step), ERM otherwise.

    Reference: Y. Liu, S. Mai, X. Chen, C.-J. Hsieh, Y. You. Towards Efficient and Scalable Sharpness-Aware
    Minimization (LookSAM). CVPR 2022.
    """

    def __init__(self, k: int) -> None:
        self.k = check_int_at_least("k", k, 1)

    def decide(self, step: int, grad_sq_norm: float | None) -> bool:
        return step % self.k == 0

    def extra_repr(self) -> str:
        return f"k={self.k}"
