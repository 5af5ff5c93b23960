"""One step equals the by-hand formula, for every method and every branch.

The problem is a quadratic ``L(w) = 0.5 w^T A w + b^T w`` over two parameter tensors (a vector and a matrix,
flattened and concatenated), so the gradient ``A w + b`` is known in closed form. The references below are
written in NumPy from the papers' equations, independently of the library.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import sharpness

LR = 0.1
RHO = 0.2


class Quadratic(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        m = rng.normal(size=(7, 7))
        self.register_buffer("A", torch.tensor(m @ m.T / 7 + np.eye(7)))
        self.register_buffer("b", torch.tensor(rng.normal(size=7)))
        self.w1 = nn.Parameter(torch.tensor(rng.normal(size=3)))
        self.w2 = nn.Parameter(torch.tensor(rng.normal(size=(2, 2))))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.w1.reshape(-1), self.w2.reshape(-1)])

    def loss(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        w = self.flat()
        # A data-dependent shift of b emulates a new mini-batch at each step.
        b = self.b if shift is None else self.b + shift
        return 0.5 * w @ self.A @ w + b @ w


def numpy_problem(model: Quadratic):
    return model.A.numpy().copy(), model.b.numpy().copy(), model.flat().detach().numpy().copy()


def shifts(steps: int, scale: float = 1.0) -> list[torch.Tensor]:
    rng = np.random.default_rng(123)
    return [torch.tensor(scale * rng.normal(size=7)) for _ in range(steps)]


def run(opt: torch.optim.Optimizer, model: Quadratic, batch_shifts: list[torch.Tensor]) -> list[int]:
    calls = []
    for shift in batch_shifts:
        counter = [0]

        def closure(shift=shift, counter=counter):
            counter[0] += 1
            opt.zero_grad()
            loss = model.loss(shift)
            loss.backward()
            return loss

        opt.step(closure)
        calls.append(counter[0])
    return calls


def grad(A, b, w):
    return A @ w + b


def sam_grad(A, b, w, rho):
    g = grad(A, b, w)
    e = rho * g / (np.linalg.norm(g) + 1e-12)
    return g, grad(A, b, w + e)


def orthogonal_part(g, gs):
    return gs - (g @ gs) / (g @ g) * g


class AdaptiveReference:
    """AE-SAM's policy written out from the paper (eqs. 4-5 and the c_t schedule)."""

    def __init__(self, total, lambda1, lambda2, delta=0.9):
        self.total, self.l1, self.l2, self.delta = total, lambda1, lambda2, delta
        self.mu, self.var = 0.0, math.exp(-10)

    def decide(self, t, s):
        self.mu = self.delta * self.mu + (1 - self.delta) * s
        self.var = self.delta * self.var + (1 - self.delta) * (s - self.mu) ** 2
        c = t / self.total * self.l1 + (1 - t / self.total) * self.l2
        return s >= self.mu + c * math.sqrt(self.var)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR)


def test_sam_one_step_equals_formula():
    model = Quadratic()
    A, b, w = numpy_problem(model)
    opt = sharpness.SAM(sgd(model), rho=RHO)
    (calls,) = run(opt, model, [torch.zeros(7)])
    _, gs = sam_grad(A, b, w, RHO)
    np.testing.assert_allclose(model.flat().detach().numpy(), w - LR * gs, rtol=0, atol=1e-12)
    assert calls == 2 and opt.grad_evals == 2 and opt.sam_steps == 1


def test_sam_with_a_tensor_valued_rho_equals_formula():
    """A group's rho may be a 0-d tensor (scheduled like a tensor lr); the climb takes it without a host read."""
    model = Quadratic()
    A, b, w = numpy_problem(model)
    opt = sharpness.SAM(sgd(model), rho=RHO)
    opt.param_groups[0]["rho"] = torch.tensor(RHO, dtype=torch.float64)
    run(opt, model, [torch.zeros(7)])
    _, gs = sam_grad(A, b, w, RHO)
    np.testing.assert_allclose(model.flat().detach().numpy(), w - LR * gs, rtol=0, atol=1e-12)


