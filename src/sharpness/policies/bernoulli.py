"""A Bernoulli trial per step (SS-SAM)."""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_int_at_least, check_probability
from .base import Policy

__all__ = ["Bernoulli"]


class Bernoulli(Policy):
    """SAM with probability ``p`` at each step, ERM otherwise.

    Draws come from a private CPU ``torch.Generator`` seeded with ``seed``: the same seed on every rank gives
    the same decisions everywhere (no collective needed), and the generator state is checkpointed.

    Reference: Y. Zhao, H. Zhang, X. Hu. SS-SAM: Stochastic Scheduled Sharpness-Aware Minimization for
    Efficiently Training Deep Neural Networks. arXiv:2203.09962, 2022.
    """

    def __init__(self, p: float, *, seed: int = 0) -> None:
        self.p = check_probability("p", p)
        self.seed = check_int_at_least("seed", seed, 0)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def decide(self, step: int, grad_sq_norm: float | None) -> bool:
        # Always draw, even for p in {0, 1}, so the stream does not depend on p.
        u = torch.rand((), generator=self.generator).item()
        return u < self.p

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}"
