"""The papers' sharpness definitions against exact values: GNR Fig. 1a and Props. 2.1/2.4, SALR Fig. 2,
Keskar's box, AE-SAM's gradient statistics by hand; bad inputs; bit-exact restoration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpness.measures import (HVP_METHODS, gnr_sharpness, gradient_variance, keskar_sharpness,
                                mean_squared_gradient_norm, plot_lines, salr_sharpness, salr_sharpness_hat,
                                salr_stochastic_sharpness, sam_sharpness)

DUMMY = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def identity_loss(output, target):
    return output.sum()


class Toy(nn.Module):
    """``L(t) = fn(t)`` for a parameter vector ``t``; the batch is ignored (a dummy)."""

    def __init__(self, fn, t0=0.0, dim: int = 1) -> None:
        super().__init__()
        self.fn = fn
        self.t = nn.Parameter(torch.full((dim,), float(t0), dtype=torch.float64))

    def forward(self, x):
        return self.fn(self.t)


def _set(model: Toy, value) -> Toy:
    with torch.no_grad():
        model.t.copy_(torch.as_tensor(value, dtype=torch.float64).reshape(model.t.shape))
    return model


# --------------------------------------------------------------------------------------- GNR paper
@pytest.mark.parametrize("k", [1, 3])
def test_gnr_figure_1a_sam_cannot_tell_gnr_can(k):
    """L_k(t) = cos(k pi t + pi) at t = 0, rho = 1: R_SAM = 2 for both, R_GNR = k pi (GNR section 2.3)."""
    model = Toy(lambda t: torch.cos(k * math.pi * t + math.pi).sum())
    sam = sam_sharpness(model, identity_loss, DUMMY, 1.0, steps=30, restarts=3)
    gnr = gnr_sharpness(model, identity_loss, DUMMY, 1.0, steps=60, restarts=3)
    assert sam.value == pytest.approx(2.0, abs=1e-12)
    assert gnr.value == pytest.approx(k * math.pi, rel=1e-9)
    assert sam.name == "sam_sharpness" and gnr.name == "gnr_sharpness"
    assert sam.settings["loss"] == pytest.approx(-1.0) and gnr.settings["rho"] == 1.0


def _psd(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = torch.linspace(0.1, 3.0, dim, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("rho", [0.05, 1.0])
def test_quadratic_prop_2_1(rho):
    """L = 0.5 w^T A w at its minimum w = 0: R_GNR / rho^2 = lambda_max (Prop. 2.1), and
    R_SAM = rho^2 lambda_max / 2 (the maximum of a quadratic on the ball)."""
    a = _psd(5, seed=0)
    lam = float(torch.linalg.eigvalsh(a)[-1])
    model = Toy(lambda w: 0.5 * w @ a @ w, dim=5)
    sam = sam_sharpness(model, identity_loss, DUMMY, rho, steps=100, restarts=2)
    gnr = gnr_sharpness(model, identity_loss, DUMMY, rho, steps=100, restarts=2)
    assert gnr.value / rho ** 2 == pytest.approx(lam, rel=1e-9)
    assert sam.value == pytest.approx(0.5 * rho ** 2 * lam, rel=1e-6)
    assert sam.settings["first_order_value"] is None  # g(0) = 0: no first-order point, random starts only


@pytest.mark.parametrize("hvp_method", HVP_METHODS)
def test_least_squares_minimum_prop_2_1_with_batches(hvp_method):
    """A real model at its least-squares minimum, two unequal batches: H = 2 X^T X / N exactly."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 4, generator=g, dtype=torch.float64)
    y = torch.randn(13, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / 13)[-1])
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    rho = 0.3

    def mse(out, target):  # nn.functional.mse_loss breaks torch.func's jvp-of-grad in torch 2.13 (ZeroTensor)
        return ((out - target) ** 2).mean()

    sam = sam_sharpness(model, mse, data, rho, steps=30, restarts=1)
    gnr = gnr_sharpness(model, mse, data, rho, steps=30, restarts=1, hvp_method=hvp_method)
    assert sam.value == pytest.approx(0.5 * rho ** 2 * lam, rel=1e-6)
    assert gnr.value == pytest.approx(rho ** 2 * lam, rel=1e-6)
    assert gnr.settings["hvp_evaluations"] > 0 and gnr.settings["hvp_method"] == hvp_method


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), rho=st.floats(0.05, 2.0))
def test_prop_2_4_gnr_bounds_sam(seed, rho):
    """Prop. 2.4: for every w and rho > 0 (L differentiable), R_GNR >= R_SAM; and the multi-step search is at
    least as good as the one-step (first-order) values both methods train with."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    g = torch.Generator().manual_seed(seed)
    data = (torch.randn(16, 2, generator=g, dtype=torch.float64),
            torch.randn(16, 1, generator=g, dtype=torch.float64))
    sam = sam_sharpness(model, nn.functional.mse_loss, data, rho, steps=30, restarts=3, seed=seed)
    gnr = gnr_sharpness(model, nn.functional.mse_loss, data, rho, steps=30, restarts=3, seed=seed)
    assert gnr.value >= sam.value - 1e-12
    assert sam.value >= sam.settings["first_order_value"] - 1e-12
    assert gnr.value >= gnr.settings["first_order_value"] - 1e-12


# --------------------------------------------------------------------------------------- SALR
def f_salr(t: float) -> float:
    return 0.5 * t * math.sin(3 * t) + 1


def df_salr(t: float) -> float:
    return 0.5 * math.sin(3 * t) + 1.5 * t * math.cos(3 * t)


def salr_extrema(lo: float = -3.0, hi: float = 3.0) -> tuple[list[float], list[float]]:
    """The local minima and maxima of f in (lo, hi), by bisection on f' (hand computation, no torch)."""
    grid = np.linspace(lo, hi, 6001)
    minima, maxima = [], []
    for a, b in zip(grid, grid[1:]):
        if df_salr(a) == 0 or df_salr(a) * df_salr(b) > 0:
            continue
        left, right = float(a), float(b)
        for _ in range(200):
            mid = 0.5 * (left + right)
            if df_salr(left) * df_salr(mid) <= 0:
                right = mid
            else:
                left = mid
        root = 0.5 * (left + right)
        (minima if df_salr(a) < 0 else maxima).append(root)
    return minima, maxima


