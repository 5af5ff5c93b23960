"""Entropy-SGD / Entropy-Adam against the update equations of Chaudhari et al. (Algorithm 1) written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpness
from helpers import classification_data, make_closure, mlp

A = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
B = torch.tensor([0.4, -0.2], dtype=torch.float64)


def quad(w):
    return 0.5 * w @ A @ w + B @ w


def quad_grad(w):
    return A @ w + B


def closure_for(opt, param, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = quad(param)
        loss.backward()
        return loss

    return closure


def by_hand_direction(x, t, *, L, eta, eps, gamma0, growth, alpha, scale, gen):
    """Algorithm 1: L SGLD steps tethered to x, running mean mu; returns the outer gradient."""
    gamma = gamma0 * growth ** t
    xp, mu = x.clone(), x.clone()
    for _ in range(L):
        drift = quad_grad(xp) + gamma * (xp - x)
        xp = xp - eta * drift + (eta ** 0.5) * eps * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        mu = (1 - alpha) * mu + alpha * xp
    return (gamma if scale else 1.0) * (x - mu)


@pytest.mark.parametrize("scale", [False, True])
def test_entropy_sgd_steps_equal_algorithm_1_by_hand(scale):
    settings = {"L": 3, "eta": 0.1, "eps": 1e-2, "gamma0": 0.03, "growth": 1.5, "alpha": 0.25, "scale": scale}
    x = torch.tensor([1.0, -1.5], dtype=torch.float64)
    param = nn.Parameter(x.clone())
    opt = sharpness.EntropySGD(torch.optim.SGD([param], lr=0.5, momentum=0.9), langevin_steps=3, sgld_lr=0.1,
                               noise=1e-2, gamma=0.03, gamma_growth=1.5, alpha=0.25, scale_by_gamma=scale, seed=7)
    gen = torch.Generator().manual_seed(7)
    buf = torch.zeros(2, dtype=torch.float64)
    for t in range(3):
        loss = opt.step(closure_for(opt, param))
        assert float(loss) == pytest.approx(float(quad(x)), rel=1e-14)  # the loss at x is returned
        grad = by_hand_direction(x, t, gen=gen, **settings)
        buf = 0.9 * buf + grad if t else grad.clone()  # torch SGD momentum
        x = x - 0.5 * buf
        torch.testing.assert_close(param.detach(), x, rtol=0, atol=1e-13)
    assert opt.scope == pytest.approx(0.03 * 1.5 ** 3)


def test_entropy_adam_is_adam_on_the_local_entropy_gradient():
    x = torch.tensor([0.5, 2.0], dtype=torch.float64)
    param = nn.Parameter(x.clone())
    opt = sharpness.EntropySGD(torch.optim.Adam([param], lr=0.01), noise=1e-3, seed=3)
    reference = nn.Parameter(x.clone())
    adam = torch.optim.Adam([reference], lr=0.01)
    gen = torch.Generator().manual_seed(3)
    for t in range(3):
        opt.step(closure_for(opt, param))
        reference.grad = by_hand_direction(reference.detach().clone(), t, L=5, eta=0.1, eps=1e-3, gamma0=0.03,
                                           growth=1.001, alpha=0.25, scale=False, gen=gen)
        adam.step()
        torch.testing.assert_close(param.detach(), reference.detach(), rtol=0, atol=1e-13)


def test_one_noiseless_langevin_step_with_alpha_one_is_sgd_with_lr_times_sgld_lr():
    """L = 1, eps = 0, alpha = 1: x - mu = eta' grad f(x), the authors' reduction to SGD."""
    x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    param = nn.Parameter(x.clone())
    opt = sharpness.EntropySGD(torch.optim.SGD([param], lr=2.0), langevin_steps=1, noise=0.0, alpha=1.0, sgld_lr=0.1)
    opt.step(closure_for(opt, param))
    torch.testing.assert_close(param.detach(), x - 2.0 * 0.1 * quad_grad(x), rtol=0, atol=1e-14)


def test_grad_evals_equal_closure_calls_and_noise_follows_the_seed():
    counter = [0]
    runs = []
    for seed in (1, 1, 2):
        param = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
        opt = sharpness.EntropySGD(torch.optim.SGD([param], lr=0.5), langevin_steps=4, seed=seed)
        for _ in range(3):
            opt.step(closure_for(opt, param, counter))
        assert opt.grad_evals == 12 and opt.steps == 3
        runs.append(param.detach().clone())
    assert counter[0] == 36
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_langevin_passes_leave_batchnorm_statistics_of_the_training_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = classification_data(0)
    opt = sharpness.EntropySGD(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    bn = model[1]
    expected_mean = 0.9 * bn.running_mean + 0.1 * model[0](x).detach().mean(0)
    opt.step(make_closure(opt, model, x, y))
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=0, atol=1e-12)


def test_salr_wraps_entropy_sgd():
    model = mlp(0)
    x, y = classification_data(0)
    inner = sharpness.EntropySGD(torch.optim.SGD(model.parameters(), lr=0.2), seed=0)
    opt = sharpness.SALR(inner, every=1, n_descent=2, n_ascent=2)
    losses = [float(opt.step(make_closure(opt, model, x, y))) for _ in range(20)]
    assert losses[-1] < losses[0]
    # 5 Langevin passes + the walks' 2 extra gradients per step; the 2 endpoint losses are forward-only
    assert opt.grad_evals == 20 * (5 + 2) and opt.loss_evals == 20 * 2 and inner.steps == 20
    assert len(opt.sharpness_history) == 20


@pytest.mark.parametrize("kwargs,match", [
    ({"langevin_steps": -1}, "langevin_steps"),
    ({"sgld_lr": 0.0}, "sgld_lr"),
    ({"noise": -1e-4}, "noise"),
    ({"gamma": 0.0}, "gamma"),
    ({"gamma_growth": 0.99}, "gamma_growth"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": 0.0}, "alpha"),
    ({"seed": -1}, "seed"),
    ({"gamma_max": 0.0}, "gamma_max"),
    ({"gamma": 0.1, "gamma_max": 0.05}, r"gamma_max value: 0.05 \(expected gamma_max >= gamma = 0.1\)"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharpness.EntropySGD(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), **kwargs)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sharpness.EntropySGD([nn.Parameter(torch.zeros(2))])


def test_gamma_max_caps_the_scope_and_the_steps_follow_it():
    """With gamma_max the scope is min(gamma * growth**t, gamma_max), and the step is Algorithm 1's at that
    capped gamma; without it the paper's schedule overflows with a clear error instead of a bare OverflowError."""
    settings = {"L": 3, "eta": 0.1, "eps": 1e-2, "gamma0": 0.03, "growth": 1.5, "alpha": 0.25, "scale": True}
    x = torch.tensor([1.0, -1.5], dtype=torch.float64)
    param = nn.Parameter(x.clone())
    opt = sharpness.EntropySGD(torch.optim.SGD([param], lr=0.5), langevin_steps=3, sgld_lr=0.1, noise=1e-2,
                               gamma=0.03, gamma_growth=1.5, gamma_max=0.05, alpha=0.25, scale_by_gamma=True, seed=7)
    gen = torch.Generator().manual_seed(7)
    scopes = []
    for t in range(4):
        scopes.append(opt.scope)
        opt.step(closure_for(opt, param))
        capped = {**settings, "gamma0": min(0.03 * 1.5 ** t, 0.05), "growth": 1.0}
        x = x - 0.5 * by_hand_direction(x, t, gen=gen, **capped)
        torch.testing.assert_close(param.detach(), x, rtol=0, atol=1e-13)
    assert scopes == [0.03, 0.045, 0.05, 0.05]
    opt.steps = 10**9  # a very long run: still the cap, no overflow
    assert opt.scope == 0.05 and "gamma_max=0.05" in repr(opt)
    uncapped = sharpness.EntropySGD(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    uncapped.steps = 6000
    assert uncapped.scope == pytest.approx(0.03 * 1.001 ** 6000)
    uncapped.steps = 720_000  # 0.03 * 1.001**t passes 1e300 near t = 694k
    with pytest.raises(FloatingPointError, match="overflows; pass gamma_max"):
        uncapped.scope


def test_langevin_noise_is_one_flat_draw_per_bucket_by_hand():
    """Several tensors: each Langevin step draws xi as one N(0, I) vector over the bucket's parameters (in their
    order), the same numbers as ``torch.randn(total, generator)`` split per tensor, by hand (Algorithm 1)."""
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))  # 24 + 7 numbers: torch's CPU normal_ fills 16 or
    w2 = nn.Parameter(torch.randn(7, dtype=torch.float64))  # more in blocks, fewer one by one (draws differ)
    params = [w1, w2]

    def loss_fn(a, b):
        return (a.sum(1) ** 2).sum() + (b ** 3).sum() * 0.1 + (a[:, 0] * b[:6]).sum()

    x = [p.detach().clone() for p in params]
    sgld_lr, eps, gamma, alpha, lr, steps = 0.05, 0.3, 0.03, 0.25, 0.1, 3
    opt = sharpness.EntropySGD(torch.optim.SGD(params, lr=lr), langevin_steps=steps, sgld_lr=sgld_lr, noise=eps,
                               gamma=gamma, gamma_growth=1.0, alpha=alpha, seed=5)

    def closure():
        opt.zero_grad()
        loss = loss_fn(w1, w2)
        loss.backward()
        return loss

    opt.step(closure)
    gen = torch.Generator().manual_seed(5)
    xp, mu = [t.clone() for t in x], [t.clone() for t in x]
    for _ in range(steps):
        a, b = (t.clone().requires_grad_() for t in xp)
        grads = torch.autograd.grad(loss_fn(a, b), [a, b])
        flat = torch.randn(31, generator=gen, dtype=torch.float64)
        xi = [flat[:24].view(6, 4), flat[24:]]
        xp = [t - sgld_lr * (g + gamma * (t - t0)) + sgld_lr ** 0.5 * eps * n
              for t, g, t0, n in zip(xp, grads, x, xi)]
        mu = [(1 - alpha) * m + alpha * t for m, t in zip(mu, xp)]
    for p, t0, m in zip(params, x, mu):
        torch.testing.assert_close(p.detach(), t0 - lr * (t0 - m), rtol=0, atol=1e-13)


