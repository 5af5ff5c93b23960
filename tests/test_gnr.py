"""GNR (gradient norm regularizer): HVPs against a dense Hessian, one step against the by-hand formula of
Algorithm 1, neutrality (alpha=0 is the oracle optimizer bit for bit), pass counts and bad input.

References are computed independently of the optimizer: closed-form gradient and Hessian of a quadratic in
NumPy, and ``torch.func.grad`` / ``torch.func.hessian`` of a functional MLP in float64.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import sharpness
from helpers import checkpoint_round_trip, classification_data, make_closure, mlp, native, params_equal

LR, RHO, ALPHA, XI = 0.1, 0.2, 0.3, 1e-12


class Quadratic(nn.Module):
    """``L(w) = 0.5 w^T A w - b^T w`` over two tensors (a vector and a matrix): ``g = A w - b``, ``H = A``."""

    def __init__(self, seed: int = 0, zero: bool = False) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        m = rng.normal(size=(7, 7))
        self.A = m @ m.T / 7 + np.diag(np.linspace(0.5, 3.0, 7))
        self.b = np.zeros(7) if zero else rng.normal(size=7)
        self.w1 = nn.Parameter(torch.zeros(3, dtype=torch.float64) if zero else torch.tensor(rng.normal(size=3)))
        self.w2 = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64) if zero else torch.tensor(rng.normal(size=(2, 2))))

    def flat(self) -> np.ndarray:
        return np.concatenate([self.w1.detach().numpy().ravel(), self.w2.detach().numpy().ravel()])

    def loss(self) -> torch.Tensor:
        w = torch.cat([self.w1.reshape(-1), self.w2.reshape(-1)])
        A, b = torch.tensor(self.A), torch.tensor(self.b)
        return 0.5 * w @ A @ w - b @ w


def quadratic_closure(opt, model, counter=None):
    def compute_loss(reduction):
        if counter is not None:
            counter[0] += 1
        return model.loss()

    return sharpness.make_closure(opt, compute_loss)


def gnr_direction_np(A, b, w, rho, xi=XI):
    """Algorithm 1, lines 6-8, for the quadratic: returns h_norm (with the rho factor)."""
    g = A @ w - b
    f = A @ g / (np.linalg.norm(g) + xi)
    w_adv = w + rho * f / (np.linalg.norm(f) + xi)
    g_adv = A @ w_adv - b
    return rho * A @ g_adv / (np.linalg.norm(g_adv) + xi)


# ---------------------------------------------------------------------------------------------- HVPs
def _mlp_setup(seed=0):
    model = mlp(seed)
    x, y = classification_data(seed, n=32)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def flat_loss(w):
        chunks = torch.split(w, sizes)
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return model, x, y, flat_loss, w0


def _hvp_of(opt, model, x, y):
    """Run GNR's own normalized HVP at the current weights: H g / (||g|| + xi), flattened."""
    closure = make_closure(opt, model, x, y)
    with torch.no_grad():
        opt._evaluate(closure)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    vector = [g.detach() for g in grads]
    norm = sharpness._foreach.squared_norm(vector).sqrt()
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        out = opt._normalized_hvp(closure, params, grads, vector, norm, backup)
    assert params_equal(params, backup)  # weights restored exactly
    return torch.cat([o.reshape(-1) for o in out])


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_hvp_matches_dense_hessian(hvp):
    model, x, y, flat_loss, w0 = _mlp_setup()
    H = torch.func.hessian(flat_loss)(w0)
    g = torch.func.grad(flat_loss)(w0)
    expected = H @ g / (g.norm() + XI)
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=LR), hvp=hvp, fd_radius=1e-6)
    got = _hvp_of(opt, model, x, y)
    tol = 1e-12 if hvp == "exact" else 1e-5
    torch.testing.assert_close(got, expected, rtol=0, atol=tol * expected.norm().item())
    assert opt.grad_evals == 2  # one closure + one double backward, or two closures
    if hvp == "exact":
        assert all(not p.grad.requires_grad for p in model.parameters())  # graph released


def test_finite_difference_converges_to_exact_at_order_r():
    model, x, y, _, _ = _mlp_setup(1)
    exact = _hvp_of(sharpness.GNR(torch.optim.SGD(model.parameters(), lr=LR)), model, x, y)
    errors = []
    for r in (1e-1, 1e-2, 1e-3, 1e-4):
        opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=LR), hvp="finite_difference", fd_radius=r)
        errors.append((_hvp_of(opt, model, x, y) - exact).norm().item())
    for coarse, fine in itertools.pairwise(errors):
        assert 0.05 < fine / coarse < 0.2  # first order: ten times smaller r, about ten times smaller error


