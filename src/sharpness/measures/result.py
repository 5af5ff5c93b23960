"""The frozen record every measure returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Measurement"]


@dataclass(frozen=True)
class Measurement:
    """A measured value and how it was estimated.

    Attributes:
        name: the measure (``"hessian_trace"``, ``"sam_sharpness"``, ...).
        value: a float, or a list of floats (e.g. the top-k eigenvalues, a density grid).
        stderr: Monte-Carlo standard error of ``value`` where the estimator is stochastic, else None.
        iterations: iterations the estimator ran (power/Lanczos steps, ascent steps), if any.
        samples: random vectors / directions / restarts drawn, if any.
        seed: seed of the estimator's private generator, if random.
        tolerance: the requested relative tolerance, if any.
        converged: whether the tolerance was reached (None when there is no tolerance).
        settings: every other option the estimator used (radius, mode, method, ...).
    """

    name: str
    value: float | list[float]
    stderr: float | list[float] | None = None
    iterations: int | None = None
    samples: int | None = None
    seed: int | None = None
    tolerance: float | None = None
    converged: bool | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {
            "name": self.name, "value": self.value, "stderr": self.stderr, "iterations": self.iterations,
            "samples": self.samples, "seed": self.seed, "tolerance": self.tolerance, "converged": self.converged,
            "settings": dict(self.settings),
        }
