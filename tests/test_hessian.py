"""Hessian measures (eigenvalues, trace, Frobenius norm, density) against a dense Hessian and against PyHessian.

The reference Hessian is built independently of our operator, with ``torch.func.hessian`` of the loss as a
function of the flattened parameters, on a small float64 MLP and a small float64 CNN, and eigen-decomposed
with ``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sharpness.measures import (EIGEN_METHODS, dense_hessian, hessian_density, hessian_eigenpairs,
                                hessian_eigenvalues, hessian_frobenius, hessian_trace)

loss_fn = nn.functional.cross_entropy


# ---------------------------------------------------------------------------------------------- problems
def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 3)).double()  # P = 93
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (64,), generator=g)


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)).double()  # P = 235
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 6, 6, generator=g, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (32,), generator=g)


def _reference_hessian(model, x, y, loss=loss_fn, vectorized=True):
    """The Hessian of the loss of the flattened trainable parameters, independently of our code:
    ``torch.func.hessian``, or (``vectorized=False``) ``torch.autograd.functional.hessian``'s loop of backward
    passes. The second is for BatchNorm in training mode, where torch 2.13's vmap of the batch-norm backward
    (used by ``torch.func.hessian`` and ``jacrev(jacrev(.))``, not by ``jvp(grad(.))``) gives a wrong Hessian.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(w):
        pieces, i = {}, 0
        for name, p in named:
            pieces[name] = w[i:i + p.numel()].view_as(p)
            i += p.numel()
        return loss(functional_call(model, pieces, (x,)), y)

    return hessian(loss_of)(flat) if vectorized else torch.autograd.functional.hessian(loss_of, flat)


class Problem:
    def __init__(self, build, loss=loss_fn):
        self.model, self.x, self.y = build()
        self.model.eval()
        self.loss = loss
        self.data = (self.x, self.y)
        self.hessian = _reference_hessian(self.model, self.x, self.y, loss)
        self.eigenvalues = torch.linalg.eigvalsh(self.hessian).flip(0)  # descending
        self.dim = self.hessian.shape[0]
        self.trace = float(self.hessian.trace())
        self.frobenius = float(self.hessian.norm())


@pytest.fixture(scope="module", params=[_mlp, _cnn], ids=["mlp", "cnn"])
def problem(request):
    return Problem(request.param)


@pytest.fixture(scope="module")
def mlp_problem():
    return Problem(_mlp)


def _flat(vector):
    return torch.cat([v.reshape(-1) for v in vector])


def _as_list(value):
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------------------------------------- dense
def test_dense_hessian_matches_torch_func(problem):
    dense = dense_hessian(problem.model, problem.loss, problem.data)
    assert dense.dtype == torch.float64 and dense.shape == (problem.dim, problem.dim)
    torch.testing.assert_close(dense, problem.hessian, rtol=0, atol=1e-12)
    assert torch.equal(dense, dense.T)


def test_dense_hessian_of_several_batches_is_the_size_weighted_mean(mlp_problem):
    p = mlp_problem
    batches = [(p.x[:10], p.y[:10]), (p.x[10:], p.y[10:])]
    torch.testing.assert_close(dense_hessian(p.model, p.loss, batches), p.hessian, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("method", EIGEN_METHODS)
@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenvalues_match_dense(problem, method, k):
    result, vectors = hessian_eigenpairs(problem.model, problem.loss, problem.data, k, method=method, tol=1e-10,
                                         max_iter=5000 if method == "power" else None)
    values = _as_list(result.value)
    assert isinstance(result.value, float if k == 1 else list) and len(values) == k
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), problem.eigenvalues[:k],
                               rtol=1e-4, atol=0)
    assert values == sorted(values, reverse=True)
    assert result.converged and result.tolerance == 1e-10 and result.seed == 0 and result.stderr is None
    assert result.settings["matvecs"] >= result.iterations >= k
    # unit, orthogonal eigenvectors: H v = lambda v
    flat = torch.stack([_flat(v) for v in vectors])
    torch.testing.assert_close(flat @ flat.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-6)
    for value, v in zip(values, flat):
        assert float((problem.hessian @ v - value * v).norm()) <= 1e-3 * abs(value)


