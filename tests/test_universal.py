"""Universal (phi, psi, mu)-sharpness: the measures against analytic values, the optimizers against by-hand steps."""

from __future__ import annotations

import dataclasses
import io
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import erf
from torch import nn

import sharpness
from helpers import classification_data, make_closure, mlp, native, params_equal
from sharpness.measures import ParameterFunction, SharpnessMeasure, sharpness_measure, universal_sharpness
from sharpness.measures.universal import summarize

F64 = torch.float64


def _spd(seed: int = 0, p: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=g, dtype=F64)
    return a @ a.T + 0.5 * torch.eye(p, dtype=F64)


def _quadratic(h: torch.Tensor, quartic: float = 0.0) -> ParameterFunction:
    """``f(w) = w^T H w / 2 + quartic * sum w^4`` at ``w = 0`` (a critical point with Hessian ``H``)."""
    return ParameterFunction(lambda w: 0.5 * w @ h @ w + quartic * w.pow(4).sum(), torch.zeros(h.shape[0], dtype=F64))


def _close(measurement, exact: float, sigmas: float = 4.0) -> bool:
    return abs(measurement.value - exact) <= sigmas * measurement.stderr


# ---------------------------------------------------------------------------------------------- measures
@pytest.mark.parametrize("name", ["spd", "indefinite"])
def test_trace_and_frobenius_presets_equal_tr_h_and_squared_frobenius(name):
    if name == "spd":
        h = _spd(0)
    else:  # the paper's non-convex point: tr H = 0 calls it flat, ||H||_F^2 = 14 does not
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64))
        h = q @ torch.diag(torch.tensor([3.0, -1.0, -2.0], dtype=F64)) @ q.T
    model = _quadratic(h)
    exact = {"trace": float(h.trace()), "frobenius": float((h * h).sum())}
    scale = float(h.norm())
    for measure, value in exact.items():
        dense = universal_sharpness(model, measure=measure, hessian="dense", num_samples=100_000, seed=3)
        assert _close(dense, value) and dense.stderr < 0.02 * scale ** (2 if measure == "frobenius" else 1)
        by_hvp = universal_sharpness(model, measure=measure, num_samples=1000, seed=4)
        assert _close(by_hvp, value) and by_hvp.stderr < 0.1 * scale ** (2 if measure == "frobenius" else 1)
    assert dense.settings["measure"] == "frobenius" and dense.samples == 100_000


def _truncated_det(h: np.ndarray, a: float) -> float:
    """``(2 pi)^p / I_a^2`` with ``I_a`` the integral of ``exp(-d^T H d / 2)`` over ``[-a, a]^2`` (scipy)."""
    def integrand(y, x):
        d = np.array([x, y])
        return math.exp(-d @ h @ d / 2)
    value, _ = integrate.dblquad(integrand, -a, a, -a, a, epsabs=1e-12, epsrel=1e-10)
    return (2 * math.pi) ** 2 / value ** 2


def test_det_preset_equals_the_truncated_integral_and_det_h_for_a_large_cube():
    h = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    model = _quadratic(h)
    a = 1.5  # moderate cube: the truncation is visible, exactly det H / prod erf(a sqrt(h / 2))^2
    truncated = 6.0 / float(np.prod(erf(a * np.sqrt(np.array([1.0, 2.0, 3.0]) / 2)))) ** 2
    m = universal_sharpness(model, measure="det", half_width=a, hessian="dense", num_samples=1_000_000, seed=0)
    assert _close(m, truncated) and m.stderr < 0.005 * truncated
    assert abs(m.value - 6.0) > 20 * m.stderr  # finite a over-estimates det H (documented)
    assert m.settings["log_value"] == pytest.approx(math.log(m.value))
    big = universal_sharpness(model, measure="det", half_width=6.0, hessian="dense", num_samples=1_000_000, seed=1)
    assert _close(big, 6.0) and big.stderr < 0.03 * 6.0

    h2 = np.array([[2.0, 0.8], [0.8, 1.0]])  # not axis-aligned: scipy's integral over the square
    ref = _truncated_det(h2, 1.2)
    m2 = universal_sharpness(_quadratic(torch.tensor(h2)), measure="det", half_width=1.2, hessian="dense",
                             num_samples=1_000_000, seed=2)
    assert _close(m2, ref) and m2.stderr < 0.005 * ref and ref > 1.2 * float(np.linalg.det(h2))


