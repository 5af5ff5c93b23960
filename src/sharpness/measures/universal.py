r"""Universal (phi, psi, mu)-sharpness (Tahmasebi et al., 2024): one family that represents any function of H.

A sharpness measure is a triple ``(phi, psi, mu)``: a direction law ``mu`` on the parameters, a map
``psi: R -> R^n`` of the quadratic form ``d^T H d`` and an outer map ``phi: R^n -> R``,

.. math::
    S(w) = \phi\Big( \mathbb{E}_{d \sim \mu}\, \psi\big(d^\top H(w)\, d\big) \Big),

estimated from ``m`` samples ``d_i`` as ``phi((1/m) sum_i psi(x_i))``. The quadratic forms ``x_i`` are either
exact (``rho=None``: ``x_i = d_i^T H d_i`` from Hessian-vector products, or from the dense Hessian) or the
zeroth-order proxy of the paper's sharpness-aware objective (``rho > 0``):

.. math::
    x_i = \frac{2\,(L(w + \rho d_i) - L(w))}{\rho^2} \;\to\; d_i^\top H d_i \quad (\rho \to 0 \text{ at a critical point}).

Presets (the paper's Table 1, see :func:`sharpness_measure`):

=============  ============================  =============================  ==========================================
name           psi(t)                         phi(s)                         mu, and what ``value`` estimates
=============  ============================  =============================  ==========================================
``trace``      ``t``                          ``s``                          N(0, I): ``tr H``
``frobenius``  ``(t^2, t)``                   ``m/(m-1) (s_1 - s_2^2) / 2``  N(0, I): ``||H||_F^2`` (unbiased)
``det``        ``exp(-t/2)``                  ``(2 pi)^p / ((2a)^p s)^2``    uniform on ``[-a, a]^p``: ``det H`` (below)
``worst``      ``t^q``                        ``s^(1/q)``                    unit sphere: ``-> max |lambda|``, q -> inf
=============  ============================  =============================  ==========================================

Frobenius: for Gaussian ``d``, ``E[(d^T H d)^2] - (E d^T H d)^2 = 2 ||H||_F^2``; the factor ``m/(m-1)``
(Bessel) makes the estimate unbiased, and it is also what the optimizer's gradient uses (the paper's
Algorithm 2, the authors' unbiased cross-covariance).

Determinant with a finite half-width ``a``: the Lebesgue integral over R^p is truncated to the cube,
``I_a = int_{[-a,a]^p} exp(-d^T H d / 2) dd = (2a)^p E_{d ~ U[-a,a]^p} exp(-d^T H d / 2)``, and the value is
``(2 pi)^p / I_a^2``. For positive definite ``H`` this equals ``det H`` as ``a -> inf``; for finite ``a`` it is
larger than ``det H``; for a diagonal ``H = diag(h)`` exactly ``det H / prod_k erf(a sqrt(h_k / 2))^2``, so the
relative bias is below ``1e-3`` once ``a sqrt(lambda_min / 2) >= 2.5``. The Monte-Carlo error grows like
``(E psi^2 / (E psi)^2)^(1/2)``, which is exponential in ``p`` when ``a`` is large: the ``det`` preset is an
exact tool for small ``p`` and, for networks, a scale-invariant regularizer (its normalization is dropped by the
optimizer), not an accurate determinant. For singular ``H`` the truncated integral stays finite and the value
tracks the product of the non-zero eigenvalues (up to a-dependent constants).

``phi``'s normalization constant ``(2 pi)^p (2a)^(-2p)`` overflows for large ``p``, so a preset may carry it as
``log_normalizer(p)``; the measure reports ``value = exp(log_normalizer(p)) * phi(s)`` (``inf`` on overflow) and
``settings["log_value"]``; the optimizers drop the constant (it folds into ``lam``).

Reference: B. Tahmasebi, A. Soleymani, D. Bahri, S. Jegelka, P. Jaillet. A Universal Class of Sharpness-Aware
Minimization Algorithms. ICML 2024.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._compile import accepts_compiled
from .._foreach import local, squared_norm
from .._validation import check_choice, check_int_at_least, check_positive
from ._common import Batch, LossFn, as_batches, mean_loss, measurement_mode, shifted_parameters, trainable_parameters
from .hessian import dense_hessian
from .hvp import HVP_METHODS, HessianOperator
from .result import Measurement

__all__ = ["MEASURES", "GaussianSampler", "ParameterFunction", "SharpnessMeasure", "SphereSampler",
           "UniformSampler", "sharpness_measure", "universal_sharpness"]

MEASURES = ("trace", "frobenius", "det", "worst")
HESSIAN_SOURCES = ("hvp", "dense")


# ---------------------------------------------------------------------------------------------- samplers
def _fill(tensors: Sequence[Tensor], generator: torch.Generator, draw: Callable[[Tensor], None]) -> None:
    """Apply the in-place ``draw`` to each tensor, on the generator's device (copied over when it differs); to a
    ``DTensor``'s local shard (FSDP2: the generator is then the shard's own stream)."""
    for t in local(tensors):
        if t.device == generator.device:
            draw(t)
        else:
            tmp = torch.empty(t.shape, dtype=t.dtype, device=generator.device)
            draw(tmp)
            t.copy_(tmp)


class GaussianSampler:
    """``d ~ N(0, I)``: every coordinate an independent standard normal (the authors' unnormalized sampler)."""

    def __call__(self, tensors: Sequence[Tensor], generator: torch.Generator) -> None:
        _fill(tensors, generator, lambda t: t.normal_(0.0, 1.0, generator=generator))

    def fill_rows(self, matrix: Tensor, generator: torch.Generator) -> None:
        """Fill each row of ``matrix`` (shape ``[m, p]``) with one direction (batched, for the dense path)."""
        self([matrix], generator)

    def __repr__(self) -> str:
        return "GaussianSampler()"


class UniformSampler:
    """``d ~ U[-a, a]^p``: the Lebesgue measure on the hypercube of half-width ``a``, normalized to probability."""

    def __init__(self, half_width: float) -> None:
        self.half_width = check_positive("half_width", half_width)

    def __call__(self, tensors: Sequence[Tensor], generator: torch.Generator) -> None:
        a = self.half_width
        _fill(tensors, generator, lambda t: t.uniform_(-a, a, generator=generator))

    def fill_rows(self, matrix: Tensor, generator: torch.Generator) -> None:
        self([matrix], generator)

    def __repr__(self) -> str:
        return f"UniformSampler(half_width={self.half_width})"


class SphereSampler:
    """``d`` uniform on the unit sphere of R^p (a Gaussian divided by its global norm)."""

    def __call__(self, tensors: Sequence[Tensor], generator: torch.Generator) -> None:
        GaussianSampler()(tensors, generator)
        if not tensors:
            return
        inv = squared_norm(tensors).rsqrt()  # (over every shard of a DTensor)
        for t in local(tensors):
            t.mul_(inv.to(device=t.device, dtype=t.dtype))

    def fill_rows(self, matrix: Tensor, generator: torch.Generator) -> None:
        GaussianSampler()([matrix], generator)
        matrix.div_(matrix.norm(dim=1, keepdim=True))

    def __repr__(self) -> str:
        return "SphereSampler()"


Sampler = Callable[[Sequence[Tensor], torch.Generator], None]


# ---------------------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class SharpnessMeasure:
    """One ``(phi, psi, mu)`` sharpness measure (see the module docstring).

    Attributes:
        name: a short name (``"trace"``, ``"my_measure"``...).
        phi: ``s`` (a tensor of shape ``[n]``) -> a 0-d tensor; differentiable (autograd gives ``dphi/ds``).
        psi: ``x`` (shape ``[m]``) -> shape ``[m, n]`` (``[m]`` also accepted when ``n == 1``); elementwise in
            ``x`` and differentiable.
        sampler: fills a list of parameter-shaped tensors in place with one direction ``d ~ mu``:
            ``sampler(tensors, generator)`` (:class:`GaussianSampler`, :class:`UniformSampler`, ...).
        n: the number of components of ``psi``.
        min_samples: the fewest samples per estimate (2 for a variance such as Frobenius).
        bessel: multiply ``phi`` by ``m / (m - 1)`` (unbiased variance-type ``phi``; the Frobenius preset).
        log_normalizer: optional ``p -> log C(p)`` of a positive constant the measure's value is multiplied by
            (reported, never used by the optimizers: it folds into ``lam``).
        target: what the value estimates, in words (documentation only).
        psi_prime: optional closed form of ``psi'``: ``x`` (shape ``[m]``) -> shape ``[m, n]`` (``[m]`` when
            ``n == 1``), ``d psi_j(x_i) / d x_i``. Without it autograd computes it (one backward per component).
        phi_grad: optional closed form of ``grad phi``: ``s`` (shape ``[n]``) -> shape ``[n]``, without the
            Bessel factor. Without it autograd computes it. The presets carry both (a test checks them against
            autograd); they save the optimizer's step two autograd calls, which cost more host time than a
            small model's update.
    """

    name: str
    phi: Callable[[Tensor], Tensor]
    psi: Callable[[Tensor], Tensor]
    sampler: Sampler
    n: int = 1
    min_samples: int = 1
    bessel: bool = False
    log_normalizer: Callable[[int], float] | None = None
    target: str = ""
    psi_prime: Callable[[Tensor], Tensor] | None = None
    phi_grad: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        for key in ("phi", "psi", "sampler"):
            if not callable(getattr(self, key)):
                raise TypeError(f"Invalid {key} type: {type(getattr(self, key)).__name__} (expected a callable)")
        for key in ("psi_prime", "phi_grad"):
            if getattr(self, key) is not None and not callable(getattr(self, key)):
                raise TypeError(f"Invalid {key} type: {type(getattr(self, key)).__name__} (expected a callable "
                                "or None)")
        if self.log_normalizer is not None and not callable(self.log_normalizer):
            raise TypeError(f"Invalid log_normalizer type: {type(self.log_normalizer).__name__} "
                            "(expected a callable p -> float, or None)")
        check_int_at_least("n", self.n, 1)
        check_int_at_least("min_samples", self.min_samples, 2 if self.bessel else 1)

    def psi_values(self, x: Tensor) -> Tensor:
        """``psi(x)`` as shape ``[m, n]``; a clear ValueError when ``psi`` returns another shape."""
        m = x.shape[0]
        out = self.psi(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"Invalid psi output type: {type(out).__name__} (expected a tensor of shape "
                            f"[{m}, {self.n}])")
        if self.n == 1 and out.shape == (m,):
            out = out.unsqueeze(1)
        if out.shape != (m, self.n):
            raise ValueError(f"Invalid psi output: shape {tuple(out.shape)} for {m} inputs (expected [{m}, "
                             f"{self.n}]{' or [' + str(m) + ']' if self.n == 1 else ''}; psi maps each quadratic "
                             f"form to n={self.n} values)")
        return out

    def psi_derivatives(self, x: Tensor) -> Tensor:
        """``psi'(x)`` as shape ``[m, n]``: ``d psi_j(x_i) / d x_i`` (``psi`` is elementwise in ``x``), from
        ``psi_prime`` when the measure has it, else by autograd."""
        m = x.shape[0]
        if self.psi_prime is not None:
            out = self.psi_prime(x)
            if self.n == 1 and out.shape == (m,):
                out = out.unsqueeze(1)
            if out.shape != (m, self.n):
                raise ValueError(f"Invalid psi_prime output: shape {tuple(out.shape)} for {m} inputs (expected "
                                 f"[{m}, {self.n}])")
            return out
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.psi_values(xi)
            parts = []
            for j in range(self.n):  # psi_j is elementwise: the gradient of its sum is its derivative per x_i
                (d,) = torch.autograd.grad(out[:, j].sum(), xi, retain_graph=j < self.n - 1, allow_unused=True)
                parts.append(torch.zeros_like(xi) if d is None else d)
        return torch.stack(parts, dim=1)

    def phi_gradient(self, s: Tensor, num_samples: int) -> Tensor:
        """The gradient of :meth:`phi_value` at ``s`` (shape ``[n]``, Bessel factor included), from
        ``phi_grad`` when the measure has it, else by autograd."""
        if self.phi_grad is None:  # phi_value carries the Bessel factor, so its gradient does
            leaf = s.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self.phi_value(leaf, num_samples), leaf, allow_unused=True)
            return torch.zeros_like(s) if grad is None else grad
        grad = self.phi_grad(s)
        if grad.shape != s.shape:
            raise ValueError(f"Invalid phi_grad output: shape {tuple(grad.shape)} (expected {tuple(s.shape)})")
        return grad * (num_samples / (num_samples - 1)) if self.bessel else grad

    def phi_value(self, s: Tensor, num_samples: int) -> Tensor:
        """``phi(s)`` as a 0-d tensor, times ``m / (m - 1)`` when ``bessel``."""
        out = self.phi(s)
        if not isinstance(out, Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"Invalid phi output: {shape} (expected a scalar tensor)")
        out = out.reshape(())
        if self.bessel:
            out = out * (num_samples / (num_samples - 1))
        return out

    def check_num_samples(self, num_samples: object) -> int:
        return check_int_at_least("num_samples", num_samples, self.min_samples)