@pytest.mark.parametrize("method", EIGEN_METHODS)
def test_largest_and_magnitude_orders_on_a_negative_spectrum(mlp_problem, method):
    """With the loss negated the largest-magnitude eigenvalues are negative: the two orders differ."""
    p = mlp_problem
    negated = lambda out, y: -loss_fn(out, y)
    eigenvalues = -p.eigenvalues.flip(0)  # H -> -H, descending
    by_magnitude = eigenvalues[eigenvalues.abs().argsort(descending=True)]
    assert eigenvalues[0] < abs(eigenvalues[-1])  # the case this test is about
    options = {"method": method, "tol": 1e-10, "max_iter": 5000 if method == "power" else None}
    largest = hessian_eigenvalues(p.model, negated, p.data, 2, which="largest", **options)
    magnitude = hessian_eigenvalues(p.model, negated, p.data, 2, which="magnitude", **options)
    torch.testing.assert_close(torch.tensor(largest.value, dtype=torch.float64), eigenvalues[:2], rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(magnitude.value, dtype=torch.float64), by_magnitude[:2], rtol=1e-4,
                               atol=0)


def test_full_dimension_lanczos_recovers_every_eigenvalue(mlp_problem):
    p = mlp_problem
    result = hessian_eigenvalues(p.model, p.loss, p.data, p.dim, tol=1e-8)
    assert result.converged and result.iterations == p.dim
    torch.testing.assert_close(torch.tensor(result.value, dtype=torch.float64), p.eigenvalues, rtol=0, atol=1e-10)


