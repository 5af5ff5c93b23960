"""The Hessian of the loss: dense matrix, top eigenpairs, trace, Frobenius norm and spectral density.

Every function takes ``(model, loss_fn, data)`` (one ``(inputs, targets)`` batch or an iterable of batches,
see :func:`~sharpness.measures._common.as_batches`) and works with the Hessian

    H = d^2 L(w) / dw^2,    L(w) = sum_b (n_b / N) loss_fn(model(x_b; w), y_b),

of the size-weighted mean loss over all batches, at the current trainable weights ``w`` (``P`` scalars).
``H`` is never formed (except by :func:`dense_hessian`): every estimator only calls the shared matrix-free
product ``v -> H v`` of :class:`~sharpness.measures.hvp.HessianOperator`, inside
:func:`~sharpness.measures._common.measurement_mode` (``mode="eval"`` by default: dropout off, BatchNorm on
its running statistics; the model's training flags and BatchNorm buffers are restored afterwards).

Estimators:

* :func:`hessian_eigenvalues` / :func:`hessian_eigenpairs`: the top ``k`` eigenvalues by Lanczos with full
  reorthogonalization (default) or by power iteration with deflation (as PyHessian does).
* :func:`hessian_trace`: Hutchinson's estimator ``tr H = E[v^T H v]`` with Rademacher probes.
* :func:`hessian_frobenius`: ``||H||_F = sqrt(E ||H v||^2)``.
* :func:`hessian_density`: stochastic Lanczos quadrature (SLQ) of the eigenvalue density.
* :func:`dense_hessian`: the full ``P x P`` matrix, column by column, for small models and for tests.

Random probes come from a private ``torch.Generator(seed)`` on CPU (:func:`random_vector`), so a result is
reproducible from its ``seed`` and does not touch the global RNG. Inner products, the Lanczos coefficients,
the tridiagonal eigenproblems and all sample statistics are in float64; Krylov bases are kept in the
parameters' dtype (at least float32) to bound memory.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._compile import accepts_compiled
from .._validation import check_choice, check_int_at_least, check_positive
from ._common import Batch, LossFn, Vector, measurement_mode, rademacher, random_vector, trainable_parameters
from .hvp import HessianOperator
from .result import Measurement

__all__ = ["EIGEN_METHODS", "EIGEN_ORDERS", "PROBE_KINDS", "dense_hessian", "hessian_density", "hessian_eigenpairs",
           "hessian_eigenvalues", "hessian_frobenius", "hessian_trace"]

EIGEN_METHODS = ("lanczos", "power")
EIGEN_ORDERS = ("largest", "magnitude")  # algebraic largest first; largest |lambda| first
PROBE_KINDS = ("rademacher", "gaussian")
DEFAULT_MAX_PARAMS = 5000
MIN_SAMPLES_FOR_TOL = 10  # the standard error of fewer probes is too noisy to stop on
_BREAKDOWN = 100.0  # Lanczos breakdown: beta <= _BREAKDOWN * eps(dtype) * ||T||
_REORTHOGONALIZE = 1 / math.sqrt(2)  # a second Gram-Schmidt pass when the first kept less than this share
_FIRST_ROWS = 32  # Lanczos basis rows allocated first (then doubled as needed)


# ---------------------------------------------------------------------------------------------- validation

def _check_tol(tol: object, *, optional: bool = False) -> float | None:
    if tol is None and optional:
        return None
    return check_positive("tol", tol)


def _check_k(k: object, dim: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"Invalid k type: {type(k).__name__} (expected an integer 1 <= k <= {dim})")
    if not 1 <= k <= dim:
        raise ValueError(f"Invalid k value: {k} (expected 1 <= k <= {dim}, the number of trainable parameters)")
    return int(k)


def _dimension(model: nn.Module) -> int:
    """``P``, the number of trainable scalars (checks the model before its mode is switched)."""
    return sum(p.numel() for p in trainable_parameters(model))


# ---------------------------------------------------------------------------------------------- flat operator
class _FlatOperator:
    """``H`` acting on flat vectors: 1-D tensors of length ``P`` in one working dtype on one device.

    Parameters are concatenated in ``model.parameters()`` order (trainable ones only). The working dtype is
    the promoted parameter dtype, at least float32; vectors are cast back to each parameter's dtype and
    device for the product.
    """

    def __init__(self, operator: HessianOperator) -> None:
        self.operator = operator
        self.params = operator.params
        self.dim = operator.dim
        dtype = torch.float32
        for p in self.params:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        self.device = self.params[0].device
        self.sizes = [p.numel() for p in self.params]

    def flatten(self, vector: Sequence[Tensor]) -> Tensor:
        return torch.cat([v.reshape(-1).to(device=self.device, dtype=self.dtype) for v in vector])

    def unflatten(self, flat: Tensor) -> Vector:
        return [piece.view(p.shape).to(device=p.device, dtype=p.dtype)
                for piece, p in zip(flat.split(self.sizes), self.params)]

    def __call__(self, flat: Tensor) -> Tensor:
        return self.flatten(self.operator.matvec(self.unflatten(flat)))

    def random(self, generator: torch.Generator, kind: str) -> Tensor:
        if kind == "rademacher":
            # One host draw of every entry (the numbers per-parameter draws give, in order) and one copy of a
            # byte per entry to the device: no per-parameter copies, each of which waits for the device.
            return rademacher((sum(self.sizes),), generator).to(self.device).to(self.dtype)
        return self.flatten(random_vector(self.params, generator, kind))

    @property
    def matvecs(self) -> int:
        return self.operator.matvecs


@contextlib.contextmanager
def _flat_operator(model: nn.Module, loss_fn: LossFn, data: Batch | Any, mode: str,
                   hvp_method: str) -> Iterator[_FlatOperator]:
    with measurement_mode(model, mode):
        yield _FlatOperator(HessianOperator(model, loss_fn, data, method=hvp_method))


def _dot(a: Tensor, b: Tensor) -> float:
    """``<a, b>`` accumulated in float64 whatever the working dtype: the products are formed in the vectors' own
    dtype and summed in float64 (two kernels and one temporary of ``a``'s size, against three kernels and two
    float64 copies for casting both first; the products' rounding is that of the vectors themselves)."""
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return float(torch.dot(a, b))
    return float((a * b).sum(dtype=torch.float64))


def _norm(a: Tensor) -> float:
    return math.sqrt(_dot(a, a))


def _project_out(w: Tensor, basis: Tensor) -> Tensor:
    """``w - Q^T Q w`` for a basis ``Q`` with orthonormal rows (classical Gram-Schmidt).

    The pass is repeated once when it removed most of ``w`` (``||w'|| < ||w|| / sqrt 2``), where rounding
    leaves ``w'`` visibly non-orthogonal; two passes are always enough (Daniel, Gragg, Kaufman & Stewart,
    Math. Comp. 1976; Parlett's "twice is enough").
    """
    if basis.shape[0] == 0:
        return w
    before = float(torch.linalg.vector_norm(w))  # a ratio test: the working dtype is accurate enough
    w = w - basis.T @ (basis @ w)
    if float(torch.linalg.vector_norm(w)) < _REORTHOGONALIZE * before:
        w = w - basis.T @ (basis @ w)
    return w


# ---------------------------------------------------------------------------------------------- dense
@accepts_compiled
def dense_hessian(model: nn.Module, loss_fn: LossFn, data: Batch | Any, *, mode: str = "eval",
                  hvp_method: str = "double_backward", max_params: int = DEFAULT_MAX_PARAMS) -> Tensor:
    """The full ``P x P`` Hessian of the loss, as a float64 tensor (for small models and for tests).

    Column ``i`` is ``H e_i``, one Hessian-vector product per parameter (``P`` products and ``P^2`` floats);
    the result is symmetrized, ``(H + H^T) / 2``. Rows and columns follow the trainable parameters in
    ``model.parameters()`` order, each flattened row-major (``torch.cat([p.reshape(-1) for p in params])``).
    Unlike the estimators it returns a tensor, not a :class:`Measurement`.

    Args:
        model, loss_fn, data: the loss (see the module docstring).
        mode: ``"eval"`` (default) or ``"train"``, see :func:`measurement_mode`.
        hvp_method: the product, one of :data:`~sharpness.measures.hvp.HVP_METHODS`.
        max_params: refuse models with more trainable parameters than this (default 5000).

    Example::

        H = dense_hessian(model, torch.nn.functional.cross_entropy, (x, y))
        eigenvalues = torch.linalg.eigvalsh(H)
    """
    max_params = check_int_at_least("max_params", max_params, 1)
    dim = _dimension(model)
    if dim > max_params:
        raise ValueError(f"Invalid model for dense_hessian: {dim} trainable parameters (expected at most "
                         f"max_params={max_params}; it costs P Hessian-vector products and P^2 floats; raise "
                         "max_params or use the matrix-free estimators)")
    with _flat_operator(model, loss_fn, data, mode, hvp_method) as op:
        hessian = torch.empty(dim, dim, dtype=torch.float64, device=op.device)
        unit = torch.zeros(dim, dtype=op.dtype, device=op.device)
        for i in range(dim):
            unit[i] = 1.0
            hessian[:, i] = op(unit)
            unit[i] = 0.0
    return (hessian + hessian.T) / 2


# ---------------------------------------------------------------------------------------------- Lanczos
def _eigh_tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric tridiagonal ``T`` with diagonal
    ``alphas`` and off-diagonal ``betas[:m-1]``, in float64 on CPU.

    ``T`` is built with numpy (small, little overhead) but solved by ``torch.linalg.eigh``, which follows
    ``torch.set_num_threads``: numpy's OpenBLAS would run even a 30 x 30 ``eigh`` on every core (twice the
    CPU time, and slower on a shared machine).
    """
    m = len(alphas)
    if not (np.all(np.isfinite(alphas)) and np.all(np.isfinite(betas[:m - 1]))):
        raise ValueError("Invalid loss: a Hessian-vector product is not finite (NaN or inf in the data, the "
                         "weights or the loss); no spectrum to compute")
    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if m > 1:
        off = np.asarray(betas[:m - 1], dtype=np.float64)
        t[np.arange(m - 1), np.arange(1, m)] = off
        t[np.arange(1, m), np.arange(m - 1)] = off
    theta, vectors = torch.linalg.eigh(torch.from_numpy(t))
    return theta.numpy(), vectors.numpy()


def _lanczos(op: _FlatOperator, start: Tensor, steps: int, *,
             stop: Callable[[list[float], list[float]], bool] | None = None,
             restart: Callable[[], Tensor] | None = None) -> tuple[Tensor, list[float], list[float]]:
    """Lanczos tridiagonalization with full reorthogonalization.

    Builds an orthonormal basis ``Q = [q_1 .. q_m]`` of the Krylov space of ``start`` and the tridiagonal
    ``T = Q^T H Q`` (``alpha_j = q_j^T H q_j`` on the diagonal, ``beta_j = ||r_j||`` beside it) by the
    three-term recurrence ``r_j = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``, ``q_{j+1} = r_j / beta_j``, with
    ``r_j`` reorthogonalized against all of ``Q`` at every step, so that ``H Q_m = Q_m T_m + beta_m q_{m+1}
    e_m^T`` holds to rounding (Golub & Van Loan, Matrix Computations, sec. 10.1; the reorthogonalization keeps
    ``Q`` orthonormal, so no spurious copies of converged Ritz values appear; it costs ``O(m P)`` per step).
    After step ``m`` (with ``beta_m`` known) ``stop(alphas, betas)`` may end it. On breakdown (``beta_m ~ 0``,
    an invariant subspace) it ends, or with ``restart`` continues from a new vector orthogonal to ``Q`` and
    records ``beta_m = 0`` (``T`` becomes block diagonal). The basis grows by doubling (32 rows first), so
    memory follows the steps taken, not ``steps``.

    Returns ``(Q[:m], alphas[:m], betas[:m])``; ``betas[m-1]`` is the residual norm after the last step.
    """
    steps = min(steps, op.dim)
    basis = torch.empty(min(steps, _FIRST_ROWS), op.dim, dtype=op.dtype, device=op.device)
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(op.dtype).eps
    q = start / _norm(start)
    scale = 0.0
    for j in range(steps):
        if j == basis.shape[0]:
            basis = torch.cat([basis, torch.empty(min(j, steps - j), op.dim, dtype=op.dtype, device=op.device)])
        basis[j] = q
        w = op(q)  # a fresh tensor: updated in place below
        alpha = _dot(q, w)
        w.sub_(q, alpha=alpha)
        if j > 0 and betas[-1] != 0.0:
            w.sub_(basis[j - 1], alpha=betas[-1])
        w = _project_out(w, basis[:j + 1])
        beta = _norm(w)
        alphas.append(alpha)
        betas.append(beta)
        scale = max(scale, abs(alpha), beta)
        if j + 1 == steps:
            break
        broke_down = beta <= _BREAKDOWN * eps * scale
        if not broke_down and stop is not None and stop(alphas, betas):
            break
        if broke_down:
            if restart is None:
                break
            betas[-1] = 0.0
            w = _project_out(restart(), basis[:j + 1])
            beta = _norm(w)
        q = w / beta
    m = len(alphas)
    return basis[:m], alphas, betas


def _order(values: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``values`` sorted by ``which``: algebraic descending, or by magnitude descending."""
    key = values if which == "largest" else np.abs(values)
    return np.argsort(-key, kind="stable")