def _frobenius_psi(x: Tensor) -> Tensor:
    return torch.stack([x * x, x], dim=1)


def _frobenius_psi_prime(x: Tensor) -> Tensor:
    return torch.stack([2 * x, torch.ones_like(x)], dim=1)


def _frobenius_phi(s: Tensor) -> Tensor:
    return (s[0] - s[1] * s[1]) / 2


def _frobenius_phi_grad(s: Tensor) -> Tensor:
    return torch.stack([torch.full_like(s[0], 0.5), -s[1]])


def _first(s: Tensor) -> Tensor:
    return s[0]


def _identity(x: Tensor) -> Tensor:
    return x


def _det_log_normalizer(p: int, half_width: float) -> float:
    return p * math.log(2 * math.pi) - 2 * p * math.log(2 * half_width)


def _det_phi(s: Tensor) -> Tensor:
    return s[0].reciprocal().square()


def _det_psi(x: Tensor) -> Tensor:
    return torch.exp(-x / 2)


def _det_psi_prime(x: Tensor) -> Tensor:
    return torch.exp(-x / 2) * -0.5


def _det_phi_grad(s: Tensor) -> Tensor:
    return s.pow(-3) * -2


def _worst_phi(s: Tensor, q: int) -> Tensor:
    return s[0].pow(1.0 / q)