def test_lanczos_restarts_through_breakdowns():
    """A Hessian with few distinct eigenvalues (a linear least-squares model: H = 2 X^T X / n, repeated per
    output) makes the Krylov space invariant early; the restarts still find the repeated eigenvalues."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    data = (x, torch.zeros(20, 2, dtype=torch.float64))
    mse = nn.functional.mse_loss
    expected = torch.linalg.eigvalsh(dense_hessian(model, mse, data)).flip(0)
    assert torch.allclose(expected[0], expected[1])  # every eigenvalue twice
    result = hessian_eigenvalues(model, mse, data, 4, tol=1e-10)
    assert result.converged and result.iterations >= 4  # > 3 distinct values: at least one restart
    torch.testing.assert_close(torch.tensor(result.value, dtype=torch.float64), expected[:4], rtol=1e-8, atol=0)


@pytest.mark.parametrize("method", EIGEN_METHODS)
def test_float32_model(mlp_problem, method):
    """A float32 model: the Krylov basis is float32, coefficients and Ritz problem float64."""
    p = mlp_problem
    model = copy.deepcopy(p.model).float()
    data = (p.x.float(), p.y)
    result = hessian_eigenvalues(model, loss_fn, data, 2, method=method, tol=1e-6, max_iter=2000)
    assert result.converged
    torch.testing.assert_close(torch.tensor(result.value, dtype=torch.float64), p.eigenvalues[:2], rtol=1e-4, atol=0)
    trace = hessian_trace(model, loss_fn, data, samples=64)
    assert abs(trace.value - p.trace) <= 4 * trace.stderr


@pytest.mark.parametrize("hvp_method,rtol", [("func", 1e-10), ("finite_difference", 1e-5)])
def test_eigenvalue_with_other_products_and_split_batches(mlp_problem, hvp_method, rtol):
    p = mlp_problem
    batches = [(p.x[:24], p.y[:24]), (p.x[24:], p.y[24:])]
    result = hessian_eigenvalues(p.model, p.loss, batches, hvp_method=hvp_method, tol=1e-8)
    assert result.settings["hvp_method"] == hvp_method
    assert result.value == pytest.approx(float(p.eigenvalues[0]), rel=rtol)


# ---------------------------------------------------------------------------------------------- trace / Frobenius
def test_trace_within_stated_error_and_error_shrinks(problem):
    small = hessian_trace(problem.model, problem.loss, problem.data, samples=16, seed=1)
    large = hessian_trace(problem.model, problem.loss, problem.data, samples=1024, seed=2)
    assert small.samples == 16 and large.samples == 1024 and large.converged is None
    for result in (small, large):
        assert abs(result.value - problem.trace) <= 4 * result.stderr
    assert 4 < small.stderr / large.stderr < 16  # 1 / sqrt(n): sqrt(1024 / 16) = 8
    # Rademacher probes: the variance is 2 (||H||_F^2 - sum_i H_ii^2), so stderr^2 * n estimates it
    variance = 2 * (problem.frobenius ** 2 - float((problem.hessian.diagonal() ** 2).sum()))
    assert large.stderr ** 2 * 1024 == pytest.approx(variance, rel=0.25)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_frobenius_within_stated_error_and_error_shrinks(problem, kind):
    small = hessian_frobenius(problem.model, problem.loss, problem.data, samples=16, kind=kind, seed=3)
    large = hessian_frobenius(problem.model, problem.loss, problem.data, samples=1024, kind=kind, seed=4)
    for result in (small, large):
        assert abs(result.value - problem.frobenius) <= 4 * result.stderr
        assert result.settings["squared"] == pytest.approx(result.value ** 2)
        assert abs(result.settings["squared"] - problem.frobenius ** 2) <= 4 * result.settings["squared_stderr"]
    assert 4 < small.stderr / large.stderr < 16


def test_trace_early_stop_and_reproducibility(mlp_problem):
    p = mlp_problem
    rng = torch.get_rng_state()
    stopped = hessian_trace(p.model, p.loss, p.data, samples=1000, tol=0.05)
    assert stopped.converged and 10 <= stopped.samples < 1000 and stopped.tolerance == 0.05
    assert stopped.stderr <= 0.05 * abs(stopped.value)
    assert torch.equal(torch.get_rng_state(), rng)  # private generator: the global RNG is untouched
    again = hessian_trace(p.model, p.loss, p.data, samples=1000, tol=0.05)
    assert again == stopped
    other = hessian_trace(p.model, p.loss, p.data, samples=1000, tol=0.05, seed=1)
    assert other.value != stopped.value
    unreachable = hessian_frobenius(p.model, p.loss, p.data, samples=12, tol=1e-6)
    assert unreachable.samples == 12 and unreachable.converged is False
    one = hessian_trace(p.model, p.loss, p.data, samples=1)
    assert one.samples == 1 and math.isnan(one.stderr)


# ---------------------------------------------------------------------------------------------- density
def test_density_integrates_to_one_and_matches_the_dense_spectrum(problem):
    runs = 8
    result = hessian_density(problem.model, problem.loss, problem.data, iterations=40, runs=runs, seed=5)
    grid = torch.tensor(result.settings["grid"], dtype=torch.float64)
    density = torch.tensor(result.value, dtype=torch.float64)
    assert result.samples == runs and len(result.stderr) == len(grid) == len(density) == 1000
    assert bool((density >= 0).all())
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-12)
    nodes = [torch.tensor(n, dtype=torch.float64) for n in result.settings["nodes"]]
    weights = [torch.tensor(w, dtype=torch.float64) for w in result.settings["weights"]]
    assert result.settings["steps"] == [40] * runs
    for w in weights:
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    # moments: per run sum_j tau_j theta_j = v^T H v and sum_j tau_j theta_j^2 = ||H v||^2 (unit v), exactly;
    # over random v their means are tr H / P and ||H||_F^2 / P
    first = torch.stack([(w * n).sum() for n, w in zip(nodes, weights)])
    second = torch.stack([(w * n * n).sum() for n, w in zip(nodes, weights)])
    for moment, expected in ((first, problem.trace / problem.dim), (second, problem.frobenius ** 2 / problem.dim)):
        assert abs(float(moment.mean()) - expected) <= 4 * float(moment.std()) / math.sqrt(runs)
    sigma = result.settings["sigma"]
    assert float(torch.trapezoid(density * grid, grid)) == pytest.approx(float(first.mean()), abs=1e-9)
    assert float(torch.trapezoid(density * grid ** 2, grid)) == pytest.approx(
        float(second.mean()) + sigma ** 2, abs=1e-9)
    # its CDF against the dense eigenvalues' CDF smoothed by the same kernel, (1/P) sum_i Phi((t - lambda_i) / sigma),
    # at the dense spectrum's deciles and quartiles (the CNN's spectrum has an atom at 0: ~40% exact zeros)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(density, grid)])
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        point = torch.quantile(problem.eigenvalues, q)
        estimated = float(cdf[torch.searchsorted(grid, point)])
        smoothed = float((0.5 * (1 + torch.erf((point - problem.eigenvalues) / (sigma * math.sqrt(2))))).mean())
        assert estimated == pytest.approx(smoothed, abs=0.05), q


def test_density_full_lanczos_nodes_are_eigenvalues(mlp_problem):
    p = mlp_problem
    result = hessian_density(p.model, p.loss, p.data, iterations=500, grid=[-1.0, 0.0, 1.0], sigma=0.1)
    nodes = torch.tensor(result.settings["nodes"][0], dtype=torch.float64)
    weights = torch.tensor(result.settings["weights"][0], dtype=torch.float64)
    assert result.iterations == p.dim and result.settings["grid"] == [-1.0, 0.0, 1.0] and result.stderr is None
    heavy = nodes[weights > 1e-8]
    distance = (heavy[:, None] - p.eigenvalues[None, :]).abs().min(dim=1).values
    assert float(distance.max()) <= 1e-8
    # the density on a user grid is the Gaussian mixture of the nodes
    expected = (weights * torch.exp(-0.5 * ((0.0 - nodes) / 0.1) ** 2)).sum() / (0.1 * math.sqrt(2 * math.pi))
    assert result.value[1] == pytest.approx(float(expected), rel=1e-12)


# ---------------------------------------------------------------------------------------------- PyHessian
@contextlib.contextmanager
def _float64_default():
    """PyHessian draws its start vectors with ``torch.randn(p.size())`` (the default dtype): make them float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _pyhessian(model, data):
    pyhessian = pytest.importorskip("pyhessian")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its backward(create_graph=True) reference-cycle warning
        return pyhessian.hessian(model, loss_fn, data=data, cuda=False)