# ---------------------------------------------------------------------------------------------- one step
@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
@pytest.mark.parametrize("oracle", ["sgd", "sam"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_one_step_on_a_quadratic_equals_algorithm_1(hvp, oracle, set_to_none):
    """``set_to_none=False``: a closure that zeroes the gradients in place. (The finite-difference HVP at
    ``w_adv`` used to keep ``g(w_adv)`` in the gradient buffers, which that closure then overwrote with
    ``g(w_adv + r u)``: the regularizer came out exactly 0, the plain oracle step.)"""
    model = Quadratic()
    A, b, w = model.A, model.b, model.flat()
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, alpha=ALPHA, hvp=hvp, oracle=oracle,
                        oracle_rho=0.05)

    def in_place_closure():
        opt.zero_grad(set_to_none=False)
        loss = model.loss()
        loss.backward(create_graph=opt.needs_graph)
        return loss

    loss = opt.step(quadratic_closure(opt, model) if set_to_none else in_place_closure)
    g = A @ w - b
    h_loss = g if oracle == "sgd" else A @ (w + 0.05 * g / (np.linalg.norm(g) + 1e-12)) - b
    expected = w - LR * (h_loss + ALPHA * gnr_direction_np(A, b, w, RHO))
    np.testing.assert_allclose(model.flat(), expected, rtol=0, atol=1e-12 if hvp == "exact" else 1e-9)
    assert loss.item() == pytest.approx(0.5 * w @ A @ w - b @ w, rel=1e-14)
    assert opt.gnr_steps == 1 and opt.steps == 1


def test_per_group_rho_on_a_quadratic():
    """Each group climbs to w_adv with its own rho and weights its h_norm by it; norms are global."""
    model = Quadratic(3)
    A, b, w = model.A, model.b, model.flat()
    opt = sharpness.GNR(torch.optim.SGD([{"params": [model.w1], "rho": 0.5}, {"params": [model.w2]}], lr=LR),
                        rho=RHO, alpha=ALPHA)
    opt.step(quadratic_closure(opt, model))
    rho = np.array([0.5] * 3 + [RHO] * 4)
    g = A @ w - b
    f = A @ g / (np.linalg.norm(g) + XI)
    w_adv = w + rho * f / (np.linalg.norm(f) + XI)
    g_adv = A @ w_adv - b
    expected = w - LR * (g + ALPHA * rho * (A @ g_adv) / (np.linalg.norm(g_adv) + XI))
    np.testing.assert_allclose(model.flat(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_one_step_on_an_mlp_equals_algorithm_1(hvp):
    """Non-quadratic: the reference uses torch.func's dense Hessian at w and at w_adv (float64)."""
    model, x, y, flat_loss, w = _mlp_setup(2)
    grad, hess = torch.func.grad(flat_loss), torch.func.hessian(flat_loss)
    g = grad(w)
    f = hess(w) @ g / (g.norm() + XI)
    w_adv = w + RHO * f / (f.norm() + XI)
    g_adv = grad(w_adv)
    h_norm = RHO * hess(w_adv) @ g_adv / (g_adv.norm() + XI)
    expected = w - LR * (g + ALPHA * h_norm)

    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, alpha=ALPHA, hvp=hvp,
                        fd_radius=1e-6)
    opt.step(make_closure(opt, model, x, y))
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # FD: O(r) error in each HVP, amplified by the normalization of f (1e-6 r => about 1e-7 after lr*alpha)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13 if hvp == "exact" else 1e-6)
    assert not torch.allclose(got, w - LR * g, atol=1e-6)  # the regularizer really moved the step


def test_adamw_base_gets_the_combined_gradient():
    """AdamW+GNR = AdamW fed with g + alpha h_norm (moments and decoupled weight decay act on the sum)."""
    model, x, y, flat_loss, w = _mlp_setup(4)
    ref_model = mlp(4)
    make_base = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    opt = sharpness.GNR(make_base(model.parameters()), rho=RHO, alpha=ALPHA)
    ref = make_base(ref_model.parameters())
    grad, hess = torch.func.grad(flat_loss), torch.func.hessian(flat_loss)
    sizes = [p.numel() for p in model.parameters()]
    for _ in range(3):
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        g = grad(w)
        f = hess(w) @ g / (g.norm() + XI)
        w_adv = w + RHO * f / (f.norm() + XI)
        g_adv = grad(w_adv)
        total = g + ALPHA * RHO * hess(w_adv) @ g_adv / (g_adv.norm() + XI)
        for p, chunk in zip(ref_model.parameters(), torch.split(total, sizes)):
            p.grad = chunk.reshape(p.shape).clone()
        ref.step()
        opt.step(make_closure(opt, model, x, y))
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- neutrality
@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
def test_alpha_zero_is_the_base_optimizer_exactly_at_its_cost(hvp, base_name):
    make_base = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
                 "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2)}[base_name]
    m_ours, m_base = mlp(0), mlp(0)
    x, y = classification_data(0)
    ours = sharpness.GNR(make_base(m_ours.parameters()), alpha=0.0, hvp=hvp)
    assert ours.needs_graph is False
    base = make_base(m_base.parameters())
    calls = [0]
    for _ in range(5):
        ours.step(make_closure(ours, m_ours, x, y, calls))
        base.zero_grad()
        nn.functional.cross_entropy(m_base(x), y).backward()
        base.step()
    assert params_equal(m_ours, m_base)
    assert ours.grad_evals == calls[0] == 5 and ours.gnr_steps == 0


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_sam_oracle_with_alpha_zero_is_sam_bit_for_bit(hvp):
    m_ours, m_sam = mlp(1), mlp(1)
    x, y = classification_data(1)
    make_base = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    ours = sharpness.GNR(make_base(m_ours.parameters()), alpha=0.0, oracle="sam", oracle_rho=0.05, hvp=hvp)
    sam = sharpness.SAM(make_base(m_sam.parameters()), rho=0.05)
    for _ in range(5):
        ours.step(make_closure(ours, m_ours, x, y))
        sam.step(make_closure(sam, m_sam, x, y))
    assert params_equal(m_ours, m_sam)
    assert ours.grad_evals == sam.grad_evals == 10


# ---------------------------------------------------------------------------------------------- passes
@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
@pytest.mark.parametrize("oracle", ["sgd", "sam"])
@pytest.mark.parametrize("every", [1, 3])
def test_grad_evals_per_step(hvp, oracle, every):
    """GNR step: o + 3 evaluations (exact: o + 1 closure calls + 2 double backwards); other steps: o."""
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1), hvp=hvp, oracle=oracle, every=every)
    o = 1 if oracle == "sgd" else 2
    calls = [0]
    for t in range(6):
        before_evals, before_calls = opt.grad_evals, calls[0]
        opt.step(make_closure(opt, model, x, y, calls))
        gnr = t % every == 0
        assert opt.grad_evals - before_evals == (o + 3 if gnr else o)
        closure_calls = o + 1 if (gnr and hvp == "exact") else opt.grad_evals - before_evals
        assert calls[0] - before_calls == closure_calls
    assert opt.gnr_steps == opt.sam_steps == 6 // every
    assert opt.grad_evals == opt.steps * opt.oracle_grad_evals + opt.gnr_steps * opt.extra_grad_evals
    assert opt.sam_fraction == pytest.approx(1 / every)


