"""Gradient statistics as sharpness measures (AE-SAM, Jiang et al., ICLR 2023, section 3.1).

With ``g_B = grad L(B; w)`` the gradient of the mean loss on mini-batch ``B`` and ``g_D = E_B g_B`` the
full-data gradient, AE-SAM's eq. (3)::

    Var(g_B) = E_B ||g_B - g_D||^2 = E_B ||g_B||^2 - ||g_D||^2

:func:`gradient_variance` is the left-hand side (Jiang et al., 2020, correlate it with the generalization
gap), :func:`mean_squared_gradient_norm` is ``E_B ||g_B||^2`` (the statistic AE-SAM's policy tracks; the two
agree at a critical point of ``L(D; w)``). The expectation runs over the given batches, each weighted by its
size ``n_B / N`` (so that ``g_D = sum_B (n_B / N) g_B`` is the gradient of the size-weighted mean loss and
eq. (3) holds exactly); ``per_sample=True`` uses every sample as its own batch (AE-SAM's Assumption 3.2).
The deviation form is computed directly (two passes), not by the cancelling difference.

Reference: Jiang, Yang, Zhang, Kwok. An Adaptive Policy to Employ Sharpness-Aware Minimization. ICLR 2023.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .._compile import accepts_compiled
from .._validation import check_int_at_least
from ._common import Batch, LossFn, as_batches, gradient, measurement_mode, norm, trainable_parameters
from ._per_sample import check_per_sample_mode, per_sample_gradients
from ._common import check_mode
from .result import Measurement

__all__ = ["gradient_variance", "mean_squared_gradient_norm"]


def _weighted_mean_and_stderr(values: list[float], weights: list[float]) -> tuple[float, float | None]:
    mean = sum(w * v for w, v in zip(weights, values))
    k = len(values)
    if k < 2:
        return mean, None
    spread = sum(w * w * (v - mean) ** 2 for w, v in zip(weights, values)) * k / (k - 1)
    return mean, math.sqrt(spread)


def _gradient_moments(model: nn.Module, loss_fn: LossFn, data: Batch | Any, per_sample: bool, mode: str,
                      chunk_size: int | None) -> tuple[list[float], list[float], list[float], float]:
    """Per unit (batch or sample) ``n_B / N``, ``||g_B||^2``, ``||g_B - g_D||^2``; and ``||g_D||^2``."""
    check_mode(mode)
    if chunk_size is not None:
        chunk_size = check_int_at_least("chunk_size", chunk_size, 1)
    params = trainable_parameters(model)
    batches = as_batches(data)
    if per_sample:
        check_per_sample_mode(model, mode)
    total = sum(n for _, _, n in batches)
    weights, squares, deviations = [], [], []
    with measurement_mode(model, mode):
        _, full = gradient(model, loss_fn, batches, params)
        for x, y, n in batches:
            if per_sample:
                _, grads = per_sample_gradients(model, loss_fn, x, y, chunk_size=chunk_size)
                sq = sum(g.flatten(1).double().pow(2).sum(1) for g in grads)
                dev = sum((g - f.unsqueeze(0)).flatten(1).double().pow(2).sum(1) for g, f in zip(grads, full))
                weights += [1.0 / total] * n
                squares += sq.tolist()
                deviations += dev.tolist()
            else:
                _, grad = gradient(model, loss_fn, [(x, y, n)], params)
                weights.append(n / total)
                squares.append(float(norm(grad)) ** 2)
                deviations.append(float(norm([g - f for g, f in zip(grad, full)])) ** 2)
    return weights, squares, deviations, float(norm(full)) ** 2


@accepts_compiled
def gradient_variance(model: nn.Module, loss_fn: LossFn, data: Batch | Any, *, per_sample: bool = False,
                      mode: str = "eval", chunk_size: int | None = None) -> Measurement:
    """The stochastic gradient variance ``E_B ||g_B - g_D||^2`` over the given batches (AE-SAM eq. (3)).

    Args:
        model, loss_fn, data: ``data`` is an iterable of ``(inputs, targets)`` batches, at least two (or one
            batch with ``per_sample=True``); each batch's weight is its size over the total.
        per_sample: use every sample as its own batch (per-sample gradients via ``torch.func``).
        mode: ``"eval"`` (default) or ``"train"``.
        chunk_size: samples per ``vmap`` chunk with ``per_sample=True``.

    ``stderr`` is the standard error of the weighted mean over the batches; ``settings`` holds
    ``mean_squared_norm`` (``E_B ||g_B||^2``) and ``full_gradient_squared_norm`` (``||g_D||^2``), whose
    difference equals the value up to rounding.
    """
    weights, squares, deviations, full_sq = _gradient_moments(model, loss_fn, data, per_sample, mode,
                                                              chunk_size)
    if len(weights) < 2:
        unit = "sample (per_sample=True)" if per_sample else "batch"
        raise ValueError(f"Invalid data: 1 {unit} (expected at least 2 {'samples' if per_sample else 'batches'}"
                         f"{'' if per_sample else ', or per_sample=True'} to estimate a variance)")
    value, stderr = _weighted_mean_and_stderr(deviations, weights)
    msq, _ = _weighted_mean_and_stderr(squares, weights)
    return Measurement(name="gradient_variance", value=value, stderr=stderr, samples=len(weights),
                       settings={"per_sample": per_sample, "mode": mode, "mean_squared_norm": msq,
                                 "full_gradient_squared_norm": full_sq})


@accepts_compiled
def mean_squared_gradient_norm(model: nn.Module, loss_fn: LossFn, data: Batch | Any, *,
                               per_sample: bool = False, mode: str = "eval",
                               chunk_size: int | None = None) -> Measurement:
    """The mean squared mini-batch gradient norm ``E_B ||g_B||^2`` (AE-SAM section 3.1, Fig. 2).

    Arguments as in :func:`gradient_variance` (one batch is allowed). ``settings`` holds ``variance`` and
    ``full_gradient_squared_norm``.
    """
    weights, squares, deviations, full_sq = _gradient_moments(model, loss_fn, data, per_sample, mode,
                                                              chunk_size)
    value, stderr = _weighted_mean_and_stderr(squares, weights)
    variance, _ = _weighted_mean_and_stderr(deviations, weights)
    return Measurement(name="mean_squared_gradient_norm", value=value, stderr=stderr, samples=len(weights),
                       settings={"per_sample": per_sample, "mode": mode, "variance": variance,
                                 "full_gradient_squared_norm": full_sq})