def test_sam_returns_loss_at_unperturbed_weights():
    model = Quadratic()
    A, b, w = numpy_problem(model)
    opt = sharpness.SAM(sgd(model), rho=RHO)

    def closure():
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(0.5 * w @ A @ w + b @ w, abs=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.01, 0.5])
def test_asam_one_step_equals_formula(eta):
    model = Quadratic()
    A, b, w = numpy_problem(model)
    opt = sharpness.ASAM(sgd(model), rho=RHO, eta=eta)
    run(opt, model, [torch.zeros(7)])
    g = grad(A, b, w)
    t = np.abs(w) + eta
    e = RHO * t**2 * g / (np.linalg.norm(t * g) + 1e-12)
    np.testing.assert_allclose(model.flat().detach().numpy(), w - LR * grad(A, b, w + e), rtol=0, atol=1e-12)


def test_asam_adaptive_1d_false_uses_unit_scale_for_vectors():
    model = Quadratic()
    A, b, w = numpy_problem(model)
    opt = sharpness.ASAM(sgd(model), rho=RHO, eta=0.01, adaptive_1d=False)
    run(opt, model, [torch.zeros(7)])
    g = grad(A, b, w)
    t = np.abs(w) + 0.01
    t[:3] = 1.0  # w1 is one-dimensional
    e = RHO * t**2 * g / np.linalg.norm(t * g)
    np.testing.assert_allclose(model.flat().detach().numpy(), w - LR * grad(A, b, w + e), rtol=0, atol=1e-12)


def test_looksam_sam_and_reuse_branches():
    k, alpha = 3, 0.6
    model = Quadratic()
    A, b, w = numpy_problem(model)
    opt = sharpness.LookSAM(sgd(model), rho=RHO, k=k, alpha=alpha)
    batch = shifts(7)
    calls = run(opt, model, batch)
    g_v = None
    for t, shift in enumerate(batch):
        bt = b + shift.numpy()
        if t % k == 0:
            g, gs = sam_grad(A, bt, w, RHO)
            g_v = orthogonal_part(g, gs)
            w = w - LR * gs
        else:
            g = grad(A, bt, w)
            w = w - LR * (g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v)
    np.testing.assert_allclose(model.flat().detach().numpy(), w, rtol=0, atol=1e-11)
    assert calls == [2, 1, 1, 2, 1, 1, 2]  # reuse steps really skip the second pass
    assert opt.sam_steps == 3 and opt.steps == 7 and opt.grad_evals == 10


def test_looksam_parameter_missing_from_the_perturbed_pass_stores_no_direction():
    """g is kept in g_v's buffer during a SAM step: a parameter with a gradient in pass 1 but none in pass 2
    (a branch the perturbed pass skips) must end with g_v = 0 there, not with its clean gradient."""
    torch.manual_seed(0)
    used, skipped = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt = sharpness.LookSAM(torch.optim.SGD([*used.parameters(), *skipped.parameters()], lr=0.1), rho=0.1, k=2)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        out = used(x) + (skipped(x) if calls[0] % 2 == 1 else 0.0)  # pass 2 of a SAM step skips `skipped`
        loss = torch.nn.functional.mse_loss(out, y)
        loss.backward()
        return loss

    opt.step(closure)  # t = 0: a SAM step
    assert opt.sam_steps == 1
    for q in skipped.parameters():
        assert torch.count_nonzero(opt.state[q]["reuse_direction"]) == 0
    assert any(torch.count_nonzero(opt.state[q]["reuse_direction"]) > 0 for q in used.parameters())


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_sssam_branches_follow_seeded_bernoulli(p):
    model = Quadratic()
    A, b, w = numpy_problem(model)
    opt = sharpness.SSSAM(sgd(model), rho=RHO, p=p, seed=7)
    batch = shifts(10)
    calls = run(opt, model, batch)
    gen = torch.Generator().manual_seed(7)
    expected_calls = []
    for shift in batch:
        bt = b + shift.numpy()
        if torch.rand((), generator=gen).item() < p:
            _, gs = sam_grad(A, bt, w, RHO)
            w = w - LR * gs
            expected_calls.append(2)
        else:
            w = w - LR * grad(A, bt, w)
            expected_calls.append(1)
    np.testing.assert_allclose(model.flat().detach().numpy(), w, rtol=0, atol=1e-11)
    assert calls == expected_calls
    assert opt.grad_evals == sum(expected_calls) == opt.steps + opt.sam_steps


