"""Loss landscapes: slices of ``L`` through the weights ``w``, the local extrema along them, and their plots.

* :func:`interpolate`: ``L((1 - a) w_A + a w_B)`` between two solutions (Goodfellow et al., 2015).
* :func:`loss_along_direction` / :func:`loss_surface`: ``L(w + a d)`` and ``L(w + a d_1 + b d_2)`` along
  random filter-normalized directions (Li et al., 2018): a Gaussian ``d`` rescaled filter by filter,
  ``d_{i,j} <- d_{i,j} ||w_{i,j}|| / ||d_{i,j}||`` (filter ``j`` = slice ``j`` along dim 0 of parameter
  ``i``), so slices of differently scaled networks are comparable.
* :func:`count_local_extrema`: local minima and maxima of ``L`` along random directions within radius
  ``rho`` (GNR paper, section 3.1 and Fig. 1b).
* :func:`plot_lines`, :func:`plot_loss_curve`, :func:`plot_loss_surface`: PNG files via matplotlib's Agg
  renderer (a ``matplotlib.figure.Figure``, no pyplot state, no backend switch). matplotlib is imported only
  when plotting.

Every function evaluates inside :func:`~sharpness.measures._common.measurement_mode` (eval by default) and
restores the model's weights and buffers bit for bit.

References:
    Goodfellow, Vinyals, Saxe. Qualitatively Characterizing Neural Network Optimization Problems. ICLR 2015.
    Li, Xu, Taylor, Studer, Goldstein. Visualizing the Loss Landscape of Neural Nets. NeurIPS 2018.
    Gradient Norm Regularizer Seeks Flat Minima and Improves Generalization (GNR; ICLR 2023 submission).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._compile import accepts_compiled
from .._validation import check_choice, check_finite, check_int_at_least, check_positive
from ._common import (Batch, LossFn, Vector, as_batches, mean_loss, measurement_mode, norm, random_vector,
                      shifted_parameters, trainable_parameters)
from ._common import check_mode
from .result import Measurement

__all__ = ["BIAS_BN", "DIRECTION_NORMALIZATIONS", "LossCurve", "LossSurface", "count_local_extrema",
           "filter_normalized_direction", "interpolate", "loss_along_direction", "loss_surface", "plot_lines",
           "plot_loss_curve", "plot_loss_surface", "random_direction"]

DIRECTION_NORMALIZATIONS = ("filter", "unit")
BIAS_BN = ("zero", "weights")


def _frozen(array: Any) -> np.ndarray:
    out = np.array(array, dtype=np.float64)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class LossCurve:
    """``losses[k] = L`` at coordinate ``coordinates[k]`` of a 1-D slice (read-only float64 arrays)."""

    coordinates: np.ndarray
    losses: np.ndarray
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSurface:
    """``losses[i, j] = L(w + x[j] d_1 + y[i] d_2)``: shape ``(len(y), len(x))``, rows follow ``y``."""

    x: np.ndarray
    y: np.ndarray
    losses: np.ndarray
    settings: Mapping[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ checks
def _check_span(name: str, span: object) -> tuple[float, float]:
    if not (isinstance(span, (tuple, list)) and len(span) == 2):
        raise TypeError(f"Invalid {name} type: {type(span).__name__} (expected a (start, stop) pair)")
    start, stop = check_finite(f"{name}[0]", span[0]), check_finite(f"{name}[1]", span[1])
    if not start < stop:
        raise ValueError(f"Invalid {name} value: {tuple(span)} (expected start < stop)")
    return start, stop



def _check_direction(name: str, direction: Sequence[Tensor], params: Sequence[Tensor]) -> Vector:
    direction = list(direction)
    if len(direction) != len(params) or any(d.shape != p.shape for d, p in zip(direction, params)):
        raise ValueError(f"Invalid {name}: expected one tensor per trainable parameter, with the same shapes")
    return [d.detach().to(device=p.device, dtype=p.dtype) for d, p in zip(direction, params)]


# ------------------------------------------------------------------------------------------------ directions
def _filter_normalize(direction: Vector, params: Sequence[Tensor], bias_bn: str) -> Vector:
    out = []
    for d, w in zip(direction, params):
        w = w.detach()
        if d.dim() <= 1:  # biases, normalization vectors, scalars: Li et al.'s ignore='biasbn', or copy w
            out.append(torch.zeros_like(d) if bias_bn == "zero" else w.clone())
            continue
        d_norms = d.flatten(1).norm(dim=1)
        w_norms = w.flatten(1).norm(dim=1)
        scale = torch.where(d_norms > 0, w_norms / d_norms.clamp_min(torch.finfo(d.dtype).tiny), 0.0)
        out.append(d * scale.view(-1, *[1] * (d.dim() - 1)))
    return out


def _draw_direction(params: Sequence[Tensor], generator: torch.Generator, normalization: str,
                    bias_bn: str) -> Vector:
    d = random_vector(params, generator)
    if normalization == "filter":
        return _filter_normalize(d, params, bias_bn)
    size = float(norm(d))
    return [x / size for x in d]


@accepts_compiled
def filter_normalized_direction(model: nn.Module, *, seed: int = 0, bias_bn: str = "zero") -> Vector:
    """A random Gaussian direction, filter-normalized as in Li et al. (2018), section 4.

    For a parameter with ``dim >= 2`` each filter (slice along dim 0, e.g. an output channel of a conv
    weight or a row of a linear weight) is rescaled to the norm of the matching filter of the weights:
    ``d_{i,j} <- d_{i,j} ||w_{i,j}|| / ||d_{i,j}||``. Parameters with ``dim <= 1`` (biases, normalization
    scales) get ``0`` (``bias_bn="zero"``, Li et al.'s default ``ignore='biasbn'``) or a copy of the weights
    (``bias_bn="weights"``).

    Returns a list of tensors shaped like the trainable parameters.
    """
    check_int_at_least("seed", seed, 0)
    check_choice("bias_bn", bias_bn, BIAS_BN)
    params = trainable_parameters(model)
    return _draw_direction(params, torch.Generator().manual_seed(seed), "filter", bias_bn)


@accepts_compiled
def random_direction(model: nn.Module, *, normalization: str = "filter", seed: int = 0,
                     bias_bn: str = "zero") -> Vector:
    """A random direction: filter-normalized (``"filter"``, see :func:`filter_normalized_direction`) or a
    Gaussian scaled to unit Euclidean norm (``"unit"``)."""
    check_int_at_least("seed", seed, 0)
    check_choice("normalization", normalization, DIRECTION_NORMALIZATIONS)
    check_choice("bias_bn", bias_bn, BIAS_BN)
    params = trainable_parameters(model)
    return _draw_direction(params, torch.Generator().manual_seed(seed), normalization, bias_bn)


# ------------------------------------------------------------------------------------------------ 1-D, 2-D
def _state_of(other: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(other, nn.Module):
        return other.state_dict()
    if isinstance(other, Mapping):
        return other
    raise TypeError(f"Invalid other type: {type(other).__name__} (expected a torch.nn.Module or a state "
                    "dict)")


@accepts_compiled
def interpolate(model: nn.Module, loss_fn: LossFn, data: Batch | Any,
                other: nn.Module | Mapping[str, Tensor], *, points: int = 21,
                span: tuple[float, float] = (0.0, 1.0), mode: str = "eval",
                plot_path: str | Path | None = None) -> LossCurve:
    """The loss on the segment between two solutions: ``L((1 - a) w_A + a w_B)`` (Goodfellow et al., 2015).

    ``model`` holds ``w_A``; ``other`` is a second model of the same architecture or its state dict (``w_B``).
    Every floating-point entry of the state dict is interpolated (parameters and buffers such as BatchNorm
    running statistics, so in eval mode ``a = 0`` and ``a = 1`` reproduce both models' losses exactly);
    integer buffers keep ``model``'s values. ``a`` runs over ``points`` equally spaced values in ``span``
    (``(-0.5, 1.5)`` shows the landscape beyond both ends).
    """
    points = check_int_at_least("points", points, 2)
    start, stop = _check_span("span", span)
    check_mode(mode)
    trainable_parameters(model)
    batches = as_batches(data)
    target = _state_of(other)
    own = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    missing = sorted(set(own) - set(target))
    if missing:
        raise ValueError(f"Invalid other: state dict lacks {', '.join(missing)} (expected the same "
                         "architecture)")
    for key, value in own.items():
        if target[key].shape != value.shape:
            raise ValueError(f"Invalid other: {key} has shape {tuple(target[key].shape)} (expected "
                             f"{tuple(value.shape)}, the same architecture)")
    ends = {k: (v.detach().clone(), target[k].detach().to(device=v.device, dtype=v.dtype))
            for k, v in own.items()}
    alphas = np.linspace(start, stop, points)
    losses = []
    try:
        with measurement_mode(model, mode), torch.no_grad():
            for alpha in alphas:
                a = float(alpha)
                for key, value in own.items():
                    w_a, w_b = ends[key]
                    value.copy_(w_a * (1.0 - a) + w_b * a)
                losses.append(mean_loss(model, loss_fn, batches))
    finally:
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(ends[key][0])
    curve = LossCurve(_frozen(alphas), _frozen(losses), {"kind": "interpolation", "span": (start, stop),
                                                         "points": points, "mode": mode})
    if plot_path is not None:
        plot_loss_curve(curve, plot_path, xlabel="interpolation coefficient a")
    return curve


@accepts_compiled
def loss_along_direction(model: nn.Module, loss_fn: LossFn, data: Batch | Any,
                         direction: Sequence[Tensor] | None = None, *,
                         span: tuple[float, float] = (-1.0, 1.0), points: int = 21,
                         normalization: str = "filter", bias_bn: str = "zero", seed: int = 0,
                         mode: str = "eval",
                         plot_path: str | Path | None = None) -> LossCurve:
    """The 1-D slice ``L(w + a d)`` for ``points`` equally spaced ``a`` in ``span`` (Li et al., 2018).

    ``direction`` is a list of tensors shaped like the trainable parameters; when None it is drawn with
    :func:`random_direction` (``normalization``, ``bias_bn``, ``seed``).
    """
    points = check_int_at_least("points", points, 2)
    start, stop = _check_span("span", span)
    check_mode(mode)
    params = trainable_parameters(model)
    batches = as_batches(data)
    drawn = direction is None
    if drawn:
        direction = random_direction(model, normalization=normalization, seed=seed, bias_bn=bias_bn)
    direction = _check_direction("direction", direction, params)
    alphas = np.linspace(start, stop, points)
    with measurement_mode(model, mode):
        losses = []
        for alpha in alphas:
            with shifted_parameters(params, direction, float(alpha)):
                losses.append(mean_loss(model, loss_fn, batches))
    curve = LossCurve(_frozen(alphas), _frozen(losses),
                      {"kind": "direction", "span": (start, stop), "points": points, "mode": mode,
                       "direction": "drawn" if drawn else "given",
                       "normalization": normalization if drawn else None,
                       "bias_bn": bias_bn if drawn else None, "seed": seed if drawn else None,
                       "direction_norm": float(norm(direction))})
    if plot_path is not None:
        plot_loss_curve(curve, plot_path, xlabel="step along the direction a")
    return curve


def _grid_points(points: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(points, (tuple, list)):
        if len(points) != 2:
            raise TypeError(f"Invalid points type: a sequence of length {len(points)} (expected an int or "
                            "(nx, ny))")
        return check_int_at_least("points[0]", points[0], 2), check_int_at_least("points[1]", points[1], 2)
    n = check_int_at_least("points", points, 2)
    return n, n


@accepts_compiled
def loss_surface(model: nn.Module, loss_fn: LossFn, data: Batch | Any,
                 directions: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None, *,
                 x_span: tuple[float, float] = (-1.0, 1.0), y_span: tuple[float, float] = (-1.0, 1.0),
                 points: int | tuple[int, int] = 21, normalization: str = "filter", bias_bn: str = "zero",
                 seed: int = 0, mode: str = "eval", plot_path: str | Path | None = None) -> LossSurface:
    """The 2-D slice ``L(w + a d_1 + b d_2)`` on a ``points`` grid over ``x_span x y_span`` (Li et al., 2018).

    ``directions`` is a pair of parameter-shaped lists; when None both are drawn from one generator seeded
    with ``seed`` (``normalization``, ``bias_bn`` as in :func:`random_direction`). ``points`` is ``n`` (an
    ``n x n`` grid) or ``(nx, ny)``. ``plot_path`` writes a contour plot (:func:`plot_loss_surface`).
    """
    nx, ny = _grid_points(points)
    x0, x1 = _check_span("x_span", x_span)
    y0, y1 = _check_span("y_span", y_span)
    check_mode(mode)
    check_int_at_least("seed", seed, 0)
    params = trainable_parameters(model)
    batches = as_batches(data)
    drawn = directions is None
    if drawn:
        check_choice("normalization", normalization, DIRECTION_NORMALIZATIONS)
        check_choice("bias_bn", bias_bn, BIAS_BN)
        generator = torch.Generator().manual_seed(seed)
        directions = (_draw_direction(params, generator, normalization, bias_bn),
                      _draw_direction(params, generator, normalization, bias_bn))
    if not (isinstance(directions, (tuple, list)) and len(directions) == 2):
        raise TypeError(f"Invalid directions type: {type(directions).__name__} (expected a pair of "
                        "directions)")
    d1 = _check_direction("directions[0]", directions[0], params)
    d2 = _check_direction("directions[1]", directions[1], params)
    xs, ys = np.linspace(x0, x1, nx), np.linspace(y0, y1, ny)
    losses = np.empty((ny, nx))
    with measurement_mode(model, mode):
        for i, b in enumerate(ys):
            for j, a in enumerate(xs):
                shift = [float(a) * u + float(b) * v for u, v in zip(d1, d2)]
                with shifted_parameters(params, shift):
                    losses[i, j] = mean_loss(model, loss_fn, batches)
    surface = LossSurface(_frozen(xs), _frozen(ys), _frozen(losses),
                          {"x_span": (x0, x1), "y_span": (y0, y1), "points": (nx, ny), "mode": mode,
                           "directions": "drawn" if drawn else "given",
                           "normalization": normalization if drawn else None,
                           "bias_bn": bias_bn if drawn else None, "seed": seed if drawn else None})
    if plot_path is not None:
        plot_loss_surface(surface, plot_path)
    return surface


# ------------------------------------------------------------------------------------------------ extrema
def _count_strict_extrema(values: Sequence[float]) -> tuple[int, int]:
    """``(minima, maxima)``: interior samples strictly below (above) both neighbours."""
    minima = maxima = 0
    for left, mid, right in zip(values, values[1:], values[2:]):
        if mid < left and mid < right:
            minima += 1
        elif mid > left and mid > right:
            maxima += 1
    return minima, maxima


@accepts_compiled
def count_local_extrema(model: nn.Module, loss_fn: LossFn, data: Batch | Any, rho: float, *,
                        directions: int = 100, points: int = 11, normalization: str = "unit",
                        bias_bn: str = "zero", two_sided: bool = False, seed: int = 0,
                        mode: str = "eval") -> Measurement:
    """Local minima and maxima of ``L`` along random directions within radius ``rho`` (GNR, section 3.1).

    For each of ``directions`` random directions ``d`` scaled to unit Euclidean norm (Gaussian for
    ``normalization="unit"``, the GNR paper's choice; filter-normalized first for ``"filter"``), the loss is
    sampled at ``t_k = k rho / (points - 1)``, ``k = 0..points-1`` (GNR: ``rho = 0.1``, 10 steps of 0.01 from
    ``w``, so ``points=11``), or at ``points`` equally spaced ``t`` in ``[-rho, rho]`` with
    ``two_sided=True`` (then ``w`` itself can count). A sample strictly below (above) both neighbours is a
    local minimum (maximum); the end samples and flat runs never count, so the counts are those the sampling
    resolves.

    ``value`` is the mean number of local extrema (minima + maxima) per direction, ``stderr`` its standard
    error; ``settings`` holds the per-direction ``minima`` and ``maxima`` lists (Fig. 1b's histograms) and
    their means.
    """
    rho = check_positive("rho", rho)
    directions = check_int_at_least("directions", directions, 1)
    points = check_int_at_least("points", points, 3)
    seed = check_int_at_least("seed", seed, 0)
    check_choice("normalization", normalization, DIRECTION_NORMALIZATIONS)
    check_choice("bias_bn", bias_bn, BIAS_BN)
    if not isinstance(two_sided, bool):
        raise TypeError(f"Invalid two_sided type: {type(two_sided).__name__} (expected a bool)")
    check_mode(mode)
    params = trainable_parameters(model)
    batches = as_batches(data)
    generator = torch.Generator().manual_seed(seed)
    ts = np.linspace(-rho if two_sided else 0.0, rho, points)
    minima, maxima = [], []
    with measurement_mode(model, mode):
        for _ in range(directions):
            d = _draw_direction(params, generator, normalization, bias_bn)
            size = float(norm(d))
            if size == 0.0:
                raise ValueError("Invalid direction: it is zero (all trainable parameters are biases or "
                                 "normalization vectors with bias_bn='zero'; use bias_bn='weights' or "
                                 "normalization='unit')")
            d = [x / size for x in d]
            values = []
            for t in ts:
                with shifted_parameters(params, d, float(t)):
                    values.append(mean_loss(model, loss_fn, batches))
            if not all(math.isfinite(v) for v in values):  # a NaN compares False: it would read as "no extremum"
                raise ValueError(f"Invalid loss: non-finite values along a direction ({values}); the landscape "
                                 "has no extrema count (check the data for NaN or lower rho)")
            low, high = _count_strict_extrema(values)
            minima.append(low)
            maxima.append(high)
    totals = [a + b for a, b in zip(minima, maxima)]
    mean = sum(totals) / directions
    stderr = (math.sqrt(sum((t - mean) ** 2 for t in totals) / (directions - 1) / directions)
              if directions > 1 else None)
    return Measurement(name="count_local_extrema", value=mean, stderr=stderr, samples=directions, seed=seed,
                       settings={"rho": rho, "points": points, "two_sided": two_sided,
                                 "normalization": normalization, "bias_bn": bias_bn, "mode": mode,
                                 "minima": minima, "maxima": maxima, "mean_minima": sum(minima) / directions,
                                 "mean_maxima": sum(maxima) / directions})


# ------------------------------------------------------------------------------------------------ plots
def _figure(size: tuple[float, float]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install matplotlib") from error
    return Figure(figsize=size)


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight")
    return path


def plot_lines(x: Sequence[float] | np.ndarray, series: Mapping[str, Sequence[float] | np.ndarray],
               path: str | Path, *, xlabel: str = "", ylabel: str = "", title: str | None = None,
               dpi: int = 100) -> Path:
    """A line plot of one or more ``{label: y}`` series over ``x``, written as a PNG to ``path``."""
    if not series:
        raise ValueError("Invalid series: empty (expected at least one {label: values} entry)")
    fig = _figure((6.0, 4.0))
    ax = fig.add_subplot()
    for label, y in series.items():
        if len(y) != len(x):
            raise ValueError(f"Invalid series {label!r}: {len(y)} values (expected {len(x)}, one per x)")
        ax.plot(np.asarray(x), np.asarray(y), label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(True, alpha=0.3)
    return _save(fig, path, dpi)


def plot_loss_curve(curves: LossCurve | Mapping[str, LossCurve], path: str | Path, *, xlabel: str = "a",
                    title: str | None = None, dpi: int = 100) -> Path:
    """Plot one curve or ``{label: curve}`` (sharing coordinates) as a PNG."""
    if isinstance(curves, LossCurve):
        curves = {"loss": curves}
    first = next(iter(curves.values()))
    for label, curve in curves.items():
        if not np.array_equal(curve.coordinates, first.coordinates):
            raise ValueError(f"Invalid curves: {label!r} has other coordinates (expected shared coordinates)")
    return plot_lines(first.coordinates, {k: c.losses for k, c in curves.items()}, path, xlabel=xlabel,
                      ylabel="loss", title=title, dpi=dpi)


def plot_loss_surface(surface: LossSurface, path: str | Path, *, levels: int = 30, log_scale: bool = False,
                      title: str | None = None, dpi: int = 100) -> Path:
    """A filled contour plot of a :class:`LossSurface` as a PNG (``log_scale``: of ``log10(loss)``)."""
    check_int_at_least("levels", levels, 2)
    values = surface.losses
    if log_scale:
        if not (values > 0).all():
            raise ValueError("Invalid log_scale value: True with non-positive losses (expected losses > 0)")
        values = np.log10(values)
    fig = _figure((5.5, 4.5))
    ax = fig.add_subplot()
    filled = ax.contourf(surface.x, surface.y, values, levels=levels, cmap="viridis")
    ax.contour(surface.x, surface.y, values, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(filled, ax=ax, label="log10 loss" if log_scale else "loss")
    ax.plot([0.0], [0.0], marker="x", color="red")
    ax.set_xlabel("a (direction 1)")
    ax.set_ylabel("b (direction 2)")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)