def _worst_psi(x: Tensor, q: int) -> Tensor:
    return x.pow(q)


def _worst_psi_prime(x: Tensor, q: int) -> Tensor:
    return x.pow(q - 1) * q


def sharpness_measure(name: str, *, half_width: float = 1.0, q: int = 8) -> SharpnessMeasure:
    """The preset ``name`` (one of :data:`MEASURES`; see the module docstring's table). Its functions are
    module-level (or partials of them), so a measure, and an optimizer holding one, pickles.

    Args:
        name: ``"trace"``, ``"frobenius"``, ``"det"`` or ``"worst"``.
        half_width: ``a`` of the ``det`` hypercube ``[-a, a]^p`` (> 0).
        q: the exponent of ``worst`` (an even integer >= 2; larger is closer to ``max |lambda|``).
    """
    check_choice("measure", name, MEASURES)
    if name == "trace":
        return SharpnessMeasure("trace", phi=_first, psi=_identity, sampler=GaussianSampler(),
                                target="tr H", psi_prime=torch.ones_like, phi_grad=torch.ones_like)
    if name == "frobenius":
        return SharpnessMeasure("frobenius", phi=_frobenius_phi, psi=_frobenius_psi, sampler=GaussianSampler(),
                                n=2, min_samples=2, bessel=True, target="||H||_F^2",
                                psi_prime=_frobenius_psi_prime, phi_grad=_frobenius_phi_grad)
    if name == "det":
        a = check_positive("half_width", half_width)
        return SharpnessMeasure("det", phi=_det_phi, psi=_det_psi, sampler=UniformSampler(a),
                                log_normalizer=functools.partial(_det_log_normalizer, half_width=a),
                                target=f"det H (Lebesgue measure truncated to [-{a}, {a}]^p)",
                                psi_prime=_det_psi_prime, phi_grad=_det_phi_grad)
    q = check_int_at_least("q", q, 2)
    if q % 2:
        raise ValueError(f"Invalid q value: {q} (expected an even integer >= 2, so psi(t) = t^q >= 0)")
    return SharpnessMeasure("worst", phi=functools.partial(_worst_phi, q=q), psi=functools.partial(_worst_psi, q=q),
                            sampler=SphereSampler(), target=f"(E (d^T H d)^{q})^(1/{q}) -> max |lambda| (q -> inf)",
                            psi_prime=functools.partial(_worst_psi_prime, q=q),
                            phi_grad=functools.partial(_worst_phi_grad, q=q))