def test_hvp_and_dense_quadratic_forms_agree_on_a_network():
    model = mlp(0, width=4)
    x, y = classification_data(0, n=32)
    data, loss = (x, y), nn.functional.cross_entropy
    h = sharpness.measures.dense_hessian(model, loss, data)
    for measure, exact in (("trace", float(h.trace())), ("frobenius", float((h * h).sum()))):
        by_hvp = universal_sharpness(model, loss, data, measure, num_samples=400, seed=0)
        assert _close(by_hvp, exact)
        assert by_hvp.stderr < 0.25 * abs(exact)


def test_worst_direction_preset_matches_the_sphere_integral_and_grows_toward_lambda_max():
    h = torch.diag(torch.tensor([3.0, 1.0], dtype=F64))
    theta = np.linspace(0.0, 2 * math.pi, 200_001)[:-1]
    rayleigh = 3.0 * np.cos(theta) ** 2 + np.sin(theta) ** 2  # d^T H d on the unit circle
    values = []
    for q in (2, 8, 32):
        exact = float(np.mean(rayleigh ** q) ** (1.0 / q))
        m = universal_sharpness(_quadratic(h), measure="worst", q=q, hessian="dense", num_samples=200_000, seed=q)
        assert _close(m, exact, 5.0) and m.stderr < 0.01 * exact
        values.append(m.value)
    assert values[0] < values[1] < values[2] < 3.0 and values[2] > 2.7


def test_worst_preset_on_a_flat_loss_is_zero_not_nan():
    """Every quadratic form 0 (a locally constant loss): ``phi'(0) = inf`` for ``phi(s) = s^(1/q)`` met
    ``psi'(0) = 0``, and their product was NaN: in the measure's standard error and, through UniversalSAM's
    coefficients, in the weights. The worst-direction objective has no gradient there; its coefficient is 0."""
    m = universal_sharpness(_quadratic(torch.zeros(3, 3, dtype=F64)), measure="worst", hessian="dense",
                            num_samples=64, seed=0)
    assert (m.value, m.stderr) == (0.0, 0.0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every hidden unit dead on this batch
    net[2].requires_grad_(False)  # and the head frozen: the loss is constant in the trainable weights
    x, y = classification_data(0, n=8)
    x = x[:, :3]
    before = [p.detach().clone() for p in net.parameters()]
    opt = sharpness.UniversalSAM(torch.optim.SGD(net.parameters(), lr=0.1), measure="worst", rho=0.01, lam=0.1)
    opt.step(make_closure(opt, net, x, y))
    assert opt.last_quadratic_forms.abs().max() == 0
    assert params_equal(list(net.parameters()), before)  # no gradient, no step, and no NaN


def test_zeroth_order_estimate_converges_as_rho_shrinks_and_samples_grow():
    h = _spd(2)
    model = _quadratic(h, quartic=0.5)  # x(d) = d^T H d + rho^2 sum d^4: an O(rho^2) bias
    exact_forms = universal_sharpness(model, measure="trace", num_samples=500, seed=7)
    errors = []
    for rho in (1.0, 0.3, 0.1, 0.03):
        zeroth = universal_sharpness(model, measure="trace", rho=rho, num_samples=500, seed=7)  # same directions
        errors.append(abs(zeroth.value - exact_forms.value))
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[0] > 0.5 and errors[-1] < 2e-3 * exact_forms.value
    assert errors[-1] == pytest.approx(errors[0] * 0.03 ** 2, rel=0.05)  # the bias is exactly rho^2 * E sum d^4

    trace, frob = float(h.trace()), float(h.norm())
    for count in (10, 100, 1000, 10_000):  # Monte-Carlo error within 4 sigma = 4 sqrt(2) ||H||_F / sqrt(m)
        m = universal_sharpness(model, measure="trace", rho=1e-3, num_samples=count, seed=11)
        assert abs(m.value - trace) <= 4 * math.sqrt(2) * frob / math.sqrt(count) + 1e-3 * trace
    assert abs(m.value - trace) < 0.03 * trace


def test_scale_invariance_det_equal_trace_and_frobenius_not():
    """(x y - 1)^2 at (x, y) and (c x, y / c): det H is invariant (Theorem 4); tr H and ||H||_F are not."""
    def loss(w):
        return (w[0] * w[1] - 1.0) ** 2

    values = {}
    for point in ((1.0, 0.6), (2.0, 0.3)):  # x y = 0.6: det H = -4 (3 * 0.6 - 1)(0.6 - 1) = 1.28
        model = ParameterFunction(loss, torch.tensor(point, dtype=F64))
        values[point] = {
            name: universal_sharpness(model, measure=name, hessian="dense", seed=5,
                                      **({"half_width": 14.0, "num_samples": 2_000_000} if name == "det"
                                         else {"num_samples": 200_000}))
            for name in ("det", "trace", "frobenius")
        }
    a, b = values[(1.0, 0.6)], values[(2.0, 0.3)]
    assert _close(a["det"], 1.28) and _close(b["det"], 1.28)
    assert abs(a["det"].value - b["det"].value) <= 4 * math.hypot(a["det"].stderr, b["det"].stderr)
    assert a["det"].stderr < 0.03 * 1.28 and b["det"].stderr < 0.03 * 1.28
    assert _close(a["trace"], 2 * 0.36 + 2 * 1.0) and _close(b["trace"], 2 * 0.09 + 2 * 4.0)
    assert b["trace"].value > 2.5 * a["trace"].value
    assert b["frobenius"].value > 10 * a["frobenius"].value


def test_measure_restores_weights_and_flags_exactly():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).to(F64)
    model.train()
    x, y = classification_data(0, n=16)
    before = [p.detach().clone() for p in model.parameters()]
    m = universal_sharpness(model, nn.functional.cross_entropy, (x, y), "frobenius", rho=0.1, num_samples=5)
    assert math.isfinite(m.value) and m.settings["hessian"] == "zeroth_order"
    assert params_equal(list(model.parameters()), before) and model.training and model[1].training