def test_langevin_noise_costs_one_draw_per_step_for_any_number_of_tensors():
    """The noise buffers are views of one flat buffer: ``normal_`` runs once per Langevin step, not once per
    tensor (on a GPU each is a launch), and the state still holds one noise view per parameter."""
    from sharpness._ops import OpCounter

    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)]).double()  # 10 tensors
    x = torch.randn(8, 6, dtype=torch.float64)
    opt = sharpness.EntropySGD(torch.optim.SGD(model.parameters(), lr=0.1), langevin_steps=4)
    closure = sharpness.make_closure(opt, lambda r: model(x).square().mean())
    opt.step(closure)
    with OpCounter() as counter:
        opt.step(closure)
    assert counter.ops["normal_"] == 4
    views = [opt.state[p]["entropy_noise"] for p in model.parameters()]
    assert [v.shape for v in views] == [p.shape for p in model.parameters()]
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1


# ---------------------------------------------------------------- fresh mini-batches for the Langevin steps
SHIFTS = torch.tensor([[0.0, 0.0], [0.3, -0.1], [-0.2, 0.4], [0.5, 0.2], [-0.4, -0.3], [0.1, 0.6], [0.2, -0.5]],
                      dtype=torch.float64)


def batch_closure(opt, param, shifts, counter=None):
    """A closure on a stream of "mini-batches" b with loss quad(w) + shift_b . w, the next one per call."""
    stream = iter(shifts)

    def closure():
        shift = next(stream)
        if counter is not None:
            counter.append(shift)
        opt.zero_grad()
        loss = quad(param) + shift @ param
        loss.backward()
        return loss

    return closure