def test_any_policy_instance_chooses_the_gnr_steps():
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1), every=sharpness.policies.Bernoulli(0.3, seed=1))
    for _ in range(20):
        opt.step(make_closure(opt, model, x, y))
    assert 0 < opt.gnr_steps < 20
    assert opt.grad_evals == 20 + 3 * opt.gnr_steps


# ---------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_state_dict_lockstep_with_policy_state(hvp):
    x, y = classification_data(3)
    make = lambda m: sharpness.GNR(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), hvp=hvp,
                                   oracle="sam", every=sharpness.policies.Bernoulli(0.5, seed=2))
    model = mlp(0)
    opt = make(model)
    for _ in range(5):
        opt.step(make_closure(opt, model, x, y))
    saved = checkpoint_round_trip(model, opt)
    model2 = mlp(7)
    model2.load_state_dict(saved["model"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["opt"])
    for _ in range(6):
        opt.step(make_closure(opt, model, x, y))
        opt2.step(make_closure(opt2, model2, x, y))
    assert params_equal(model, model2)
    assert (opt.steps, opt.gnr_steps, opt.grad_evals) == (opt2.steps, opt2.gnr_steps, opt2.grad_evals)
    assert native(opt.state_dict())["sharpness"]["counters"] == native(opt2.state_dict())["sharpness"]["counters"]


def test_rho_is_read_from_the_param_group_each_step():
    """A rho schedule (Theorem 2.3: rho_0 / sqrt(t)) is a plain write to group["rho"]."""
    model = Quadratic(5)
    A, b = model.A, model.b
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, alpha=ALPHA)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / np.sqrt(t + 1))
    for t in range(3):
        rho_t = RHO / np.sqrt(t + 1)
        for group in opt.param_groups:
            group["rho"] = rho_t
        w, lr_t = model.flat(), opt.param_groups[0]["lr"]
        opt.step(quadratic_closure(opt, model))
        sched.step()
        expected = w - lr_t * (A @ w - b + ALPHA * gnr_direction_np(A, b, w, rho_t))
        np.testing.assert_allclose(model.flat(), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
@pytest.mark.parametrize("oracle", ["sgd", "sam"])
def test_zero_gradient_gives_no_nan(hvp, oracle):
    model = Quadratic(zero=True)  # w = 0, b = 0: g = 0 exactly, f = 0, w_adv = w
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), hvp=hvp, oracle=oracle)
    for _ in range(2):
        opt.step(quadratic_closure(opt, model))
    for p in model.parameters():
        assert torch.isfinite(p).all() and torch.equal(p.detach(), torch.zeros_like(p))
    assert opt.gnr_steps == 2


