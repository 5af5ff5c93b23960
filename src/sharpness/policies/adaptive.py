"""AE-SAM's adaptive policy: SAM only where ||g||^2 is large relative to its running normal model."""

from __future__ import annotations

import math
from typing import Any

from .._validation import check_finite, check_int_at_least, check_open_unit
from .base import Policy

__all__ = ["Adaptive"]


class Adaptive(Policy):
    r"""The adaptive policy of AE-SAM (Jiang et al., ICLR 2023, Section 3.2 and Algorithm 1).

    With ``s_t = ||grad L(B_t; w_t)||^2`` the policy keeps EMA estimates of its mean and variance

    .. math::
        \mu_t = \delta \mu_{t-1} + (1-\delta) s_t, \qquad
        \sigma_t^2 = \delta \sigma_{t-1}^2 + (1-\delta)(s_t - \mu_t)^2,

    from :math:`\mu_{-1} = 0`, :math:`\sigma_{-1}^2 = e^{-10}`, and takes a SAM step iff
    :math:`s_t \ge \mu_t + c_t \sigma_t` with the threshold moving linearly from ``lambda2`` to ``lambda1``:
    :math:`c_t = \frac{t}{T}\lambda_1 + (1 - \frac{t}{T})\lambda_2`. Past ``T = total_steps`` the threshold
    stays at ``lambda1``. A non-finite ``s_t`` (overflow) leaves the statistics untouched and gives ERM.

    Args:
        total_steps: T, the number of optimizer steps of the run.
        lambda1: final threshold (paper: -1 for AE-SAM, 0 for AE-LookSAM).
        lambda2: initial threshold (paper: 1 for AE-SAM, 2 for AE-LookSAM); ``lambda1 <= lambda2``.
        delta: EMA forgetting rate in (0, 1) (paper: 0.9).

    Reference: W. Jiang, H. Yang, Y. Zhang, J. Kwok. An Adaptive Policy to Employ Sharpness-Aware
    Minimization. ICLR 2023.
    """

    needs_grad_sq_norm = True

    def __init__(
        self, *, total_steps: int, lambda1: float = -1.0, lambda2: float = 1.0, delta: float = 0.9
    ) -> None:
        self.total_steps = check_int_at_least("total_steps", total_steps, 1)
        self.lambda1 = check_finite("lambda1", lambda1)
        self.lambda2 = check_finite("lambda2", lambda2)
        if self.lambda1 > self.lambda2:
            raise ValueError(
                f"Invalid lambda1 value: {self.lambda1} (expected lambda1 <= lambda2 = {self.lambda2}; "
                "the threshold moves from lambda2 down to lambda1)"
            )
        self.delta = check_open_unit("delta", delta)
        self.mean = 0.0  # mu_{-1}
        self.var = math.exp(-10.0)  # sigma^2_{-1}
        self.last_threshold = math.nan  # mu_t + c_t sigma_t of the latest step, for logging

    def threshold_coefficient(self, step: int) -> float:
        """``c_t``: linear from ``lambda2`` at t=0 to ``lambda1`` at t=T, then constant."""
        frac = min(step, self.total_steps) / self.total_steps
        return frac * self.lambda1 + (1.0 - frac) * self.lambda2

    def decide(self, step: int, grad_sq_norm: float | None) -> bool:
        if grad_sq_norm is None:
            raise RuntimeError("Adaptive policy needs the squared gradient norm; the engine did not pass it")
        s = float(grad_sq_norm)
        if not math.isfinite(s):
            return False
        d = self.delta
        self.mean = d * self.mean + (1.0 - d) * s
        self.var = d * self.var + (1.0 - d) * (s - self.mean) ** 2
        self.last_threshold = self.mean + self.threshold_coefficient(step) * math.sqrt(self.var)
        return s >= self.last_threshold

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "last_threshold": self.last_threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.last_threshold = float(state.get("last_threshold", math.nan))

    def extra_repr(self) -> str:
        return (
            f"total_steps={self.total_steps}, lambda1={self.lambda1}, lambda2={self.lambda2}, delta={self.delta}"
        )