def _worst_phi_grad(s: Tensor, q: int) -> Tensor:
    """``phi'(s) = s^(1/q - 1) / q``, and 0 at ``s = 0``: there every form is 0, ``psi'(0) = 0`` and the
    objective ``(mean x_i^q)^(1/q)`` has no gradient (``inf * 0`` would put NaN into the update)."""
    return torch.where(s > 0, s.pow(1.0 / q - 1) / q, torch.zeros_like(s))


def resolve_measure(measure: str | SharpnessMeasure, *, half_width: float | None = None,
                    q: int | None = None) -> SharpnessMeasure:
    """The measure object for a preset name or an instance. ``half_width`` configures only the ``det`` preset
    and ``q`` only ``worst`` (defaults 1.0 and 8): given anywhere else they would be silently ignored, so they
    are refused."""
    name = measure if isinstance(measure, str) else None
    for option, value, preset in (("half_width", half_width, "det"), ("q", q, "worst")):
        if value is not None and name != preset:
            where = f"measure={name!r}" if name is not None else "a SharpnessMeasure instance (it carries its own)"
            raise ValueError(f"Invalid {option} value: {value!r} ({option} configures only measure={preset!r}, "
                             f"not {where})")
    if isinstance(measure, SharpnessMeasure):
        return measure
    if isinstance(measure, str):
        options = {key: value for key, value in (("half_width", half_width), ("q", q)) if value is not None}
        return sharpness_measure(measure, **options)
    raise TypeError(f"Invalid measure type: {type(measure).__name__} (expected one of {', '.join(MEASURES)} "
                    "or a SharpnessMeasure)")


