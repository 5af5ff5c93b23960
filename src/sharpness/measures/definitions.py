"""The papers' sharpness definitions, measured by search inside a neighbourhood of the weights ``w``.

``L`` is the size-weighted mean loss over the given batches, ``g = grad L``. Every measure runs inside
:func:`~sharpness.measures._common.measurement_mode` (eval by default), restores the weights bit for bit
and returns a :class:`~sharpness.measures.result.Measurement`.

* :func:`sam_sharpness` (Foret et al., 2021; GNR paper eq. (10)):
  ``R_SAM = max_{||e|| <= rho} L(w + e) - L(w)``.
* :func:`gnr_sharpness` (GNR paper, Definition 2.1): ``R_GNR = rho * max_{||e|| <= rho} ||g(w + e)||``.
  Prop. 2.1: at a minimum of a quadratic, ``R_GNR / rho^2 = lambda_max``; Prop. 2.4: ``R_GNR >= R_SAM``.
* :func:`keskar_sharpness` (Keskar et al., 2017, Metric 2.1):
  ``phi = 100 * (max_{e in C} L(w + e) - L(w)) / (1 + L(w))`` over the box
  ``C = {e : |e_i| <= epsilon (|w_i| + 1)}`` (or the ball ``||e|| <= epsilon`` of SALR's eq. (1)).
* :func:`salr_sharpness` (SALR eq. (2)):
  ``S(eps) = max_{||e|| <= eps} L(w + e) - min_{||e|| <= eps} L(w + e)``.
* :func:`salr_sharpness_hat` (SALR Definition 1): ``S_hat = L(w_+) - L(w_-)`` after normalized gradient
  ascent / descent steps of length ``gamma``; :func:`salr_stochastic_sharpness` is Algorithm 2, which
  averages per-sample normalized gradients.

The maxima and minima are non-concave problems; they are estimated by projected ascent with backtracking and
restarts (``_search``). Every evaluated point is feasible, so the maxima reported are lower bounds (the minima
upper bounds) of the exact values, and ``steps``/``restarts`` trade cost for tightness. One search step costs
one gradient evaluation over ``data`` (GNR: plus one Hessian-vector product per accepted step).

References:
    Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for Efficiently Improving
    Generalization. ICLR 2021.
    Gradient Norm Regularizer Seeks Flat Minima and Improves Generalization (GNR; ICLR 2023 submission).
    Keskar, Mudigere, Nocedal, Smelyanskiy, Tang. On Large-Batch Training for Deep Learning: Generalization
    Gap and Sharp Minima. ICLR 2017.
    Yue, Nouiehed, Al Kontar. SALR: Sharpness-aware Learning Rate Scheduler for Improved Generalization.
    IEEE TNNLS 2023 (ICLR 2021 submission).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._compile import accepts_compiled
from .._validation import check_choice, check_int_at_least, check_positive
from .._walk import normalized_walk_, per_sample_inverse_norms
from ._common import (
    Batch,
    LossFn,
    Vector,
    as_batches,
    check_mode,
    gradient,
    mean_loss,
    measurement_mode,
    norm,
    shifted_parameters,
    trainable_parameters,
)
from ._per_sample import check_per_sample_mode, per_sample_gradients
from ._search import Ball, Box, Probe, SearchResult, search_with_restarts
from .hvp import HVP_METHODS, HessianOperator
from .result import Measurement

__all__ = ["KESKAR_REGIONS", "gnr_sharpness", "keskar_sharpness", "salr_sharpness", "salr_sharpness_hat",
           "salr_stochastic_sharpness", "sam_sharpness"]

KESKAR_REGIONS = ("box", "ball")


# ------------------------------------------------------------------------------------------------ checks
def _check_search(steps: object, restarts: object, step_size: object,
                  seed: object) -> tuple[int, int, float, int]:
    steps = check_int_at_least("steps", steps, 1)
    restarts = check_int_at_least("restarts", restarts, 1)
    step_size = check_positive("step_size", step_size)
    seed = check_int_at_least("seed", seed, 0)
    return steps, restarts, step_size, seed


def _setup(model: nn.Module, data: Batch | Any) -> tuple[list[nn.Parameter], list[tuple[Any, Any, int]]]:
    params = trainable_parameters(model)
    return params, as_batches(data)


# ------------------------------------------------------------------------------------------------ probes
class _Counter:
    def __init__(self) -> None:
        self.gradients = 0
        self.hvps = 0


def _loss_probe(model: nn.Module, loss_fn: LossFn, batches: list, params: Sequence[Tensor], counter: _Counter,
                *, sign: float = 1.0) -> Probe:
    """``e -> (sign * L(w + e), sign * g(w + e))``: one gradient evaluation per probe."""

    def probe(e: Vector) -> tuple[float, Any]:
        with shifted_parameters(params, e):
            loss, grad = gradient(model, loss_fn, batches, params)
        counter.gradients += 1
        if sign < 0:
            return -loss, lambda: [-g for g in grad]
        return loss, lambda: grad

    return probe


def _gradient_norm_probe(model: nn.Module, loss_fn: LossFn, batches: list, params: Sequence[Tensor],
                         counter: _Counter, hvp_method: str) -> Probe:
    """``e -> (||g(w + e)||, grad ||g||(w + e) = H g / ||g||)`` (GNR eq. (6)); the Hessian-vector product is
    taken with the shared :class:`HessianOperator` and only when the search asks for the direction."""
    pairs = [(x, y) for x, y, _ in batches]

    def probe(e: Vector) -> tuple[float, Any]:
        with shifted_parameters(params, e):
            _, grad = gradient(model, loss_fn, batches, params)
        counter.gradients += 1
        grad_norm = float(norm(grad))

        def direction() -> Vector:
            if grad_norm == 0.0:  # ||g|| is not differentiable where g = 0: no ascent direction
                return [torch.zeros_like(g) for g in grad]
            with shifted_parameters(params, e):
                hg = HessianOperator(model, loss_fn, pairs, method=hvp_method).matvec(grad)
            counter.hvps += 1
            return [h / grad_norm for h in hg]

        return grad_norm, direction

    return probe


def _search_settings(steps: int, restarts: int, step_size: float, mode: str, results: Sequence[SearchResult],
                     counter: _Counter) -> dict[str, Any]:
    return {"steps": steps, "restarts": restarts, "step_size": step_size, "mode": mode,
            "gradient_evaluations": counter.gradients,
            "iterations_per_restart": [r.iterations for r in results]}


# ------------------------------------------------------------------------------------------------ SAM
@accepts_compiled
def sam_sharpness(model: nn.Module, loss_fn: LossFn, data: Batch | Any, rho: float, *, steps: int = 20,
                  restarts: int = 3, step_size: float = 0.5, seed: int = 0,
                  mode: str = "eval") -> Measurement:
    """SAM's sharpness ``R_SAM(w) = max_{||e|| <= rho} L(w + e) - L(w)`` (Foret et al., 2021).

    Estimated by projected gradient ascent on the ball with backtracking. The first restart starts from SAM's
    first-order point ``e_1 = rho g / ||g||`` (a random point of the sphere when ``g = 0``), the others from
    random points of the sphere ``||e|| = rho`` drawn in antithetic pairs ``v, -v``. The value is
    ``max(0, best L(w + e) - L(w))`` (``e = 0`` is feasible); ``settings["first_order_value"]`` is
    ``L(w + e_1) - L(w)``, the one-step value SAM trains with.

    Args:
        model, loss_fn, data: the loss ``L``; ``data`` is an ``(inputs, targets)`` batch or an iterable of
            batches (size-weighted mean).
        rho: the radius, ``rho > 0``.
        steps: ascent steps per restart (one gradient evaluation each), ``>= 1``.
        restarts: number of ascents, ``>= 1``.
        step_size: the initial (and largest) step length as a fraction of ``rho``, ``> 0``; halved after a
            step that does not increase the loss, doubled (up to ``step_size``) after one that does.
        seed: seed of the private generator drawing the random starts, ``>= 0``.
        mode: ``"eval"`` (default) or ``"train"`` (see ``measurement_mode``).

    Example:
        >>> m = sam_sharpness(model, nn.functional.cross_entropy, (x, y), rho=0.05, steps=10)
        >>> m.value, m.settings["first_order_value"]
    """
    rho = check_positive("rho", rho)
    steps, restarts, step_size, seed = _check_search(steps, restarts, step_size, seed)
    check_mode(mode)
    params, batches = _setup(model, data)
    counter = _Counter()
    generator = torch.Generator().manual_seed(seed)
    region = Ball(rho)
    with measurement_mode(model, mode):
        loss, grad = gradient(model, loss_fn, batches, params)
        counter.gradients += 1
        first = region.steepest(grad)
        probe = _loss_probe(model, loss_fn, batches, params, counter)
        results = search_with_restarts(probe, region, first, params, steps=steps, restarts=restarts,
                                       step_size=step_size, generator=generator)
    best = max(r.value for r in results)
    settings = {"rho": rho, "loss": loss, "max_loss": max(best, loss),
                "first_order_value": results[0].start_value - loss if first is not None else None,
                "restart_values": [r.value - loss for r in results],
                **_search_settings(steps, restarts, step_size, mode, results, counter)}
    return Measurement(name="sam_sharpness", value=max(best - loss, 0.0),
                       iterations=sum(r.iterations for r in results), samples=restarts, seed=seed,
                       settings=settings)


# ------------------------------------------------------------------------------------------------ GNR
@accepts_compiled
def gnr_sharpness(model: nn.Module, loss_fn: LossFn, data: Batch | Any, rho: float, *, steps: int = 20,
                  restarts: int = 3, step_size: float = 0.5, seed: int = 0, mode: str = "eval",
                  hvp_method: str = "double_backward") -> Measurement:
    """GNR's sharpness ``R_GNR(w) = rho * max_{||e|| <= rho} ||g(w + e)||`` (GNR paper, Definition 2.1).

    Projected ascent of ``||g(w + e)||`` on the ball, whose gradient is ``H g / ||g||`` (GNR eq. (6)), a
    Hessian-vector product from the shared :class:`~sharpness.measures.hvp.HessianOperator` at each accepted
    point. The first restart starts from GNR's first-order point ``e_1 = rho f / ||f||``,
    ``f = H(w) g(w) / ||g(w)||`` (eq. (5); a random point of the sphere when ``g(w) = 0`` or ``f = 0``), the
    others from random points of the sphere in antithetic pairs. Where ``g(w + e) = 0`` exactly, ``||g||`` is
    not differentiable and that restart stops (the other restarts continue). The value is
    ``rho * max(||g(w)||, best ||g(w + e)||)``; ``settings["first_order_value"]`` is ``rho ||g(w + e_1)||``,
    the one-step value GNR trains with.

    At a local minimum of a quadratic ``R_GNR / rho^2 = lambda_max(H)`` (Prop. 2.1), and for every ``w`` and
    differentiable ``L``, ``R_GNR >= R_SAM`` (Prop. 2.4, by the mean value theorem).

    Args:
        rho, steps, restarts, step_size, seed, mode: as in :func:`sam_sharpness`.
        hvp_method: how ``H v`` is computed, one of ``HVP_METHODS`` (``"finite_difference"`` where double
            backward is unsupported).
    """
    rho = check_positive("rho", rho)
    steps, restarts, step_size, seed = _check_search(steps, restarts, step_size, seed)
    check_mode(mode)
    check_choice("hvp_method", hvp_method, HVP_METHODS)
    params, batches = _setup(model, data)
    counter = _Counter()
    generator = torch.Generator().manual_seed(seed)
    region = Ball(rho)
    with measurement_mode(model, mode):
        probe = _gradient_norm_probe(model, loss_fn, batches, params, counter, hvp_method)
        zero = [torch.zeros_like(p) for p in params]
        grad_norm, direction = probe(zero)
        first = region.steepest(direction())
        results = search_with_restarts(probe, region, first, params, steps=steps, restarts=restarts,
                                       step_size=step_size, generator=generator)
    best = max(max(r.value for r in results), grad_norm)
    settings = {"rho": rho, "gradient_norm": grad_norm, "max_gradient_norm": best,
                "first_order_value": rho * results[0].start_value if first is not None else None,
                "restart_values": [rho * r.value for r in results], "hvp_method": hvp_method,
                "hvp_evaluations": counter.hvps,
                **_search_settings(steps, restarts, step_size, mode, results, counter)}
    return Measurement(name="gnr_sharpness", value=rho * best, iterations=sum(r.iterations for r in results),
                       samples=restarts, seed=seed, settings=settings)


# ------------------------------------------------------------------------------------------------ Keskar
@accepts_compiled
def keskar_sharpness(model: nn.Module, loss_fn: LossFn, data: Batch | Any, epsilon: float = 1e-3, *,
                     region: str = "box", steps: int = 20, restarts: int = 3, step_size: float = 0.5,
                     seed: int = 0, mode: str = "eval") -> Measurement:
    """Keskar et al.'s epsilon-sharpness (ICLR 2017, Metric 2.1, full space ``A = I``), in percent::

        phi(w, epsilon) = 100 * (max_{e in C} L(w + e) - L(w)) / (1 + L(w))

    with ``C = {e : |e_i| <= epsilon (|w_i| + 1)}`` (``region="box"``, Keskar's definition; they use
    ``epsilon`` = 1e-3 and 5e-4) or ``C = {e : ||e|| <= epsilon}`` (``region="ball"``, SALR's eq. (1),
    there without the factor 100). Keskar et al. solve the inner maximization with 10 L-BFGS-B iterations;
    here it is projected ascent with restarts: on the box the steepest step is ``r * sign(g)`` (first start:
    ``e_1 = r * sign(g)``, the linearization's maximizer; others: random vertices in antithetic pairs), on the
    ball as in
    :func:`sam_sharpness`. ``settings`` also holds ``max_increase = max L(w + e) - L(w)``.

    Requires ``1 + L(w) > 0`` (a non-negative loss, as in the paper).

    Args:
        epsilon: the box's relative half-width (the ball's radius), ``> 0``.
        region: ``"box"`` (default) or ``"ball"``.
        steps, restarts, step_size, seed, mode: as in :func:`sam_sharpness` (``step_size`` is a fraction of
            the box's half-widths or of the ball's radius).
    """
    epsilon = check_positive("epsilon", epsilon)
    check_choice("region", region, KESKAR_REGIONS)
    steps, restarts, step_size, seed = _check_search(steps, restarts, step_size, seed)
    check_mode(mode)
    params, batches = _setup(model, data)
    counter = _Counter()
    generator = torch.Generator().manual_seed(seed)
    with measurement_mode(model, mode):
        space = Box.keskar(params, epsilon) if region == "box" else Ball(epsilon)
        loss, grad = gradient(model, loss_fn, batches, params)
        counter.gradients += 1
        if not 1.0 + loss > 0.0:
            raise ValueError(f"Invalid loss value: {loss} (Keskar sharpness divides by 1 + L(w); expected "
                             "L(w) > -1, e.g. a non-negative loss)")
        first = space.steepest(grad)
        probe = _loss_probe(model, loss_fn, batches, params, counter)
        results = search_with_restarts(probe, space, first, params, steps=steps, restarts=restarts,
                                       step_size=step_size, generator=generator)
    increase = max(max(r.value for r in results) - loss, 0.0)
    settings = {**space.describe(), "loss": loss, "max_increase": increase,
                "first_order_value": (100 * (results[0].start_value - loss) / (1 + loss)
                                      if first is not None else None),
                **_search_settings(steps, restarts, step_size, mode, results, counter)}
    return Measurement(name="keskar_sharpness", value=100 * increase / (1 + loss),
                       iterations=sum(r.iterations for r in results), samples=restarts, seed=seed,
                       settings=settings)


# ------------------------------------------------------------------------------------------------ SALR
@accepts_compiled
def salr_sharpness(model: nn.Module, loss_fn: LossFn, data: Batch | Any, epsilon: float, *, steps: int = 20,
                   restarts: int = 3, step_size: float = 0.5, seed: int = 0,
                   mode: str = "eval") -> Measurement:
    """SALR's sharpness (eq. (2)): ``S(eps) = max_{||e|| <= eps} L(w + e) - min_{||e|| <= eps} L(w + e)``.

    Unlike ``R_SAM`` it does not vanish at a local maximum; at a local minimum (with no lower point in the
    ball) it equals ``R_SAM`` with ``rho = eps``. The maximum is estimated as in :func:`sam_sharpness`, the
    minimum by the same projected search on ``-L`` (first start ``-eps g / ||g||``). ``settings`` holds
    ``max_loss``, ``min_loss`` and ``loss = L(w)``.

    Args:
        epsilon: the radius, ``> 0``.
        steps, restarts, step_size, seed, mode: as in :func:`sam_sharpness`, for each of the two searches.
    """
    epsilon = check_positive("epsilon", epsilon)
    steps, restarts, step_size, seed = _check_search(steps, restarts, step_size, seed)
    check_mode(mode)
    params, batches = _setup(model, data)
    counter = _Counter()
    generator = torch.Generator().manual_seed(seed)
    region = Ball(epsilon)
    with measurement_mode(model, mode):
        loss, grad = gradient(model, loss_fn, batches, params)
        counter.gradients += 1
        up = region.steepest(grad)
        search = {"steps": steps, "restarts": restarts, "step_size": step_size, "generator": generator}
        ascent = search_with_restarts(_loss_probe(model, loss_fn, batches, params, counter), region, up,
                                      params, **search)
        down = None if up is None else [-u for u in up]  # the minimum: the same search on -L
        descent = search_with_restarts(_loss_probe(model, loss_fn, batches, params, counter, sign=-1.0),
                                       region, down, params, **search)
    max_loss = max(max(r.value for r in ascent), loss)
    min_loss = min(min(-r.value for r in descent), loss)
    settings = {"epsilon": epsilon, "loss": loss, "max_loss": max_loss, "min_loss": min_loss,
                **_search_settings(steps, restarts, step_size, mode, ascent + descent, counter)}
    return Measurement(name="salr_sharpness", value=max_loss - min_loss,
                       iterations=sum(r.iterations for r in ascent + descent), samples=2 * restarts,
                       seed=seed, settings=settings)


def _check_salr_steps(gamma: object, ascent_steps: object, descent_steps: object) -> tuple[float, int, int]:
    gamma = check_positive("gamma", gamma)
    ascent_steps = check_int_at_least("ascent_steps", ascent_steps, 0)
    descent_steps = check_int_at_least("descent_steps", descent_steps, 0)
    if ascent_steps + descent_steps == 0:
        raise ValueError("Invalid ascent_steps/descent_steps values: 0 and 0 (expected at least one step)")
    return gamma, ascent_steps, descent_steps


def _normalized_walk(params: Sequence[Tensor], direction_at: Any, gamma: float, steps: int,
                     sign: float) -> Vector:
    """``e_{i+1} = e_i + sign * gamma * d(w + e_i)`` for ``steps`` steps from ``e_0 = 0`` (the walk shared with
    the SALR optimizer, :func:`sharpness._walk.normalized_walk_`)."""
    return normalized_walk_([torch.empty_like(p) for p in params], direction_at, gamma, steps, sign)  # zeroed there


def _salr_steps_measurement(name: str, model: nn.Module, loss_fn: LossFn, batches: list,
                            params: Sequence[Tensor], direction_at: Any, gamma: float, ascent_steps: int,
                            descent_steps: int, mode: str, extra: dict[str, Any]) -> Measurement:
    e_plus = _normalized_walk(params, direction_at, gamma, ascent_steps, +1.0)
    e_minus = _normalized_walk(params, direction_at, gamma, descent_steps, -1.0)
    loss = mean_loss(model, loss_fn, batches)
    with shifted_parameters(params, e_plus):
        loss_plus = mean_loss(model, loss_fn, batches)
    with shifted_parameters(params, e_minus):
        loss_minus = mean_loss(model, loss_fn, batches)
    settings = {"gamma": gamma, "ascent_steps": ascent_steps, "descent_steps": descent_steps, "mode": mode,
                "loss": loss, "loss_plus": loss_plus, "loss_minus": loss_minus,
                "ascent_distance": float(norm(e_plus)), "descent_distance": float(norm(e_minus)), **extra}
    return Measurement(name=name, value=loss_plus - loss_minus, iterations=ascent_steps + descent_steps,
                       settings=settings)


@accepts_compiled
def salr_sharpness_hat(model: nn.Module, loss_fn: LossFn, data: Batch | Any, gamma: float, *,
                       ascent_steps: int = 5, descent_steps: int = 5, mode: str = "eval") -> Measurement:
    """SALR's step sharpness ``S_hat`` (Definition 1): normalized gradient ascent and descent from ``w``::

        w_+^{(i+1)} = w_+^{(i)} + gamma g(w_+^{(i)}) / ||g(w_+^{(i)})||      (ascent_steps = n_2 steps)
        w_-^{(i+1)} = w_-^{(i)} - gamma g(w_-^{(i)}) / ||g(w_-^{(i)})||      (descent_steps = n_1 steps)
        S_hat(w) = L(w_+) - L(w_-) = [L(w_+) - L(w)] + [L(w) - L(w_-)]

    with ``w_+^{(0)} = w_-^{(0)} = w`` and the full-data gradient ``g``. The iterates stay in the ball of
    radius ``max(n_1, n_2) gamma`` (Remark 3). Where ``g = 0`` the normalized step is undefined; the walk
    stays put. Note the paper's text says "n1 ascent and n2 descent steps" while its formula (and
    Algorithm 2) use ``n_2`` for ascent and ``n_1`` for descent; the keyword names here say which is which.

    Args:
        gamma: the step length, ``> 0``.
        ascent_steps, descent_steps: ``n_2`` and ``n_1``, each ``>= 0``, not both zero.
        mode: ``"eval"`` (default) or ``"train"``.
    """
    gamma, ascent_steps, descent_steps = _check_salr_steps(gamma, ascent_steps, descent_steps)
    check_mode(mode)
    params, batches = _setup(model, data)

    def direction_at(e: Vector) -> Vector:
        with shifted_parameters(params, e):
            _, grad = gradient(model, loss_fn, batches, params)
        size = float(norm(grad))
        return [g / size for g in grad] if size > 0.0 else [torch.zeros_like(g) for g in grad]

    with measurement_mode(model, mode):
        return _salr_steps_measurement("salr_sharpness_hat", model, loss_fn, batches, params, direction_at,
                                       gamma, ascent_steps, descent_steps, mode,
                                       {"gradient_evaluations": ascent_steps + descent_steps})


@accepts_compiled
def salr_stochastic_sharpness(model: nn.Module, loss_fn: LossFn, data: Batch | Any, gamma: float, *,
                              ascent_steps: int = 5, descent_steps: int = 5, mode: str = "eval",
                              chunk_size: int | None = None) -> Measurement:
    """SALR's stochastic sharpness ``S_hat_k`` (Algorithm 2): steps along per-sample normalized gradients::

        w_{+/-}^{(i+1)} = w_{+/-}^{(i)} +/- gamma (1/|B|) sum_j grad f_j / ||grad f_j||     at w_{+/-}^{(i)}
        S_hat_k = (1/|B|) sum_j f_j(w_+) - (1/|B|) sum_j f_j(w_-)

    over all samples ``j`` of ``data`` (one batch ``B_k`` in the paper; several batches are pooled). The
    per-sample gradients come from ``torch.func`` (``vmap`` of ``grad``; ``chunk_size`` bounds its memory).
    A sample with a zero gradient contributes nothing to the step. BatchNorm in ``mode="train"`` is rejected
    (per-sample losses need per-sample statistics).

    Args:
        gamma, ascent_steps, descent_steps, mode: as in :func:`salr_sharpness_hat`.
        chunk_size: samples per ``vmap`` chunk, ``>= 1``, or None for all at once.
    """
    gamma, ascent_steps, descent_steps = _check_salr_steps(gamma, ascent_steps, descent_steps)
    check_mode(mode)
    if chunk_size is not None:
        chunk_size = check_int_at_least("chunk_size", chunk_size, 1)
    params, batches = _setup(model, data)
    check_per_sample_mode(model, mode)
    total = sum(n for _, _, n in batches)

    def direction_at(e: Vector) -> Vector:
        out = [torch.zeros_like(p) for p in params]
        with shifted_parameters(params, e):
            for x, y, _ in batches:
                _, grads = per_sample_gradients(model, loss_fn, x, y, chunk_size=chunk_size)
                scale = per_sample_inverse_norms(grads)  # 1 / ||grad f_j||, [n]
                for acc, g in zip(out, grads):
                    acc.add_(torch.tensordot(scale.to(g.dtype), g, dims=1), alpha=1.0 / total)
        return out

    extra = {"samples": total, "chunk_size": chunk_size,
             "per_sample_gradient_evaluations": (ascent_steps + descent_steps) * total}
    with measurement_mode(model, mode):
        return _salr_steps_measurement("salr_stochastic_sharpness", model, loss_fn, batches, params,
                                       direction_at, gamma, ascent_steps, descent_steps, mode, extra)