def _ritz(alphas: Sequence[float], betas: Sequence[float], k: int,
          which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Top-``k`` Ritz values, their eigenvectors in ``T``, residual norms ``beta_m |s_{m,i}|`` and ``||T||``.

    For a Ritz pair ``(theta_i, Q s_i)``, ``||H Q s_i - theta_i Q s_i|| = beta_m |s_{m,i}|`` and some eigenvalue
    of ``H`` lies within that distance of ``theta_i`` (Parlett, The Symmetric Eigenvalue Problem, thm. 4.5.1).
    """
    theta, vectors = _eigh_tridiagonal(alphas, betas)
    top = _order(theta, which)[:k]
    residuals = betas[len(alphas) - 1] * np.abs(vectors[-1, top])
    return theta[top], vectors[:, top], residuals, float(np.abs(theta).max())


def _lanczos_eigenpairs(op: _FlatOperator, k: int, which: str, tol: float, max_iter: int,
                        generator: torch.Generator) -> dict[str, Any]:
    def converged(alphas: list[float], betas: list[float]) -> bool:
        if len(alphas) < k:
            return False
        _, _, residuals, scale = _ritz(alphas, betas, k, which)
        return bool((residuals <= tol * scale).all())

    start = op.random(generator, "gaussian")
    basis, alphas, betas = _lanczos(op, start, max_iter, stop=converged,
                                    restart=lambda: op.random(generator, "gaussian"))
    theta, s, residuals, scale = _ritz(alphas, betas, k, which)
    vectors = torch.from_numpy(np.ascontiguousarray(s.T)).to(device=op.device, dtype=op.dtype) @ basis
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    done = len(alphas) == op.dim or bool((residuals <= tol * scale).all())
    return {"values": theta.tolist(), "vectors": list(vectors), "residuals": residuals.tolist(),
            "iterations": len(alphas), "converged": done}


# ---------------------------------------------------------------------------------------------- power
def _power_one(op: _FlatOperator, found: Tensor, tol: float, max_iter: int, generator: torch.Generator,
               shift: float) -> tuple[float, Tensor, float, int, bool]:
    """Power iteration on ``(I - F^T F)(H + shift I)`` restricted to the complement of the rows of ``found``.

    Iterates ``v <- B v / ||B v||`` and stops when the Rayleigh quotient ``lambda_t = v_t^T B v_t`` changes by
    at most ``tol |lambda_t - shift|`` (relative to the eigenvalue of ``H``).
    Returns ``(lambda - shift, v, ||B v - lambda v||, iterations, converged)``.
    """
    v = op.random(generator, "gaussian")
    previous = None
    value, residual = 0.0, 0.0
    for t in range(1, max_iter + 1):
        v = _project_out(v, found)  # stay in the complement (as PyHessian's orthnormal)
        v = v / _norm(v)
        hv = op(v)
        if shift:
            hv = hv + shift * v
        hv = _project_out(hv, found)
        value = _dot(v, hv)
        residual = _norm(hv - value * v)
        hv_norm = _norm(hv)
        if hv_norm == 0.0 or (previous is not None and abs(value - previous) <= tol * abs(value - shift)):
            return value - shift, v, residual, t, True
        previous = value
        if t < max_iter:
            v = hv / hv_norm
    return value - shift, v, residual, max_iter, False


def _power_eigenpairs(op: _FlatOperator, k: int, which: str, tol: float, max_iter: int,
                      generator: torch.Generator) -> dict[str, Any]:
    found = torch.empty(0, op.dim, dtype=op.dtype, device=op.device)
    values, residuals = [], []
    iterations, converged = 0, True
    for _ in range(k):
        value, v, residual, steps, done = _power_one(op, found, tol, max_iter, generator, 0.0)
        iterations += steps
        if which == "largest" and value < 0:
            # The largest-magnitude eigenvalue left is negative, so every one left is >= value: shifting by
            # -value makes the spectrum non-negative and its top the algebraic largest.
            value, v, residual, steps, done = _power_one(op, found, tol, max_iter, generator, -value)
            iterations += steps
        converged = converged and done
        values.append(value)
        residuals.append(residual)
        found = torch.cat([found, v[None]])
    order = _order(np.asarray(values, dtype=np.float64), which).tolist()
    return {"values": [values[i] for i in order], "vectors": [found[i] for i in order],
            "residuals": [residuals[i] for i in order], "iterations": iterations, "converged": converged}


# ---------------------------------------------------------------------------------------------- eigenpairs
@accepts_compiled
def hessian_eigenpairs(model: nn.Module, loss_fn: LossFn, data: Batch | Any, k: int = 1, *,
                       method: str = "lanczos", which: str = "largest", tol: float = 1e-6,
                       max_iter: int | None = None, seed: int = 0, mode: str = "eval",
                       hvp_method: str = "double_backward") -> tuple[Measurement, list[Vector]]:
    """The top ``k`` eigenvalues of the Hessian and their unit eigenvectors.

    ``method="lanczos"`` (default): Lanczos with full reorthogonalization from a Gaussian start vector. After
    ``m`` steps the eigenvalues ``theta_i`` of the ``m x m`` tridiagonal ``T_m = Q_m^T H Q_m`` (Ritz values)
    approximate the extreme eigenvalues of ``H``; it stops once the top ``k`` Ritz residuals satisfy

        ||H y_i - theta_i y_i|| = beta_m |s_{m,i}| <= tol * max_j |theta_j|,

    i.e. each is within ``tol`` of the spectral norm (estimated by ``max_j |theta_j|``) of an eigenvalue of
    ``H`` (of *an* eigenvalue: with a loose ``tol`` the top Ritz value can stop near ``lambda_2`` before
    ``lambda_1`` has emerged from a tight cluster, so use ``tol <= 1e-3`` for the top of a clustered spectrum);
    ``m = P`` steps are exact. Breakdowns (invariant subspaces, e.g. a Hessian with few distinct
    eigenvalues) restart from a fresh vector orthogonal to the basis. Memory: one vector per step taken
    (at most ``min(max_iter, P)``).

    ``method="power"``: power iteration with deflation, as PyHessian (Yao et al., 2020): eigenvalue ``i`` is the
    Rayleigh quotient of ``v <- H v / ||H v||`` kept orthogonal to the ``i - 1`` vectors found, stopped when it
    changes by at most ``tol`` relative (a small change is not a small error when ``lambda_2 / lambda_1`` is
    close to one; Lanczos's residual test has no such blind spot). Power iteration finds the largest
    *magnitude*; for ``which="largest"``, a negative result is refined by iterating on ``H - lambda I``.

    Args:
        model, loss_fn, data: the loss (see the module docstring).
        k: how many eigenvalues, ``1 <= k <= P``.
        method: ``"lanczos"`` or ``"power"``.
        which: ``"largest"`` (algebraic, descending) or ``"magnitude"`` (largest ``|lambda|`` first).
        tol: relative tolerance, ``> 0`` (default 1e-6).
        max_iter: Lanczos steps (capped at ``P``; default ``max(100, 4k)``), or power iterations per eigenvalue
            (default 1000). Lanczos needs ``max_iter >= k``.
        seed: seed of the private generator of the start vectors.
        mode: ``"eval"`` (default) or ``"train"``, see :func:`measurement_mode`.
        hvp_method: the product, one of :data:`~sharpness.measures.hvp.HVP_METHODS`.

    Returns:
        ``(measurement, vectors)``: ``measurement.value`` is a float for ``k=1`` and a list of ``k`` floats
        otherwise (ordered by ``which``); ``settings["residuals"]`` holds ``||H v_i - lambda_i v_i||``.
        ``vectors[i]`` is a parameter-shaped list of tensors of unit norm, the eigenvector of value ``i``.

    References:
        C. Lanczos, "An iteration method for the solution of the eigenvalue problem...", J. Res. NBS, 1950.
        B. Parlett, The Symmetric Eigenvalue Problem, SIAM, 1998. Z. Yao, A. Gholami, K. Keutzer, M. Mahoney,
        "PyHessian: Neural Networks Through the Lens of the Hessian", IEEE BigData 2020 (arXiv:1912.07145).
    """
    method = check_choice("method", method, EIGEN_METHODS)
    which = check_choice("which", which, EIGEN_ORDERS)
    tol = check_positive("tol", tol)
    seed = check_int_at_least("seed", seed, 0)
    dim = _dimension(model)
    k = _check_k(k, dim)
    if max_iter is None:
        max_iter = max(100, 4 * k) if method == "lanczos" else 1000
    max_iter = check_int_at_least("max_iter", max_iter, 1)
    if method == "lanczos" and max_iter < k:
        raise ValueError(f"Invalid max_iter value: {max_iter} (expected max_iter >= k={k}: Lanczos needs at "
                         "least k steps for k Ritz values)")
    generator = torch.Generator().manual_seed(seed)
    with _flat_operator(model, loss_fn, data, mode, hvp_method) as op:
        solve = _lanczos_eigenpairs if method == "lanczos" else _power_eigenpairs
        result = solve(op, k, which, tol, max_iter, generator)
        vectors = [op.unflatten(v) for v in result["vectors"]]
        matvecs = op.matvecs
    values = result["values"]
    measurement = Measurement(
        name="hessian_eigenvalues", value=values[0] if k == 1 else values, iterations=result["iterations"],
        seed=seed, tolerance=tol, converged=result["converged"],
        settings={"k": k, "method": method, "which": which, "max_iter": max_iter, "residuals": result["residuals"],
                  "matvecs": matvecs, "dim": dim, "mode": mode, "hvp_method": hvp_method},
    )
    return measurement, vectors


@accepts_compiled
def hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Batch | Any, k: int = 1, *,
                        method: str = "lanczos", which: str = "largest", tol: float = 1e-6,
                        max_iter: int | None = None, seed: int = 0, mode: str = "eval",
                        hvp_method: str = "double_backward") -> Measurement:
    """The top ``k`` Hessian eigenvalues: :func:`hessian_eigenpairs` without the vectors.

    ``value`` is a float for ``k=1``, else a list ordered by ``which`` (descending). Example::

        top = hessian_eigenvalues(model, torch.nn.functional.cross_entropy, (x, y)).value
        top3 = hessian_eigenvalues(model, loss_fn, loader, k=3, method="power", tol=1e-4).value
    """
    measurement, _ = hessian_eigenpairs(model, loss_fn, data, k, method=method, which=which, tol=tol,
                                        max_iter=max_iter, seed=seed, mode=mode, hvp_method=hvp_method)
    return measurement


# ---------------------------------------------------------------------------------------------- Hutchinson
def _check_probe_options(samples: object, tol: object, kind: object,
                         seed: object) -> tuple[int, float | None, str, int]:
    """The options shared by the Monte-Carlo estimators (trace, Frobenius)."""
    return (check_int_at_least("samples", samples, 1), _check_tol(tol, optional=True),
            check_choice("kind", kind, PROBE_KINDS), check_int_at_least("seed", seed, 0))


def _mean_stderr(samples: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``s / sqrt(n)`` (sample standard deviation; nan for one sample), float64."""
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, math.nan
    variance = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(variance / n)


def _probe(op: _FlatOperator, statistic: Callable[[Tensor, Tensor], float], samples: int, kind: str,
           generator: torch.Generator, relative_stderr: Callable[[float, float], float],
           tol: float | None) -> tuple[list[float], bool | None]:
    """``statistic(v, H v)`` for up to ``samples`` random probes ``v``.

    With ``tol``, stops once ``relative_stderr(mean, stderr) <= tol`` (checked from
    :data:`MIN_SAMPLES_FOR_TOL` probes on, on Welford's running mean and variance, O(1) per probe).
    """
    values: list[float] = []
    mean, m2 = 0.0, 0.0
    for _ in range(samples):
        v = op.random(generator, kind)
        value = statistic(v, op(v))
        values.append(value)
        n = len(values)
        delta = value - mean
        mean += delta / n
        m2 += delta * (value - mean)
        stop = tol is not None and n >= MIN_SAMPLES_FOR_TOL
        if stop and relative_stderr(mean, math.sqrt(max(m2, 0.0) / (n - 1) / n)) <= tol:
            return values, True
    if tol is None:
        return values, None
    mean, stderr = _mean_stderr(values)
    return values, relative_stderr(mean, stderr) <= tol


def _relative(mean: float, stderr: float) -> float:
    """``stderr / |mean|`` (inf when undefined: one sample, or a zero mean with a spread)."""
    if math.isnan(stderr):
        return math.inf
    return stderr / abs(mean) if mean != 0 else (0.0 if stderr == 0 else math.inf)


@accepts_compiled
def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Batch | Any, *, samples: int = 100,
                  tol: float | None = None, kind: str = "rademacher", seed: int = 0, mode: str = "eval",
                  hvp_method: str = "double_backward") -> Measurement:
    """Hutchinson's estimate of the Hessian trace.

    For probes ``v`` with ``E[v v^T] = I`` (Rademacher entries +-1 by default, or standard Gaussian),
    ``E[v^T H v] = tr H``; the estimate is the mean of ``n`` samples ``v_i^T H v_i`` and its standard error is
    ``s / sqrt(n)`` with ``s`` the sample standard deviation. Rademacher probes have the smallest variance,
    ``2 (||H||_F^2 - sum_i H_ii^2)``, against ``2 ||H||_F^2`` for Gaussian ones.

    Args:
        model, loss_fn, data: the loss (see the module docstring).
        samples: the number of probes (Hessian-vector products), ``>= 1``; the maximum when ``tol`` is set.
        tol: optional early stop: end once ``stderr / |trace| <= tol`` (checked from 10 samples on);
            ``converged`` says whether it was reached. None (default): always ``samples`` probes.
        kind: ``"rademacher"`` (default) or ``"gaussian"``.
        seed: seed of the private generator of the probes.
        mode, hvp_method: see :func:`hessian_eigenpairs`.

    Returns:
        A :class:`Measurement` with ``value`` (the trace), ``stderr`` (nan for one sample) and ``samples``.

    References:
        M. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
        splines", Comm. Stat. Simul. Comput., 1989. H. Avron, S. Toledo, "Randomized algorithms for
        estimating the trace of an implicit symmetric positive semi-definite matrix", J. ACM, 2011.
    """
    samples, tol, kind, seed = _check_probe_options(samples, tol, kind, seed)
    dim = _dimension(model)
    generator = torch.Generator().manual_seed(seed)
    with _flat_operator(model, loss_fn, data, mode, hvp_method) as op:
        values, converged = _probe(op, _dot, samples, kind, generator, _relative, tol)
        matvecs = op.matvecs
    mean, stderr = _mean_stderr(values)
    return Measurement(name="hessian_trace", value=mean, stderr=stderr, samples=len(values), seed=seed,
                       tolerance=tol, converged=converged,
                       settings={"kind": kind, "max_samples": samples, "matvecs": matvecs, "dim": dim,
                                 "mode": mode, "hvp_method": hvp_method})


def _frobenius_from(values: Sequence[float]) -> tuple[float, float, float, float]:
    """``(||H||_F, stderr, ||H||_F^2, its stderr)`` from samples of ``||H v||^2``; delta method
    ``se(sqrt(m)) = se(m) / (2 sqrt(m))``."""
    squared, squared_stderr = _mean_stderr(values)
    value = math.sqrt(squared)
    if value == 0.0:
        return 0.0, 0.0 if squared_stderr == 0 else math.nan, squared, squared_stderr
    return value, squared_stderr / (2 * value), squared, squared_stderr


@accepts_compiled
def hessian_frobenius(model: nn.Module, loss_fn: LossFn, data: Batch | Any, *, samples: int = 100,
                      tol: float | None = None, kind: str = "rademacher", seed: int = 0, mode: str = "eval",
                      hvp_method: str = "double_backward") -> Measurement:
    """A Monte-Carlo estimate of the Frobenius norm ``||H||_F = sqrt(sum_ij H_ij^2)``.

    For probes with ``E[v v^T] = I``, ``E ||H v||^2 = tr(H^T H) = ||H||_F^2``. The estimate is the square root
    of the mean of ``n`` samples ``||H v_i||^2`` (slightly biased low by Jensen's inequality, by about
    ``var / (8 ||H||_F^3)``); the standard error follows from the samples' by the delta method,
    ``se(||H||_F) = se(||H||_F^2) / (2 ||H||_F)``. ``settings`` also carries ``squared`` (the unbiased
    estimate of ``||H||_F^2``) and ``squared_stderr``.

    Args:
        model, loss_fn, data: the loss (see the module docstring).
        samples: the number of probes, ``>= 1``; the maximum when ``tol`` is set.
        tol: optional early stop on the relative standard error of ``||H||_F`` (from 10 samples on).
        kind: ``"rademacher"`` (default) or ``"gaussian"``.
        seed, mode, hvp_method: see :func:`hessian_trace`.
    """
    samples, tol, kind, seed = _check_probe_options(samples, tol, kind, seed)
    dim = _dimension(model)
    generator = torch.Generator().manual_seed(seed)

    def relative_stderr(squared: float, squared_stderr: float) -> float:
        return _relative(squared, squared_stderr) / 2  # delta method: se(sqrt(m)) / sqrt(m) = se(m) / (2 m)

    with _flat_operator(model, loss_fn, data, mode, hvp_method) as op:
        values, converged = _probe(op, lambda v, hv: _dot(hv, hv), samples, kind, generator, relative_stderr,
                                   tol)
        matvecs = op.matvecs
    value, stderr, squared, squared_stderr = _frobenius_from(values)
    return Measurement(name="hessian_frobenius", value=value, stderr=stderr, samples=len(values), seed=seed,
                       tolerance=tol, converged=converged,
                       settings={"squared": squared, "squared_stderr": squared_stderr, "kind": kind,
                                 "max_samples": samples, "matvecs": matvecs, "dim": dim, "mode": mode,
                                 "hvp_method": hvp_method})


# ---------------------------------------------------------------------------------------------- density
def _check_grid(grid: object) -> int | Tensor:
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        return check_int_at_least("grid", grid, 2)
    try:
        points = torch.as_tensor(grid, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"Invalid grid type: {type(grid).__name__} (expected an integer >= 2 or a 1-D sequence "
                        "of points)") from None
    if points.dim() != 1 or points.numel() < 1 or not bool(torch.isfinite(points).all()):
        raise ValueError(f"Invalid grid value: shape {tuple(points.shape)} (expected a 1-D sequence of at least "
                         "one finite point)")
    return points


def _gaussian_mixture(grid: Tensor, nodes: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """``sum_i w_i N(t; theta_i, sigma^2)`` at every grid point ``t``."""
    z = (grid[:, None] - nodes[None, :]) / sigma
    return (torch.exp(-0.5 * z * z) * weights[None, :]).sum(dim=1) / (sigma * math.sqrt(2 * math.pi))


@accepts_compiled
def hessian_density(model: nn.Module, loss_fn: LossFn, data: Batch | Any, *, iterations: int = 100,
                    runs: int = 1, grid: int | Sequence[float] | Tensor = 1000, sigma: float | None = None,
                    seed: int = 0, mode: str = "eval", hvp_method: str = "double_backward") -> Measurement:
    """The Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

    The spectral density ``phi(t) = (1/P) sum_i delta(t - lambda_i)`` is smoothed with a Gaussian of width
    ``sigma``, ``phi_sigma(t) = (1/P) sum_i N(t; lambda_i, sigma^2) = E_v[v^T N(t; H, sigma^2) v]`` for a unit
    random ``v`` (``E[v v^T] = I / P``). Each run draws a normalized Rademacher ``v`` and runs ``m`` Lanczos
    steps from it; the eigen-decomposition ``T_m = S diag(theta) S^T`` gives the Gauss quadrature
    ``v^T f(H) v ~ sum_j tau_j f(theta_j)`` with nodes ``theta_j`` and weights ``tau_j = S_{1j}^2``
    (``sum_j tau_j = 1``; exact for polynomials of degree ``< 2m``). The density averages the runs:

        phi_sigma(t) ~ (1/runs) sum_r sum_j tau_{r,j} N(t; theta_{r,j}, sigma^2),

    so it integrates to 1 over the real line (and on a grid that covers the nodes by a few ``sigma``), its
    mean is ``tr H / P`` and its second moment ``||H||_F^2 / P + sigma^2`` (in expectation over ``v``).
    A run ends early at a Lanczos breakdown (the Krylov space of ``v`` is invariant: the quadrature is exact).

    Args:
        model, loss_fn, data: the loss (see the module docstring).
        iterations: Lanczos steps per run, ``>= 1`` (capped at ``P``; default 100).
        runs: independent random start vectors, ``>= 1`` (default 1).
        grid: the number of evenly spaced points (``>= 2``, default 1000) from ``min theta - 8 sigma`` to
            ``max theta + 8 sigma`` (so no mass is cut off), or the points themselves (a 1-D sequence or tensor).
        sigma: the Gaussian kernel width, ``> 0``; default ``0.01 (max theta - min theta)`` (or 0.01
            ``max(|theta|, 1)`` when all nodes coincide).
        seed, mode, hvp_method: see :func:`hessian_trace`.

    Returns:
        A :class:`Measurement` whose ``value`` is the density at each grid point (a list), with
        ``settings["grid"]``, ``settings["nodes"]`` and ``settings["weights"]`` (one list per run),
        ``settings["sigma"]`` and ``settings["steps"]`` (Lanczos steps per run). ``stderr`` is the per-point
        standard error over the runs (None for one run).

    References:
        B. Ghorbani, S. Krishnan, Y. Xiao, "An Investigation into Neural Net Optimization via Hessian
        Eigenvalue Density", ICML 2019. L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large
        matrices", SIAM Review, 2016. G. Golub, G. Meurant, Matrices, Moments and Quadrature, 2010.
    """
    iterations = check_int_at_least("iterations", iterations, 1)
    runs = check_int_at_least("runs", runs, 1)
    grid_spec = _check_grid(grid)
    if sigma is not None:
        sigma = check_positive("sigma", sigma)
    seed = check_int_at_least("seed", seed, 0)
    dim = _dimension(model)
    generator = torch.Generator().manual_seed(seed)
    all_nodes: list[Tensor] = []
    all_weights: list[Tensor] = []
    with _flat_operator(model, loss_fn, data, mode, hvp_method) as op:
        for _ in range(runs):
            _, alphas, betas = _lanczos(op, op.random(generator, "rademacher"), iterations)
            theta, s = _eigh_tridiagonal(alphas, betas)
            all_nodes.append(torch.from_numpy(theta))
            all_weights.append(torch.from_numpy(s[0] ** 2))
        matvecs = op.matvecs
    nodes = torch.cat(all_nodes)
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        width = high - low if high > low else max(abs(high), abs(low), 1.0)
        sigma = 0.01 * width
    if isinstance(grid_spec, int):
        points = torch.linspace(low - 8 * sigma, high + 8 * sigma, grid_spec, dtype=torch.float64)
    else:
        points = grid_spec
    per_run = torch.stack([_gaussian_mixture(points, n, w, sigma) for n, w in zip(all_nodes, all_weights)])
    density = per_run.mean(dim=0)
    stderr = (per_run.std(dim=0, correction=1) / math.sqrt(runs)).tolist() if runs > 1 else None
    return Measurement(
        name="hessian_density", value=density.tolist(), stderr=stderr, iterations=min(iterations, dim),
        samples=runs, seed=seed,
        settings={"grid": points.tolist(), "nodes": [n.tolist() for n in all_nodes],
                  "weights": [w.tolist() for w in all_weights], "sigma": sigma,
                  "steps": [len(n) for n in all_nodes], "kind": "rademacher", "matvecs": matvecs, "dim": dim,
                  "mode": mode, "hvp_method": hvp_method},
    )