# ---------------------------------------------------------------------------------------------- a plain f(w)
class ParameterFunction(nn.Module):
    """A loss ``f(w)`` of one parameter tensor as a module: ``forward()`` returns ``f(self.weight)``.

    With ``loss_fn=None`` and ``data=None``, :func:`universal_sharpness` measures ``f`` directly::

        model = ParameterFunction(lambda w: (w[0] * w[1] - 1) ** 2, torch.tensor([2.0, 0.5], dtype=torch.float64))
        universal_sharpness(model, measure="det", half_width=20.0, hessian="dense")
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], weight: Tensor) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"Invalid fn type: {type(fn).__name__} (expected a callable w -> scalar tensor)")
        self.fn = fn
        self.weight = nn.Parameter(torch.as_tensor(weight).detach().clone())

    def forward(self, *inputs: Any) -> Tensor:
        return self.fn(self.weight)


def _output_as_loss(outputs: Tensor, targets: Any) -> Tensor:
    return outputs


_NO_DATA = (torch.zeros(1), torch.zeros(1))


# ---------------------------------------------------------------------------------------------- estimator
def summarize(measure: SharpnessMeasure, x: Tensor, dim: int) -> tuple[float, float, dict[str, Any]]:
    """``(value, stderr, extra settings)`` from the quadratic forms ``x`` (float64, shape ``[m]``).

    The standard error is the delta method's: ``phi'(s) . psi(x_i)`` has sample variance ``v``, so
    ``se = |bessel factor| sqrt(v / m)`` (scaled by the normalizer).
    """
    m = x.shape[0]
    values = measure.psi_values(x).double()
    s = values.mean(dim=0)
    phi = measure.phi_value(s, m)
    linear = values @ measure.phi_gradient(s, m)  # (Bessel factor) phi'(s) . psi(x_i), shape [m]
    stderr = float(linear.std() / math.sqrt(m)) if m > 1 else math.nan
    value = float(phi)
    extra: dict[str, Any] = {"s": [float(v) for v in s.detach()], "phi": value}
    if measure.log_normalizer is not None:
        log_c = float(measure.log_normalizer(dim))
        if value > 0:
            log_value = log_c + math.log(value)
            extra["log_value"] = log_value
            scale = math.exp(min(log_c, 700.0))
            value = math.exp(log_value) if log_value < 709.0 else math.inf
            stderr = stderr * scale if log_c < 700.0 else math.inf
        else:
            extra["log_value"] = math.nan
            value = value * math.exp(min(log_c, 700.0))
            stderr = stderr * math.exp(min(log_c, 700.0))
        extra["log_normalizer"] = log_c
    return value, stderr, extra


def _check_rho(rho: object) -> float | None:
    if rho is None:
        return None
    return check_positive("rho", rho)


@accepts_compiled
def universal_sharpness(model: nn.Module, loss_fn: LossFn | None = None, data: Batch | Any = None,
                        measure: str | SharpnessMeasure = "trace", *, rho: float | None = None,
                        num_samples: int = 1000, seed: int = 0, generator: torch.Generator | None = None,
                        half_width: float | None = None, q: int | None = None, hessian: str = "hvp", mode: str = "eval",
                        hvp_method: str = "double_backward") -> Measurement:
    r"""Estimate the ``(phi, psi, mu)``-sharpness ``phi(E_mu psi(d^T H d))`` of the loss at the current weights.

    Args:
        model, loss_fn, data: the loss, as for :func:`~sharpness.measures.hessian_trace`. With a
            :class:`ParameterFunction`, ``loss_fn=None`` (the output is the loss) and ``data=None`` work.
        measure: a preset name (:data:`MEASURES`) or a :class:`SharpnessMeasure`.
        rho: None (default): exact quadratic forms ``d^T H d``; ``rho > 0``: the zeroth-order proxy
            ``2 (L(w + rho d) - L(w)) / rho^2`` (forward passes only; the weights are restored bit for bit).
        num_samples: directions ``m`` (at least the measure's ``min_samples``, 2 for Frobenius).
        seed: seed of a private ``torch.Generator`` on the parameters' device (ignored with ``generator``).
        generator: draw the directions from this generator instead (advanced: shared streams in tests).
        half_width, q: options of the ``det`` and ``worst`` presets.
        hessian: with ``rho=None``: ``"hvp"`` (one Hessian-vector product per direction) or ``"dense"``
            (the dense Hessian once, then all quadratic forms in one batched product: small models only).
        mode, hvp_method: see :func:`~sharpness.measures.hessian_eigenpairs`.

    Returns:
        A :class:`Measurement` named ``"universal_sharpness"``: ``value`` (tr H, ||H||_F^2, det H... per the
        preset), ``stderr`` (delta method), ``samples``, ``seed`` and ``settings`` (``measure``, ``rho``,
        ``s`` = the mean of psi, ``phi``, and for ``det`` ``log_value``).

    Example::

        m = universal_sharpness(model, torch.nn.functional.cross_entropy, (x, y), "frobenius", num_samples=200)
    """
    measure = resolve_measure(measure, half_width=half_width, q=q)
    rho = _check_rho(rho)
    num_samples = measure.check_num_samples(num_samples)
    seed = check_int_at_least("seed", seed, 0)
    check_choice("hessian", hessian, HESSIAN_SOURCES)
    check_choice("hvp_method", hvp_method, HVP_METHODS)
    if loss_fn is None:
        loss_fn = _output_as_loss
    if data is None:
        data = _NO_DATA
    params = trainable_parameters(model)
    dim = sum(p.numel() for p in params)
    if generator is None:
        generator = torch.Generator(device=params[0].device).manual_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"Invalid generator type: {type(generator).__name__} (expected a torch.Generator)")

    if rho is None and hessian == "dense":
        matrix = dense_hessian(model, loss_fn, data, mode=mode, hvp_method=hvp_method)
        directions = torch.empty(num_samples, dim, dtype=torch.float64, device=matrix.device)
        if hasattr(measure.sampler, "fill_rows"):  # built-in samplers: all directions in one batched draw
            measure.sampler.fill_rows(directions, generator)
        else:  # a custom sampler sees one flat direction at a time
            for row in directions.unbind(0):
                measure.sampler([row], generator)
        x = ((directions @ matrix) * directions).sum(dim=1)
    else:
        direction = [torch.empty_like(p) for p in params]
        with measurement_mode(model, mode):
            if rho is None:
                op = HessianOperator(model, loss_fn, data, method=hvp_method)
                x = torch.empty(num_samples, dtype=torch.float64, device=params[0].device)  # no sync per sample
                for i in range(num_samples):
                    measure.sampler(direction, generator)
                    hd = op.matvec(direction)
                    x[i] = sum((d.double() * h.double()).sum() for d, h in zip(direction, hd))
            else:
                x = _zeroth_order_forms(model, loss_fn, as_batches(data), params, measure, direction, generator,
                                        rho, num_samples)
    value, stderr, extra = summarize(measure, x.cpu(), dim)
    settings = {"measure": measure.name, "target": measure.target, "rho": rho,
                "hessian": hessian if rho is None else "zeroth_order", "dim": dim, "mode": mode,
                "sampler": repr(measure.sampler), **extra}
    return Measurement(name="universal_sharpness", value=value, stderr=stderr, samples=num_samples,
                       seed=seed, settings=settings)


@torch.no_grad()
def _zeroth_order_forms(model: nn.Module, loss_fn: LossFn, batches: list, params: list[Tensor],
                        measure: SharpnessMeasure, direction: list[Tensor], generator: torch.Generator,
                        rho: float, num_samples: int) -> Tensor:
    """``x_i = 2 (L(w + rho d_i) - L(w)) / rho^2`` (float64 losses); ``w`` restored exactly after each."""
    x = torch.empty(num_samples, dtype=torch.float64)
    base = mean_loss(model, loss_fn, batches)
    for i in range(num_samples):
        measure.sampler(direction, generator)
        with shifted_parameters(params, direction, rho):
            x[i] = 2.0 * (mean_loss(model, loss_fn, batches) - base) / rho ** 2
    return x