def test_batchnorm_statistics_come_from_the_first_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    reference = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    reference.load_state_dict(model.state_dict())
    x, y = classification_data(0)
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1), oracle="sam", model=model)
    opt.step(make_closure(opt, model, x, y))
    reference(x)  # one training-mode forward pass at w
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(reference[1], name))


def test_exact_mode_flags_and_graph_release():
    model = mlp(0)
    x, y = classification_data(0)
    assert sharpness.GNR.needs_graph is True and sharpness.get_optimizer_info("gnr").needs_graph is True
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1))
    assert opt.needs_graph is True
    assert sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1), hvp="finite_difference").needs_graph is False
    loss = opt.step(make_closure(opt, model, x, y))
    assert all(p.grad.grad_fn is None and not p.grad.requires_grad for p in model.parameters())
    assert loss.grad_fn is None  # the returned loss does not pin the forward graph either


def test_clipping_applies_to_the_combined_gradient():
    model = Quadratic(6)
    w = model.flat()
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, alpha=ALPHA, max_grad_norm=0.01)
    opt.step(quadratic_closure(opt, model))
    total = model.A @ w - model.b + ALPHA * gnr_direction_np(model.A, model.b, w, RHO)
    expected = w - LR * total * 0.01 / (np.linalg.norm(total) + 1e-6)
    np.testing.assert_allclose(model.flat(), expected, rtol=0, atol=1e-12)


BAD = [
    ({"rho": 0.0}, ValueError, "rho"),
    ({"rho": -0.1}, ValueError, "rho"),
    ({"alpha": -0.1}, ValueError, "alpha"),
    ({"xi": 0.0}, ValueError, "xi"),
    ({"xi": -1e-12}, ValueError, "xi"),
    ({"every": 0}, ValueError, "every"),
    ({"every": 0.1}, TypeError, "every"),
    ({"hvp": "lanczos"}, ValueError, "hvp"),
    ({"oracle": "adam"}, ValueError, "oracle"),
    ({"oracle": 3}, TypeError, "oracle"),
    ({"oracle_rho": -1.0}, ValueError, "oracle_rho"),
    ({"fd_radius": 0.0}, ValueError, "fd_radius"),
    ({"grad_scaler": torch.amp.GradScaler("cpu")}, ValueError, "grad_scaler"),
]


@pytest.mark.parametrize(("kwargs", "error", "word"), BAD)
def test_bad_input_is_a_clear_error(kwargs, error, word):
    model = mlp(0)
    with pytest.raises(error, match=word):
        sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_misuse_is_a_clear_error():
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.GNR(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": model[2].parameters(), "rho": 0.0})
    with pytest.raises(NotImplementedError, match="step\\(closure\\)"):
        opt.first_step()
    with pytest.raises(TypeError, match="closure"):
        opt.step()

    def plain_closure():  # exact mode needs create_graph; a plain closure is refused, weights untouched
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step(plain_closure)
    assert params_equal(list(model.parameters()), before)