def salr_toy(t0: float) -> Toy:
    return Toy(lambda t: (0.5 * t * torch.sin(3 * t) + 1).sum(), t0=t0)


EPS = 0.1


def test_salr_extrema_of_f():
    minima, maxima = salr_extrema()
    assert len(minima) == 3 and len(maxima) == 4 and 0.0 in [round(m, 12) for m in minima]


def test_salr_measures_at_local_minima_and_maxima():
    """S(eps) (eq. 2) and phi (eq. 1 on the ball, Keskar's x100) at f's extrema vs the interval's max/min."""
    minima, maxima = salr_extrema()
    for t in minima:
        model = salr_toy(t)
        up = max(f_salr(t - EPS), f_salr(t + EPS)) - f_salr(t)
        s = salr_sharpness(model, identity_loss, DUMMY, EPS, steps=20, restarts=3)
        phi = keskar_sharpness(model, identity_loss, DUMMY, EPS, region="ball", steps=20, restarts=3)
        assert s.value == pytest.approx(up, abs=1e-12)
        assert phi.value == pytest.approx(100 * up / (1 + f_salr(t)), abs=1e-10)
        # SALR: "if theta is a local minimizer, (2) is equivalent to (1)" (up to the 1 + f normalization)
        assert s.value == pytest.approx(phi.value / 100 * (1 + f_salr(t)), abs=1e-12)
    for t in maxima:
        model = salr_toy(t)
        down = f_salr(t) - min(f_salr(t - EPS), f_salr(t + EPS))
        s = salr_sharpness(model, identity_loss, DUMMY, EPS, steps=20, restarts=3)
        phi = keskar_sharpness(model, identity_loss, DUMMY, EPS, region="ball", steps=20, restarts=3)
        assert s.value == pytest.approx(down, abs=1e-12)
        assert phi.value == pytest.approx(0.0, abs=1e-9)  # (1) vanishes at a maximizer, (2) does not
        assert s.value > 0.01