def _adaptive_trajectory(model, opt, lambda1, lambda2, total, alpha=None):
    A, b, w = numpy_problem(model)
    batch = shifts(total, scale=3.0)
    calls = run(opt, model, batch)
    ref = AdaptiveReference(total, lambda1, lambda2)
    g_v, expected_calls = None, []
    for t, shift in enumerate(batch):
        bt = b + shift.numpy()
        g = grad(A, bt, w)
        if ref.decide(t, float(g @ g)):
            _, gs = sam_grad(A, bt, w, RHO)
            if alpha is not None:
                g_v = orthogonal_part(g, gs)
            w = w - LR * gs
            expected_calls.append(2)
        else:
            step = g
            if alpha is not None and g_v is not None:
                step = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
            w = w - LR * step
            expected_calls.append(1)
    return w, calls, expected_calls, ref


def test_aesam_matches_algorithm_1_both_branches():
    total = 30
    model = Quadratic()
    opt = sharpness.AESAM(sgd(model), rho=RHO, total_steps=total)
    w, calls, expected, ref = _adaptive_trajectory(model, opt, -1.0, 1.0, total)
    assert 1 in expected and 2 in expected  # both branches exercised
    assert calls == expected
    np.testing.assert_allclose(model.flat().detach().numpy(), w, rtol=0, atol=1e-10)
    assert opt.policy.mean == pytest.approx(ref.mu, rel=1e-12)
    assert opt.policy.var == pytest.approx(ref.var, rel=1e-12)
    assert opt.grad_evals == opt.steps + opt.sam_steps == sum(expected)


def test_aelooksam_matches_algorithm_1_both_branches():
    total, alpha = 30, 0.5
    model = Quadratic()
    opt = sharpness.AELookSAM(sgd(model), rho=RHO, total_steps=total, alpha=alpha)
    w, calls, expected, _ = _adaptive_trajectory(model, opt, 0.0, 2.0, total, alpha=alpha)
    assert 1 in expected and 2 in expected
    assert calls == expected
    np.testing.assert_allclose(model.flat().detach().numpy(), w, rtol=0, atol=1e-10)


def test_adaptive_threshold_schedule_is_linear_then_constant():
    policy = sharpness.policies.Adaptive(total_steps=10, lambda1=-1.0, lambda2=3.0)
    assert policy.threshold_coefficient(0) == 3.0
    assert policy.threshold_coefficient(5) == pytest.approx(1.0)
    assert policy.threshold_coefficient(10) == -1.0
    assert policy.threshold_coefficient(50) == -1.0


def test_two_phase_api_equals_closure_api():
    m1, m2 = Quadratic(), Quadratic()
    o1 = sharpness.SAM(sgd(m1), rho=RHO)
    o2 = sharpness.SAM(sgd(m2), rho=RHO)
    run(o1, m1, [torch.zeros(7)] * 3)
    for _ in range(3):
        m2.loss().backward()
        assert o2.first_step(zero_grad=True) is True
        m2.loss().backward()
        o2.second_step(zero_grad=True)
    assert torch.equal(m1.flat(), m2.flat())
    assert o1.grad_evals == o2.grad_evals == 6


def test_zero_gradient_gives_no_perturbation_and_no_nan():
    model = Quadratic()
    with torch.no_grad():
        # At w = 0 with b = 0 the gradient A w + b is exactly zero.
        model.b.zero_()
        model.w1.zero_()
        model.w2.zero_()
    for cls in (sharpness.SAM, sharpness.ASAM, sharpness.LookSAM):
        opt = cls(sgd(model), rho=RHO)
        run(opt, model, [torch.zeros(7)] * 2)
        assert torch.equal(model.flat(), torch.zeros(7, dtype=torch.float64))


def test_frozen_and_gradless_parameters_are_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    unused = nn.Parameter(torch.randn(5, dtype=torch.float64))
    net[0].weight.requires_grad_(False)
    frozen_before = net[0].weight.detach().clone()
    unused_before = unused.detach().clone()
    opt = sharpness.SAM(torch.optim.SGD(list(net.parameters()) + [unused], lr=0.1), rho=0.5)
    x = torch.randn(8, 3, dtype=torch.float64)
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            return loss
        opt.step(closure)
    assert torch.equal(net[0].weight, frozen_before)
    assert torch.equal(unused, unused_before)
    assert all(torch.isfinite(p).all() for p in net.parameters())