def _release(model):
    for p in model.parameters():  # PyHessian leaves create_graph gradients in .grad
        p.grad = None


def test_agrees_with_pyhessian(problem):
    """Same model, batch and eval mode (PyHessian always switches to eval), float64 throughout."""
    model = problem.model
    torch.manual_seed(0)
    try:
        with _float64_default():
            h = _pyhessian(model, problem.data)
            theirs, _ = h.eigenvalues(top_n=2, tol=1e-8, maxIter=5000)
            samples = h.trace(maxIter=400, tol=0.0)  # tol=0: no early stop, all 400 samples
    finally:
        _release(model)
    assert len(samples) == 400
    ours = hessian_eigenvalues(model, loss_fn, problem.data, 2, tol=1e-8)
    torch.testing.assert_close(torch.tensor(ours.value, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64),
                               rtol=1e-3,
                               atol=0)
    trace = hessian_trace(model, loss_fn, problem.data, samples=400)
    their_mean = sum(samples) / len(samples)
    their_stderr = math.sqrt(sum((s - their_mean) ** 2 for s in samples) / (len(samples) - 1) / len(samples))
    assert abs(trace.value - their_mean) <= 4 * math.hypot(trace.stderr, their_stderr)
    assert abs(their_mean - problem.trace) <= 4 * their_stderr


# ---------------------------------------------------------------------------------------------- mode, buffers, record
def _batchnorm_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.0), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 4, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (16,)))


