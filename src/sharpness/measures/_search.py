"""Projected ascent over a perturbation region: the one search every worst-case sharpness measure uses.

A measure supplies a *probe* ``e -> (value, direction)``, the objective at ``w + e`` and a thunk for its
ascent direction (the loss gradient for SAM/Keskar, ``H g / ||g||`` for GNR, the negative gradient for a
minimum), and a *region*: the Euclidean ball ``{e: ||e|| <= rho}`` or Keskar's box
``{e: |e_i| <= r_i}``. The search is projected steepest ascent with backtracking::

    e <- P(e + eta * s(d))      s(d) = rho d / ||d||  (ball)   or   r * sign(d)  (box)

a step is kept only if it increases the value (then ``eta`` doubles, up to ``step_size``), otherwise ``eta``
halves. Every iterate is feasible, so the best value found is a certified lower bound on the maximum; the
search stops after ``steps`` proposals, at a point without an ascent direction, at a KKT point of the
region (the projected step does not move), or when ``eta`` underflows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import Vector, norm, random_vector

__all__: list[str] = []

#: a probe returns the objective at ``w + e`` and a thunk computing its ascent direction there
Probe = Callable[[Vector], tuple[float, Callable[[], Vector]]]

_MIN_STEP_FRACTION = 2.0 ** -30


class Ball:
    """The Euclidean ball ``{e : ||e|| <= radius}`` (SAM, GNR, SALR eq. (1)-(2))."""

    kind = "ball"

    def __init__(self, radius: float) -> None:
        self.radius = radius

    def project(self, e: Sequence[Tensor]) -> Vector:
        size = float(norm(e))
        if size <= self.radius:
            return list(e)
        return [x * (self.radius / size) for x in e]

    def steepest(self, d: Sequence[Tensor]) -> Vector | None:
        """``radius * d / ||d||``: the maximizer of ``<d, e>`` over the ball (None when ``d = 0``)."""
        size = float(norm(d))
        if size == 0.0 or size != size:
            return None
        return [x * (self.radius / size) for x in d]

    def random_point(self, like: Sequence[Tensor], generator: torch.Generator) -> Vector:
        """A uniformly random point on the sphere ``||e|| = radius``."""
        v = random_vector(like, generator)
        return self.project([x * (self.radius / float(norm(v))) for x in v])

    def describe(self) -> dict[str, object]:
        return {"region": self.kind, "radius": self.radius}


class Box:
    """Keskar et al.'s box ``{e : |e_i| <= r_i}`` with ``r_i = epsilon (|w_i| + 1)``."""

    kind = "box"

    def __init__(self, half_widths: Sequence[Tensor], epsilon: float) -> None:
        self.half_widths = list(half_widths)
        self.epsilon = epsilon

    @classmethod
    def keskar(cls, params: Sequence[Tensor], epsilon: float) -> Box:
        return cls([epsilon * (p.detach().abs() + 1) for p in params], epsilon)

    def project(self, e: Sequence[Tensor]) -> Vector:
        return [torch.maximum(torch.minimum(x, r), -r) for x, r in zip(e, self.half_widths, strict=True)]

    def steepest(self, d: Sequence[Tensor]) -> Vector | None:
        """``r * sign(d)``: the maximizer of ``<d, e>`` over the box (None when ``d = 0``)."""
        if all(not bool(x.any()) for x in d):
            return None
        return [r * torch.sign(x) for x, r in zip(d, self.half_widths, strict=True)]

    def random_point(self, like: Sequence[Tensor], generator: torch.Generator) -> Vector:
        """A uniformly random vertex ``r * s`` of the box, ``s`` Rademacher."""
        signs = random_vector(like, generator, kind="rademacher")
        return [r * s for r, s in zip(self.half_widths, signs, strict=True)]

    def describe(self) -> dict[str, object]:
        return {"region": self.kind, "epsilon": self.epsilon}


Region = Ball | Box


@dataclass(frozen=True)
class SearchResult:
    """The best point one restart found."""

    value: float
    perturbation: Vector
    start_value: float
    iterations: int
    evaluations: int


def projected_ascent(probe: Probe, region: Region, start: Sequence[Tensor], *, steps: int,
                     step_size: float) -> SearchResult:
    """Maximize ``probe`` over ``region`` from ``start`` (see the module docstring)."""
    e = region.project(start)
    value, direction = probe(e)
    start_value = value
    eta, evaluations, iterations = step_size, 1, 0
    step: Vector | None = None
    for iterations in range(1, steps + 1):
        if step is None:
            step = region.steepest(direction())
            if step is None:  # a stationary point of the objective: no ascent direction
                iterations -= 1
                break
        candidate = region.project([x + eta * s for x, s in zip(e, step)])
        if all(torch.equal(c, x) for c, x in zip(candidate, e)):
            # the step lies in the normal cone at e (a KKT point): no step length moves
            iterations -= 1
            break
        candidate_value, candidate_direction = probe(candidate)
        evaluations += 1
        if candidate_value > value:
            e, value, direction, step = candidate, candidate_value, candidate_direction, None
            eta = min(2 * eta, step_size)
        else:
            eta *= 0.5
            if eta < _MIN_STEP_FRACTION * step_size:
                break
    return SearchResult(value, e, start_value, iterations, evaluations)


def search_with_restarts(probe: Probe, region: Region, first_start: Vector | None, like: Sequence[Tensor], *,
                         steps: int, restarts: int, step_size: float,
                         generator: torch.Generator) -> list[SearchResult]:
    """``restarts`` projected ascents: the first from ``first_start``, the rest from random points ``v`` of
    the region's boundary drawn from ``generator`` in antithetic pairs ``v, -v`` (so that in one dimension
    both ends are searched). With ``first_start=None`` every start is random."""
    starts: list[Vector] = [] if first_start is None else [list(first_start)]
    while len(starts) < restarts:
        v = region.random_point(like, generator)
        starts += [v, [-x for x in v]]
    return [projected_ascent(probe, region, start, steps=steps, step_size=step_size)
            for start in starts[:restarts]]