@pytest.mark.parametrize("kind", ["minimum", "maximum"])
def test_salr_hat_definition_1_by_hand(kind):
    """Normalized steps in 1-D are sign steps of length gamma. Just right of a minimum (delta = 1e-6): ascent
    goes right n2 times; descent steps left past the minimum, then back, alternating. Right of a maximum:
    mirrored."""
    minima, maxima = salr_extrema()
    t0 = (minima if kind == "minimum" else maxima)[-1] + 1e-6
    gamma, n = 0.02, 5
    hat = salr_sharpness_hat(salr_toy(t0), identity_loss, DUMMY, gamma, ascent_steps=n, descent_steps=n)
    if kind == "minimum":   # ascent: t0 + 5 gamma; descent: t0 - g, t0, t0 - g, t0, t0 - g
        expected = f_salr(t0 + n * gamma) - f_salr(t0 - gamma)
    else:                   # ascent: t0 - g, t0, ..., t0 - g; descent: t0 + 5 gamma
        expected = f_salr(t0 - gamma) - f_salr(t0 + n * gamma)
    assert hat.value == pytest.approx(expected, abs=1e-12)
    assert hat.value > 0
    assert hat.settings["loss"] == pytest.approx(f_salr(t0), abs=1e-15)
    # Algorithm 2 on a loss that ignores the samples: every per-sample gradient is g, so it equals Def. 1
    batch = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    stochastic = salr_stochastic_sharpness(salr_toy(t0), identity_loss, batch, gamma, ascent_steps=n,
                                           descent_steps=n)
    assert stochastic.value == pytest.approx(hat.value, abs=1e-12)


def test_salr_figure_2_shape(tmp_path):
    """phi, S(eps) and S_hat over t (SALR Fig. 2): S(eps) equals a brute-force max - min over
    [t - eps, t + eps] everywhere, phi vanishes at the maxima while S and S_hat do not, all three are small at
    the flat minimum t = 0."""
    ts = np.round(np.linspace(-2.5, 2.5, 31), 12)
    phi, s, hat = [], [], []
    for t in ts:
        model = salr_toy(float(t))
        phi.append(keskar_sharpness(model, identity_loss, DUMMY, EPS, region="ball", steps=40).value)
        s.append(salr_sharpness(model, identity_loss, DUMMY, EPS, steps=40).value)
        hat.append(salr_sharpness_hat(model, identity_loss, DUMMY, EPS / 5, ascent_steps=5,
                                      descent_steps=5).value)
        window = [f_salr(u) for u in np.linspace(t - EPS, t + EPS, 2001)]
        assert s[-1] == pytest.approx(max(window) - min(window), abs=1e-7)
        assert s[-1] >= max(window) - min(window) - 1e-12  # the search is exact, the grid underestimates
    path = plot_lines(ts, {"phi(eps) / 100": np.array(phi) / 100, "S(eps)": s, "S_hat": hat,
                           "f": [f_salr(t) for t in ts]}, tmp_path / "salr_fig2.png", xlabel="theta",
                      title="SALR Fig. 2: f(t) = 0.5 t sin(3t) + 1, eps = 0.1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    centre = int(np.argmin(np.abs(ts)))
    assert phi[centre] < 1.0 and s[centre] < 0.02 and hat[centre] < 0.02  # small at the flat minimum t = 0
    minima, maxima = salr_extrema()
    inner = [salr_toy(t) for t in maxima if abs(t) < 1]  # the maxima next to t = 0, at +-0.676
    for model in inner:
        assert keskar_sharpness(model, identity_loss, DUMMY, EPS, region="ball", steps=20).value < 1e-7
        assert salr_sharpness(model, identity_loss, DUMMY, EPS, steps=20).value > s[centre]
        assert salr_sharpness_hat(model, identity_loss, DUMMY, EPS / 5, ascent_steps=5,
                                  descent_steps=5).value > hat[centre]


def test_salr_algorithm_2_per_sample_normalized_gradients_by_hand():
    """Linear least squares: grad f_j = 2 (x_j.w - y_j) x_j; two hand-written steps each way."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()

    def loss_fn(out, target):
        return nn.functional.mse_loss(out.squeeze(-1), target)

    w0 = model.weight.detach().reshape(-1).clone()
    gamma = 0.05

    def step(w, sign):
        per = 2 * (x @ w - y)[:, None] * x
        return w + sign * gamma * (per / per.norm(dim=1, keepdim=True)).mean(0)

    def full_loss(w):
        return float(((x @ w - y) ** 2).mean())

    w_plus, w_minus = step(step(w0, +1), +1), step(step(w0, -1), -1)
    data = [(x[:2], y[:2]), (x[2:], y[2:])]  # pooled over batches
    out = salr_stochastic_sharpness(model, loss_fn, data, gamma, ascent_steps=2, descent_steps=2,
                                    chunk_size=3)
    assert out.value == pytest.approx(full_loss(w_plus) - full_loss(w_minus), abs=1e-12)
    assert out.settings["samples"] == 6 and torch.equal(model.weight.reshape(-1), w0)


# --------------------------------------------------------------------------------------- Keskar box
def test_keskar_box_on_a_quadratic_equals_the_best_vertex():
    """0.5 w^T A w is convex, so its maximum over Keskar's box |e_i| <= eps (|w_i| + 1) is at a vertex."""
    a = _psd(3, seed=4)
    w0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    model = _set(Toy(lambda w: 0.5 * w @ a @ w, dim=3), w0)
    eps = 0.05
    r = eps * (w0.abs() + 1)
    loss = float(0.5 * w0 @ a @ w0)
    signs = torch.tensor([[i >> k & 1 for k in range(3)] for i in range(8)], dtype=torch.float64) * 2 - 1
    best = max(float(0.5 * (w0 + s * r) @ a @ (w0 + s * r)) for s in signs)
    out = keskar_sharpness(model, identity_loss, DUMMY, eps, steps=30, restarts=4)
    assert out.value == pytest.approx(100 * (best - loss) / (1 + loss), rel=1e-9)
    assert out.settings["region"] == "box"
    assert out.settings["max_increase"] == pytest.approx(best - loss, rel=1e-9)


def test_keskar_needs_one_plus_loss_positive():
    model = Toy(lambda t: torch.cos(math.pi * t + math.pi).sum())  # L(0) = -1
    with pytest.raises(ValueError, match=r"1 \+ L\(w\)"):
        keskar_sharpness(model, identity_loss, DUMMY, 0.1)


# --------------------------------------------------------------------------------------- AE-SAM statistics
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradient_variance_and_mean_squared_norm_by_hand(per_sample):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    w = model.weight.detach().reshape(-1)

    def loss_fn(out, target):
        return nn.functional.mse_loss(out.squeeze(-1), target)

    sizes = [3, 5, 4]
    batches, start = [], 0
    for n in sizes:
        batches.append((x[start:start + n], y[start:start + n]))
        start += n
    samples = [(xb[j:j + 1], yb[j:j + 1]) for xb, yb in batches for j in range(len(xb))]
    units = samples if per_sample else batches
    grads = [2 * xb.T @ (xb @ w - yb) / len(xb) for xb, yb in units]   # grad of the unit's mean squared error
    weights = [len(xb) / 12 for xb, _ in units]
    full = sum(p * gr for p, gr in zip(weights, grads))
    variance = sum(p * float((gr - full) @ (gr - full)) for p, gr in zip(weights, grads))
    msq = sum(p * float(gr @ gr) for p, gr in zip(weights, grads))

    var = gradient_variance(model, loss_fn, batches, per_sample=per_sample)
    sq = mean_squared_gradient_norm(model, loss_fn, batches, per_sample=per_sample)
    assert var.value == pytest.approx(variance, rel=1e-12)
    assert sq.value == pytest.approx(msq, rel=1e-12)
    assert var.value == pytest.approx(sq.value - float(full @ full), rel=1e-9)  # AE-SAM eq. (3)
    assert var.samples == len(units) and var.stderr is not None and var.stderr > 0


def test_gradient_variance_needs_two_batches():
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match="at least 2 batches"):
        gradient_variance(model, nn.functional.mse_loss, (x, y))
    assert mean_squared_gradient_norm(model, nn.functional.mse_loss, (x, y)).stderr is None