MEASURES = {
    "eigenvalues": lambda m, d, **kw: hessian_eigenvalues(m, loss_fn, d, 2, **kw),
    "power": lambda m, d, **kw: hessian_eigenvalues(m, loss_fn, d, 2, method="power", tol=1e-4, **kw),
    "trace": lambda m, d, **kw: hessian_trace(m, loss_fn, d, samples=4, **kw),
    "frobenius": lambda m, d, **kw: hessian_frobenius(m, loss_fn, d, samples=4, **kw),
    "density": lambda m, d, **kw: hessian_density(m, loss_fn, d, iterations=8, grid=50, **kw),
}


@pytest.mark.parametrize("name", sorted(MEASURES))
@pytest.mark.parametrize("training", [True, False], ids=["train-model", "eval-model"])
def test_mode_buffers_and_grads_are_restored(name, training):
    model, data = _batchnorm_problem()
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("eval", "train"):
        result = MEASURES[name](model, data, mode=mode)
        assert result.settings["mode"] == mode
        assert all(m.training == training for m in model.modules())
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert all(p.grad is None for p in model.parameters())
        json.dumps(result.as_dict())  # the record is JSON-serializable


@pytest.mark.parametrize("hvp_method, rel", [("double_backward", 1e-8), ("func", 1e-8), ("finite_difference", 1e-5)])
def test_mode_selects_the_loss_that_is_measured(hvp_method, rel):
    """Train mode: batch statistics, with BatchNorm's buffers left as they were. (``func`` used to raise there:
    BatchNorm's in-place update of its running statistics inside the ``torch.func`` transform.)"""
    model, data = _batchnorm_problem()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = {mode: hessian_eigenvalues(model, loss_fn, data, tol=1e-10, mode=mode, hvp_method=hvp_method).value
                for mode in ("eval", "train")}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    reference = copy.deepcopy(model)
    reference[1].track_running_stats = False  # train mode: batch statistics without updating buffers (torch.func)
    for mode in ("eval", "train"):
        reference.train(mode == "train")
        expected = float(torch.linalg.eigvalsh(_reference_hessian(reference, *data, vectorized=False))[-1])
        assert measured[mode] == pytest.approx(expected, rel=rel)
    assert measured["eval"] != pytest.approx(measured["train"], rel=1e-3)