def test_custom_measure_and_wrong_psi_shape():
    h = _spd(0)
    squared = SharpnessMeasure("squared_trace", phi=lambda s: s[0] ** 2, psi=lambda x: x,
                               sampler=sharpness.measures.GaussianSampler())
    m = universal_sharpness(_quadratic(h), measure=squared, hessian="dense", num_samples=100_000, seed=0)
    assert m.value == pytest.approx(float(h.trace()) ** 2, rel=0.02)
    bad = SharpnessMeasure("bad", phi=lambda s: s[0], psi=lambda x: torch.stack([x, x], 1),
                           sampler=sharpness.measures.GaussianSampler())
    with pytest.raises(ValueError, match=r"Invalid psi output: shape \(10, 2\).*expected \[10, 1\]"):
        universal_sharpness(_quadratic(h), measure=bad, num_samples=10)


@pytest.mark.parametrize("name, options", [("trace", {}), ("frobenius", {}), ("det", {"half_width": 0.3}),
                                           ("worst", {"q": 4}), ("worst", {"q": 6})])
def test_closed_form_derivatives_equal_autograd(name, options):
    """The presets' psi' and grad phi (used by the optimizers every step) against autograd on their psi and phi."""
    measure = sharpness_measure(name, **options)
    assert measure.psi_prime is not None and measure.phi_grad is not None
    by_autograd = dataclasses.replace(measure, psi_prime=None, phi_grad=None)
    x = torch.randn(7, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    if name == "worst":
        x = x.abs() + 0.1  # phi = s^(1/q) at s > 0
    for m in (2, 7):
        closed, reference = measure.psi_derivatives(x[:m]), by_autograd.psi_derivatives(x[:m])
        assert closed.shape == (m, measure.n)
        torch.testing.assert_close(closed, reference, rtol=1e-13, atol=0)
        s = measure.psi_values(x[:m]).mean(dim=0)
        torch.testing.assert_close(measure.phi_gradient(s, m), by_autograd.phi_gradient(s, m), rtol=1e-13, atol=0)
    bessel = sharpness_measure("frobenius")  # the Bessel factor m / (m - 1) is in the gradient, by hand:
    s = torch.tensor([5.0, 2.0], dtype=F64)
    torch.testing.assert_close(bessel.phi_gradient(s, 3), torch.tensor([0.5, -2.0], dtype=F64) * 1.5)


def test_closed_form_of_the_wrong_shape_is_refused():
    measure = dataclasses.replace(sharpness_measure("frobenius"), psi_prime=lambda x: x)
    with pytest.raises(ValueError, match=r"Invalid psi_prime output: shape \(3,\) for 3 inputs \(expected \[3, 2\]\)"):
        measure.psi_derivatives(torch.ones(3, dtype=F64))
    measure = dataclasses.replace(sharpness_measure("frobenius"), phi_grad=lambda s: s[:1])
    with pytest.raises(ValueError, match=r"Invalid phi_grad output: shape \(1,\) \(expected \(2,\)\)"):
        measure.phi_gradient(torch.ones(2, dtype=F64), 3)
    with pytest.raises(TypeError, match=r"Invalid psi_prime type: int \(expected a callable or None\)"):
        dataclasses.replace(sharpness_measure("trace"), psi_prime=1)


def test_frobenius_standard_error_is_the_delta_method_by_hand():
    """se of ``m/(m-1) phi(s)``: ``m/(m-1) std_i(phi'(s) . psi(x_i)) / sqrt(m)``, the Bessel factor once."""
    measure = sharpness_measure("frobenius")
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    m = 4
    psi = torch.stack([x * x, x], dim=1)
    s = psi.mean(dim=0)
    linear = psi @ torch.stack([torch.tensor(0.5, dtype=F64), -s[1]])
    value, stderr, _ = summarize(measure, x, dim=3)
    assert value == pytest.approx(m / (m - 1) * float(s[0] - s[1] ** 2) / 2, rel=1e-14)
    assert stderr == pytest.approx(m / (m - 1) * float(linear.std()) / math.sqrt(m), rel=1e-14)


# ---------------------------------------------------------------------------------------------- optimizers
def _loss_and_grad(model, x, y, weights):
    """``L(w)`` and ``grad L(w)`` at the flat parameters ``weights`` (independent of the optimizer)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w = weights.clone().requires_grad_(True)
    params, offset = {}, 0
    for name, shape in zip(names, shapes):
        params[name] = w[offset:offset + math.prod(shape)].view(shape)
        offset += math.prod(shape)
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    (grad,) = torch.autograd.grad(loss, w)
    return loss.detach(), grad


def _directions(model, seed, m, kind, a=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        parts = []
        for p in model.parameters():
            t = torch.empty_like(p)
            t.normal_(0.0, 1.0, generator=g) if kind == "gaussian" else t.uniform_(-a, a, generator=g)
            parts.append(t.reshape(-1))
        out.append(torch.cat(parts))
    return out


CASES = [  # (preset, options, scaling)
    ("tracesam", {"rho": 0.05, "lam": 0.7, "num_samples": 2}, "authors"),
    ("tracesam", {"rho": 0.05, "lam": 0.002, "num_samples": 2}, "paper"),
    ("tracesam", {"rho": 0.05, "lam": 0.4, "num_samples": 4}, "authors"),  # m - 1 > n: running sums
    ("frobsam", {"rho": 0.05, "lam": 0.2, "num_samples": 5}, "authors"),  # m - 1 > n: running sums
    ("frobsam", {"rho": 0.05, "lam": 0.3, "num_samples": 3}, "authors"),
    ("frobsam", {"rho": 0.05, "lam": 1e-4, "num_samples": 3}, "paper"),
    ("detsam", {"rho": 1.0, "half_width": 0.05, "lam": 0.5, "num_samples": 1}, "authors"),
    ("detsam", {"rho": 0.5, "half_width": 0.1, "lam": 0.01, "num_samples": 3}, "paper"),
]


@pytest.mark.parametrize("preset, options, scaling", CASES)
def test_one_step_equals_the_by_hand_formula(preset, options, scaling):
    model = mlp(0, width=5)
    x, y = classification_data(1, n=24)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rho, lam, m = options["rho"], options["lam"], options["num_samples"]
    kind = "uniform" if preset == "detsam" else "gaussian"
    ds = _directions(model, 123, m, kind, options.get("half_width"))
    loss0, g0 = _loss_and_grad(model, x, y, w)
    pairs = [_loss_and_grad(model, x, y, w + rho * d) for d in ds]
    losses = torch.stack([p[0] for p in pairs])
    grads = torch.stack([p[1] for p in pairs])
    c = 2.0 / rho ** 2 if scaling == "paper" else 1.0  # the chain-rule factor of x = kappa (L_i - L0) / rho^2
    kappa = 2.0 if scaling == "paper" else 1.0
    if preset == "tracesam":
        expected = g0 + lam * c * (grads - g0).mean(0)  # authors: (1 - lam) g0 + lam mean g_i
    elif preset == "frobsam":  # lam/2 * unbiased variance of x_i, differentiated: cross-covariance
        xs = kappa * (losses - loss0) / rho ** 2
        expected = g0 + lam * c / (m - 1) * ((xs - xs.mean())[:, None] * (grads - grads.mean(0))).sum(0)
    else:  # phi(s) = 1/s^2, s = mean exp(-x_i/2): G = g0 + lam c / (m s^3) sum exp(-x_i/2) (g_i - g0)
        xs = kappa * (losses - loss0) / rho ** 2
        s = torch.exp(-xs / 2).mean()
        expected = g0 + lam * c / (m * s ** 3) * (torch.exp(-xs / 2)[:, None] * (grads - g0)).sum(0)
        if m == 1 and scaling == "authors":  # the authors' one-sample form
            torch.testing.assert_close(expected, g0 + lam * torch.exp((losses[0] - loss0) / rho ** 2)
                                       * (grads[0] - g0), rtol=1e-12, atol=1e-14)
    opt = sharpness.create(preset, torch.optim.SGD(model.parameters(), lr=0.1), scaling=scaling, seed=123,
                           **options)
    counter = [0]
    returned = opt.step(make_closure(opt, model, x, y, counter))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after, w - 0.1 * expected, rtol=0, atol=1e-12)
    assert not torch.allclose(expected, g0, atol=1e-6)  # the correction is visible
    assert counter[0] == 1 + m and opt.grad_evals == 1 + m and opt.sam_steps == 1
    assert returned.item() == pytest.approx(loss0.item(), abs=1e-14)
    assert opt.last_quadratic_forms.shape == (m,)


def test_lam_zero_is_the_base_optimizer_with_one_pass():
    m1, m2 = mlp(0), mlp(0)
    x, y = classification_data(0)
    opt = sharpness.FrobSAM(torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), lam=0.0, num_samples=4)
    base = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    counter = [0]
    for _ in range(5):
        opt.step(make_closure(opt, m1, x, y, counter))
        base.zero_grad()
        nn.functional.cross_entropy(m2(x), y).backward()
        base.step()
    assert params_equal(m1, m2) and counter[0] == 5 and opt.grad_evals == 5 and opt.sam_steps == 0
    assert opt.min_grad_evals_per_step == opt.max_grad_evals_per_step == 1
    frob = sharpness.FrobSAM(torch.optim.SGD(m1.parameters(), lr=0.1), num_samples=4)
    assert (frob.min_grad_evals_per_step, frob.max_grad_evals_per_step) == (5, 5)
    info = sharpness.get_optimizer_info("frobsam")
    assert (info.min_grad_evals_per_step, info.max_grad_evals_per_step, info.neutral_options) == (3, 3, {"lam": 0.0})


def test_a_policy_skips_the_extra_passes():
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.FrobSAM(torch.optim.SGD(model.parameters(), lr=0.1), num_samples=2,
                            policy=sharpness.policies.Periodic(3))
    counter = [0]
    for _ in range(9):
        opt.step(make_closure(opt, model, x, y, counter))
    assert opt.sam_steps == 3 and counter[0] == opt.grad_evals == 9 + 2 * 3
    assert (opt.min_grad_evals_per_step, opt.max_grad_evals_per_step) == (1, 3)


@pytest.mark.parametrize("preset", ["tracesam", "frobsam", "detsam"])
def test_state_dict_carries_the_generator_and_continues_in_lockstep(preset):
    x, y = classification_data(3)
    model = mlp(0)
    opt = sharpness.create(preset, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), seed=9)
    for _ in range(3):
        opt.step(make_closure(opt, model, x, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    assert torch.equal(native(opt.state_dict())["sharpness"]["generator"], opt.generator.get_state())

    def resumed(load: bool):
        buffer.seek(0)  # a fresh copy per resumed run (loaded momentum buffers are not copied by torch)
        saved = torch.load(buffer, weights_only=True)
        model2 = mlp(1)
        model2.load_state_dict(saved["model"])
        opt2 = sharpness.create(preset, torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), seed=9)
        state = native(saved["opt"])
        if not load:  # same optimizer state but a fresh generator: the noise differs
            state["sharpness"] = {k: v for k, v in state["sharpness"].items() if k != "generator"}
        opt2.load_state_dict(state)
        return model2, opt2

    model2, opt2 = resumed(True)
    model3, opt3 = resumed(False)
    for _ in range(4):
        for o, mod in ((opt, model), (opt2, model2), (opt3, model3)):
            o.step(make_closure(o, mod, x, y))
    assert params_equal(model, model2) and torch.equal(opt.generator.get_state(), opt2.generator.get_state())
    assert not params_equal(model, model3)


def test_batchnorm_statistics_come_from_the_unperturbed_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(F64)
    reference = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(F64)
    reference.load_state_dict(model.state_dict())
    x, y = classification_data(0)
    opt = sharpness.FrobSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, num_samples=3, model=model)
    opt.step(make_closure(opt, model, x, y))
    reference(x)  # one training-mode forward at w
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 1


def test_clipping_and_repr():
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.TraceSAM(torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=1e-3, rho=0.1)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt.step(make_closure(opt, model, x, y))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-5)  # torch clips to max/(norm+1e-6)
    text = repr(opt)
    assert "TraceSAM" in text and "measure='trace'" in text and "lam=" in text and "SGD" in text


@pytest.mark.parametrize("poison_call", [1, 2, 3])
def test_grad_scaler_inf_in_any_perturbed_pass_skips_the_step(poison_call):
    """m = 3: an inf in any of the perturbed passes (checked once, after the m passes) skips the whole step."""
    model = mlp(0)
    x, y = classification_data(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = sharpness.FrobSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), num_samples=3,
                            grad_scaler=scaler)
    calls = [0]

    def closure(poison=None):
        index, calls[0] = calls[0], calls[0] + 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaled = scaler.scale(loss) * (math.inf if index == poison else 1.0)
        scaled.backward()
        return loss

    opt.step(closure)
    scaler.update()
    weights = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls[0] = 0
    opt.step(lambda: closure(poison_call))
    assert calls[0] == 4 and params_equal(list(model.parameters()), weights)
    assert params_equal([opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()], momentum)
    assert (opt.steps, opt.sam_steps, opt.skipped_steps, opt.grad_evals) == (1, 1, 1, 8)
    scale = scaler.get_scale()
    scaler.update()
    assert scaler.get_scale() == scale * 0.5


def test_overriding_psi_or_phi_drops_the_presets_closed_forms():
    """trace with psi(t) = 2t is trace with lam doubled (psi' = 2): the preset's psi' = 1 must not be used."""
    x, y = classification_data(0)
    after = []
    for options in ({"psi": lambda t: 2 * t, "lam": 0.3}, {"lam": 0.6},
                    {"phi": lambda s: 3 * s[0], "lam": 0.2}):
        model = mlp(0)
        opt = sharpness.UniversalSAM(torch.optim.SGD(model.parameters(), lr=0.5), measure="trace", rho=0.05,
                                     num_samples=2, seed=3, **options)
        assert (opt.measure.psi_prime is None) == ("psi" in options)
        assert (opt.measure.phi_grad is None) == ("phi" in options)
        opt.step(make_closure(opt, model, x, y))
        after.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(after[0], after[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(after[2], after[1], rtol=1e-6, atol=1e-7)


def test_universal_sam_with_a_custom_measure_and_the_two_phase_api():
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.UniversalSAM(torch.optim.SGD(model.parameters(), lr=0.2), measure="trace",
                                 psi=lambda t: t.square(), phi=lambda s: s[0].sqrt(), lam=1e-3, rho=0.05,
                                 num_samples=2)
    losses = [opt.step(make_closure(opt, model, x, y)).item() for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0] and opt.measure.name == "custom(trace)"
    with pytest.raises(RuntimeError, match="step\\(closure\\)"):
        opt.first_step()


BAD = [
    (lambda params: sharpness.FrobSAM(torch.optim.SGD(params, lr=0.1), num_samples=1), ValueError,
     r"Invalid num_samples value: 1 \(expected an integer num_samples >= 2\)"),
    (lambda params: sharpness.TraceSAM(torch.optim.SGD(params, lr=0.1), rho=0.0), ValueError,
     r"Invalid rho value: 0.0 \(expected rho > 0.*lam=0"),
    (lambda params: sharpness.TraceSAM(torch.optim.SGD(params, lr=0.1), rho=-0.1), ValueError,
     r"Invalid rho value: -0.1 \(expected rho > 0"),
    (lambda params: sharpness.DetSAM(torch.optim.SGD(params, lr=0.1), half_width=0.0), ValueError,
     r"Invalid half_width value: 0.0 \(expected half_width > 0"),
    (lambda params: sharpness.TraceSAM(torch.optim.SGD(params, lr=0.1), lam=-1.0), ValueError,
     r"Invalid lam value: -1.0 \(expected lam >= 0"),
    (lambda params: sharpness.TraceSAM(torch.optim.SGD(params, lr=0.1), scaling="both"), ValueError,
     r"Invalid scaling value: 'both' \(expected one of 'authors', 'paper'\)"),
    (lambda params: sharpness.TraceSAM(torch.optim.SGD(params, lr=0.1), reuse_alpha=0.5),
     ValueError, "does not support reuse_alpha"),
    (lambda params: sharpness.UniversalSAM(torch.optim.SGD(params, lr=0.1), measure="hessian"), ValueError,
     r"Invalid measure value: 'hessian' \(expected one of 'trace', 'frobenius', 'det', 'worst'\)"),
    (lambda params: universal_sharpness(ParameterFunction(lambda w: w.sum(), torch.zeros(2)), rho=0.0),
     ValueError, r"Invalid rho value: 0.0 \(expected rho > 0"),
    (lambda params: sharpness_measure("det", half_width=-1.0), ValueError, r"Invalid half_width value: -1.0"),
    (lambda params: sharpness_measure("worst", q=3), ValueError, r"Invalid q value: 3 \(expected an even"),
    (lambda params: sharpness.TraceSAM(torch.optim.SGD(params, lr=0.1), half_width=0.5), ValueError,
     r"Invalid half_width value: 0.5 \(half_width configures only measure='det', not measure='trace'\)"),
    (lambda params: sharpness.UniversalSAM(torch.optim.SGD(params, lr=0.1), measure="det", q=4), ValueError,
     r"Invalid q value: 4 \(q configures only measure='worst', not measure='det'\)"),
    (lambda params: universal_sharpness(ParameterFunction(lambda w: w.sum(), torch.zeros(2)), measure="frobenius",
                                        half_width=2.0), ValueError, r"half_width configures only measure='det'"),
    (lambda params: universal_sharpness(ParameterFunction(lambda w: w.sum(), torch.zeros(2)), measure="frobenius",
                                        num_samples=1), ValueError, r"num_samples >= 2"),
    (lambda params: SharpnessMeasure("x", phi=1.0, psi=lambda t: t, sampler=sharpness.measures.GaussianSampler()),
     TypeError, r"Invalid phi type: float \(expected a callable\)"),
]


@pytest.mark.parametrize("build, error, message", BAD)
def test_bad_input_gives_clear_errors(build, error, message):
    with pytest.raises(error, match=message):
        build(mlp(0).parameters())


def test_psi_of_the_wrong_shape_fails_before_any_weight_changes():
    model = mlp(0)
    x, y = classification_data(0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.UniversalSAM(torch.optim.SGD(model.parameters(), lr=0.1), psi=lambda t: t.reshape(1, 1, 1))
    with pytest.raises(ValueError, match="Invalid psi output"):
        opt.step(make_closure(opt, model, x, y))
    assert params_equal(list(model.parameters()), before)