# --------------------------------------------------------------------------------------- errors, restore
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


XY = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
CE = nn.functional.cross_entropy



def _search_measure(fn, radius):
    """``fn(model, loss_fn, data, radius, steps=2, **kw)``; the table's ``rho=`` is the radius/epsilon."""
    return lambda m, lf, d, **kw: fn(m, lf, d, kw.pop("rho", radius), steps=kw.pop("steps", 2), **kw)


def _step_measure(fn, gamma):
    """``fn(model, loss_fn, data, gamma, ascent_steps=2, **kw)``; ``rho=`` in the test table is gamma."""
    return lambda m, lf, d, **kw: fn(m, lf, d, kw.pop("rho", gamma), ascent_steps=kw.pop("steps", 2), **kw)


MEASURES = {
    "sam": _search_measure(sam_sharpness, 0.1),
    "gnr": _search_measure(gnr_sharpness, 0.1),
    "keskar": _search_measure(keskar_sharpness, 1e-3),
    "salr": _search_measure(salr_sharpness, 0.1),
    "salr_hat": _step_measure(salr_sharpness_hat, 0.01),
    "salr_stochastic": _step_measure(salr_stochastic_sharpness, 0.01),
}
SEARCHES = ["sam", "gnr", "keskar", "salr"]


@pytest.mark.parametrize("name", list(MEASURES))
@pytest.mark.parametrize("kwargs, match", [
    ({"rho": 0.0}, r"Invalid (rho|epsilon|gamma) value: 0.0 \(expected (rho|epsilon|gamma) > 0"),
    ({"rho": -1.0}, r"Invalid (rho|epsilon|gamma) value: -1.0"),
    ({"rho": float("nan")}, "nan"),
    ({"mode": "test"}, "Invalid mode value"),
], ids=["rho=0", "rho<0", "rho=nan", "mode"])
def test_bad_values(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MEASURES[name](_mlp(), CE, XY, **kwargs)


@pytest.mark.parametrize("name", list(MEASURES))
def test_bad_data_loss_and_model(name):
    model = _mlp()
    with pytest.raises(ValueError, match="no samples"):
        MEASURES[name](model, CE, [])
    with pytest.raises(ValueError, match="no samples"):
        MEASURES[name](model, CE, (XY[0][:0], XY[1][:0]))
    with pytest.raises(ValueError, match="scalar"):
        MEASURES[name](model, lambda out, t: nn.functional.cross_entropy(out, t, reduction="none"), XY)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        MEASURES[name](_mlp().requires_grad_(False), CE, XY)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        MEASURES[name](lambda x: x, CE, XY)


@pytest.mark.parametrize("name", SEARCHES)
def test_bad_search_settings(name):
    with pytest.raises(ValueError, match=r"Invalid steps value: 0 \(expected an integer steps >= 1\)"):
        MEASURES[name](_mlp(), CE, XY, steps=0)
    with pytest.raises(ValueError, match="Invalid restarts value: 0"):
        MEASURES[name](_mlp(), CE, XY, restarts=0)
    with pytest.raises(ValueError, match="Invalid step_size value"):
        MEASURES[name](_mlp(), CE, XY, step_size=0.0)
    with pytest.raises(TypeError, match="Invalid steps type"):
        MEASURES[name](_mlp(), CE, XY, steps=2.5)


def test_other_bad_settings():
    with pytest.raises(ValueError, match="Invalid region value: 'sphere'"):
        keskar_sharpness(_mlp(), CE, XY, region="sphere")
    with pytest.raises(ValueError, match="Invalid hvp_method value"):
        gnr_sharpness(_mlp(), CE, XY, 0.1, hvp_method="lanczos")
    with pytest.raises(ValueError, match="expected at least one step"):
        salr_sharpness_hat(_mlp(), CE, XY, 0.1, ascent_steps=0, descent_steps=0)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="'train' with BatchNorm"):
        salr_stochastic_sharpness(bn, CE, XY, 0.1, mode="train")