# ---------------------------------------------------------------------------------------------- bad input
def _bad_inputs():
    model, x, y = _mlp()  # P = 93
    data = (x, y)
    frozen = nn.Linear(5, 3).double().requires_grad_(False)
    per_sample = lambda out, t: loss_fn(out, t, reduction="none")
    return [
        (ValueError, "no samples", lambda: hessian_trace(model, loss_fn, [])),
        (ValueError, "no samples", lambda: hessian_eigenvalues(model, loss_fn, (x[:0], y[:0]))),
        (ValueError, "no parameters with requires_grad", lambda: hessian_eigenvalues(frozen, loss_fn, data)),
        (TypeError, "Invalid model type", lambda: hessian_trace(lambda t: t, loss_fn, data)),
        (ValueError, "expected a scalar tensor", lambda: hessian_trace(model, per_sample, data)),
        (ValueError, "expected a scalar tensor", lambda: dense_hessian(model, per_sample, data)),
        (ValueError, r"Invalid k value: 0 \(expected 1 <= k <= 93, the number of trainable parameters\)",
         lambda: hessian_eigenvalues(model, loss_fn, data, 0)),
        (ValueError, r"Invalid k value: 94 \(expected 1 <= k <= 93",
         lambda: hessian_eigenvalues(model, loss_fn, data, 94, method="power")),
        (TypeError, "Invalid k type: float", lambda: hessian_eigenvalues(model, loss_fn, data, 1.5)),
        (ValueError, r"Invalid tol value: 0.0 \(expected tol > 0", lambda: hessian_eigenvalues(model, loss_fn, data,
                                                                                              tol=0)),
        (ValueError, r"Invalid tol value: -1.0", lambda: hessian_trace(model, loss_fn, data, tol=-1)),
        (ValueError, r"Invalid tol value: nan", lambda: hessian_frobenius(model, loss_fn, data, tol=math.nan)),
        (ValueError, r"Invalid samples value: 0 \(expected an integer samples >= 1\)",
         lambda: hessian_trace(model, loss_fn, data, samples=0)),
        (ValueError, "Invalid samples value: -3", lambda: hessian_frobenius(model, loss_fn, data, samples=-3)),
        (TypeError, "Invalid samples type: float", lambda: hessian_trace(model, loss_fn, data, samples=10.0)),
        (ValueError, r"Invalid method value: 'arnoldi' \(expected one of 'lanczos', 'power'\)",
         lambda: hessian_eigenvalues(model, loss_fn, data, method="arnoldi")),
        (ValueError, r"Invalid which value: 'smallest' \(expected one of 'largest', 'magnitude'\)",
         lambda: hessian_eigenvalues(model, loss_fn, data, which="smallest")),
        (ValueError, "Invalid kind value: 'uniform'", lambda: hessian_trace(model, loss_fn, data, kind="uniform")),
        (ValueError, "Invalid max_iter value: 0", lambda: hessian_eigenvalues(model, loss_fn, data, max_iter=0)),
        (ValueError, r"Invalid max_iter value: 2 \(expected max_iter >= k=3",
         lambda: hessian_eigenvalues(model, loss_fn, data, 3, max_iter=2)),
        (ValueError, "Invalid seed value: -1", lambda: hessian_trace(model, loss_fn, data, seed=-1)),
        (ValueError, "93 trainable parameters .*max_params=50",
         lambda: dense_hessian(model, loss_fn, data, max_params=50)),
        (ValueError, "Invalid iterations value: 0", lambda: hessian_density(model, loss_fn, data, iterations=0)),
        (ValueError, "Invalid runs value: 0", lambda: hessian_density(model, loss_fn, data, runs=0)),
        (ValueError, "Invalid grid value: 1", lambda: hessian_density(model, loss_fn, data, grid=1)),
        (ValueError, "Invalid grid value: shape", lambda: hessian_density(model, loss_fn, data, grid=[[0.0, 1.0]])),
        (TypeError, "Invalid grid type: str", lambda: hessian_density(model, loss_fn, data, grid="fine")),
        (ValueError, r"Invalid sigma value: 0.0 \(expected sigma > 0",
         lambda: hessian_density(model, loss_fn, data, sigma=0)),
        (ValueError, "Invalid mode value: 'test'", lambda: hessian_trace(model, loss_fn, data, mode="test")),
        (ValueError, "Invalid method value: 'lanczos'",
         lambda: hessian_trace(model, loss_fn, data, hvp_method="lanczos")),
    ]


@pytest.mark.parametrize("error,match,call", _bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs(error, match, call):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("spectrum", ["eigenvalues", "density"])
def test_a_non_finite_hessian_vector_product_is_a_clear_error(spectrum):
    """A NaN in the data used to surface as eigh's 'ill-conditioned input'."""
    from helpers import classification_data, mlp
    from sharpness.measures import hessian_density, hessian_eigenvalues

    x, y = classification_data(0, n=8)
    x[3, 1] = float("nan")
    fn = hessian_eigenvalues if spectrum == "eigenvalues" else hessian_density
    with pytest.raises(ValueError, match="Hessian-vector product is not finite"):
        fn(mlp(0), torch.nn.functional.cross_entropy, (x, y))


def test_flat_rademacher_probes_are_the_per_parameter_draws():
    """Hutchinson draws a whole Rademacher probe at once (one host-to-device copy); the numbers must be those of
    per-parameter draws from the same generator (the documented probes, the same on every device)."""
    from sharpness.measures._common import random_vector
    from sharpness.measures.hessian import _flat_operator

    model, x, y = _mlp()
    with _flat_operator(model, nn.functional.cross_entropy, (x, y), "eval", "double_backward") as op:
        flat = op.random(torch.Generator().manual_seed(5), "rademacher")
        per_parameter = op.flatten(random_vector(op.params, torch.Generator().manual_seed(5), "rademacher"))
    assert flat.dtype == per_parameter.dtype == torch.float64 and flat.shape == (93,)
    assert torch.equal(flat, per_parameter) and set(flat.unique().tolist()) == {-1.0, 1.0}