def test_langevin_closure_gives_each_langevin_step_its_own_batch_as_algorithm_1():
    """The paper's Algorithm 1 samples a mini-batch per Langevin step: step t's gradients are those of batch 0
    (the training pass, at x) and then of fresh batches 1..L-1, by hand with the noise of the same seed."""
    x = torch.tensor([1.0, -1.5], dtype=torch.float64)
    param = nn.Parameter(x.clone())
    opt = sharpness.EntropySGD(torch.optim.SGD([param], lr=0.5, momentum=0.9), langevin_steps=3, noise=1e-2,
                               gamma=0.03, gamma_growth=1.5, seed=7)
    gen = torch.Generator().manual_seed(7)
    buf = torch.zeros(2, dtype=torch.float64)
    fresh = SHIFTS[1:]
    for t in range(3):
        used = []
        loss = opt.step(batch_closure(opt, param, SHIFTS[:1]), langevin_closure=batch_closure(opt, param, fresh, used))
        assert float(loss) == pytest.approx(float(quad(x)), rel=1e-14)
        assert len(used) == 2  # L - 1 fresh batches
        gamma = 0.03 * 1.5 ** t
        xp, mu = x.clone(), x.clone()
        for shift in [SHIFTS[0], *fresh[:2]]:
            xp = xp - 0.1 * (quad_grad(xp) + shift + gamma * (xp - x)) + 0.1 ** 0.5 * 1e-2 * torch.randn(
                2, generator=gen, dtype=x.dtype)
            mu = 0.75 * mu + 0.25 * xp
        buf = 0.9 * buf + (x - mu) if t else x - mu
        x = x - 0.5 * buf
        torch.testing.assert_close(param.detach(), x, rtol=0, atol=1e-13)
    assert (opt.grad_evals, opt.steps) == (9, 3)