def _bn_dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(MEASURES) + ["variance", "squared_norm"])
def test_weights_buffers_and_modes_restored_bit_exactly(name, mode):
    model = _bn_dropout_model()  # float32: shifts and restores must not round
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 3)
    y = torch.randint(0, 2, (10,))
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    torch.manual_seed(1)  # dropout in train mode
    if name == "variance":
        gradient_variance(model, CE, data, mode=mode)
    elif name == "squared_norm":
        mean_squared_gradient_norm(model, CE, data, mode=mode)
    elif name == "salr_stochastic" and mode == "train":
        with pytest.raises(ValueError, match="'train' with BatchNorm"):  # rejected before touching the model
            MEASURES[name](model, CE, data, mode=mode)
    else:
        MEASURES[name](model, CE, data, mode=mode, rho=0.1 if name.startswith("salr_") else 0.5)
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_measurement_records_settings_and_is_reproducible():
    model = _mlp()
    a = sam_sharpness(model, CE, XY, 0.5, steps=5, restarts=3, seed=7)
    b = sam_sharpness(model, CE, XY, 0.5, steps=5, restarts=3, seed=7)
    assert a == b
    assert a.seed == 7 and a.samples == 3 and a.iterations == sum(a.settings["iterations_per_restart"])
    assert a.settings["gradient_evaluations"] >= 1 + 3
    assert a.as_dict()["settings"]["rho"] == 0.5


def test_per_sample_paths_with_dropout_in_train_mode():
    """vmap draws a dropout mask per sample (randomness="different"); weights and flags are restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    before = [p.clone() for p in model.parameters()]
    assert math.isfinite(salr_stochastic_sharpness(model, CE, XY, 0.05, mode="train").value)
    assert gradient_variance(model, CE, XY, per_sample=True, mode="train").value > 0
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