def test_langevin_closure_on_the_steps_own_batch_is_the_default_step_bit_for_bit():
    runs = []
    for separate in (False, True):
        model = mlp(0)
        x, y = classification_data(0)
        opt = sharpness.EntropySGD(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), noise=1e-3, seed=4)
        for _ in range(3):
            extra = {"langevin_closure": make_closure(opt, model, x, y)} if separate else {}
            opt.step(make_closure(opt, model, x, y), **extra)
        runs.append((torch.cat([p.detach().flatten() for p in model.parameters()]), opt.grad_evals))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] == 15


def test_salr_passes_the_langevin_closure_to_entropy_sgd_and_walks_on_the_steps_batch():
    """SALR(EntropySGD).step(closure, langevin_closure=...): the estimate's walks run the step's closure, the
    Langevin steps the fresh one; the weights are those of Entropy-SGD alone at SALR's recorded rates."""
    x = torch.tensor([1.0, -1.5], dtype=torch.float64)
    param = nn.Parameter(x.clone())
    inner = sharpness.EntropySGD(torch.optim.SGD([param], lr=0.3), langevin_steps=3, noise=1e-2, seed=5)
    opt = sharpness.SALR(inner, every=1, n_descent=2, n_ascent=2)
    ref_param = nn.Parameter(x.clone())
    reference = sharpness.EntropySGD(torch.optim.SGD([ref_param], lr=0.3), langevin_steps=3, noise=1e-2, seed=5)
    for t in range(4):
        main, fresh = [], []
        opt.step(batch_closure(opt, param, SHIFTS[:1].expand(7, 2), main),
                 langevin_closure=batch_closure(opt, param, SHIFTS[1 + t:], fresh))
        assert len(fresh) == 2 and len(main) == 1 + 4  # the training pass and the walks' passes
        reference.param_groups[0]["lr"] = opt.lr_history[-1]
        reference.step(batch_closure(reference, ref_param, SHIFTS[:1]),
                       langevin_closure=batch_closure(reference, ref_param, SHIFTS[1 + t:]))
        torch.testing.assert_close(param.detach(), ref_param.detach(), rtol=0, atol=0)
    # per step: the training pass, 4 walk passes (a closure that always back-propagates), 2 fresh Langevin passes
    assert opt.grad_evals == 4 * (1 + 4 + 2) and inner.grad_evals == 4 * 3
    assert len(set(opt.factor_history)) > 1  # the rates differed from step to step


def test_bad_langevin_closures_are_refused_before_any_pass():
    param = nn.Parameter(torch.tensor([1.0, -1.5], dtype=torch.float64))
    opt = sharpness.EntropySGD(torch.optim.SGD([param], lr=0.3))
    with pytest.raises(TypeError, match="Invalid langevin_closure type: int"):
        opt.step(closure_for(opt, param), langevin_closure=3)
    calls = [0]
    sam = sharpness.SALR(sharpness.SAM(torch.optim.SGD([param], lr=0.3)))
    with pytest.raises(TypeError, match=r"keyword\(s\) \['langevin_closure'\]: SAM.step\(\) takes no such closure"):
        sam.step(closure_for(sam, param, calls), langevin_closure=closure_for(sam, param, calls))
    assert calls == [0] and opt.steps == sam.steps == 0


def test_a_non_finite_fresh_batch_stops_the_step_with_the_weights_unchanged():
    param = nn.Parameter(torch.tensor([1.0, -1.5], dtype=torch.float64))
    opt = sharpness.EntropySGD(torch.optim.SGD([param], lr=0.3, momentum=0.9), langevin_steps=3)
    bad = torch.tensor([[0.1, 0.2], [float("nan"), 0.0]], dtype=torch.float64)
    with pytest.raises(FloatingPointError):
        opt.step(closure_for(opt, param), langevin_closure=batch_closure(opt, param, bad))
    assert param.detach().tolist() == [1.0, -1.5] and opt.steps == 0 and not opt.base_optimizer.state
