"""SALR: S_hat and the lr rule against by-hand computations (Definition 1, Algorithms 2-4), costs, guards, errors."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
from torch import nn

import sharpness
from helpers import checkpoint_round_trip, classification_data, make_closure, mlp, native
from sharpness.optim.salr import _RunningMedian


def closure_for(opt, param, f, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = f(param)
        loss.backward()
        return loss

    return closure


def by_hand_sharpness(f, grad, w, gamma, n1, n2):
    """Definition 1 written out: normalized descent (n1) and ascent (n2) walks from w, S = f(w+) - f(w-)."""
    def walk(sign, steps):
        x = w.clone()
        for _ in range(steps):
            g = grad(x)
            x = x + sign * gamma * g / g.norm()
        return x

    return float(f(walk(+1, n2)) - f(walk(-1, n1)))


# ------------------------------------------------------------------------------------------------ S_hat
QUAD_A = torch.tensor([[3.0, 0.5], [0.5, 0.2]], dtype=torch.float64)
QUAD_B = torch.tensor([0.3, -0.7], dtype=torch.float64)


def quad(w):
    return 0.5 * w @ QUAD_A @ w + QUAD_B @ w


def quad_grad(w):
    return QUAD_A @ w + QUAD_B


@pytest.mark.parametrize("n1,n2,gamma", [(5, 5, 0.01), (1, 3, 0.2), (4, 1, 0.05)])
def test_sharpness_hat_on_a_quadratic_equals_by_hand(n1, n2, gamma):
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    param = nn.Parameter(w0.clone())
    opt = sharpness.SALR(torch.optim.SGD([param], lr=0.1), n_descent=n1, n_ascent=n2, gamma=gamma, every=1)
    opt.step(closure_for(opt, param, quad))
    expected = by_hand_sharpness(quad, quad_grad, w0, gamma, n1, n2)
    assert opt.last_sharpness == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # the step itself is plain GD at factor S_1 / median(S_1) = 1
    torch.testing.assert_close(param.detach(), w0 - 0.1 * quad_grad(w0), rtol=0, atol=1e-15)


def f_paper(t):
    return 0.5 * t * torch.sin(3 * t) + 1  # the paper's Figure 2 function


def df_paper(t):
    return 0.5 * torch.sin(3 * t) + 1.5 * t * torch.cos(3 * t)


@pytest.mark.parametrize("t0", [-2.0, -0.7, 0.0, 0.4, 1.3, 2.5])
def test_sharpness_hat_on_the_papers_function_equals_by_hand(t0):
    w0 = torch.tensor([t0], dtype=torch.float64)
    param = nn.Parameter(w0.clone())
    opt = sharpness.SALR(torch.optim.SGD([param], lr=0.01), gamma=0.02, every=1)
    opt.step(closure_for(opt, param, lambda t: f_paper(t).sum()))

    def walk(sign, steps):  # in 1-D the normalized step is sign(f') (0 where f' = 0)
        t = t0
        for _ in range(steps):
            slope = 0.5 * math.sin(3 * t) + 1.5 * t * math.cos(3 * t)
            t += sign * 0.02 * (0.0 if slope == 0 else math.copysign(1.0, slope))
        return 0.5 * t * math.sin(3 * t) + 1

    assert opt.last_sharpness == pytest.approx(walk(+1, 5) - walk(-1, 5), rel=1e-10, abs=1e-13)


def test_per_sample_and_batch_modes_agree_for_batch_size_one():
    x, y = classification_data(0, n=1)
    results = []
    for mode in ("batch", "per_sample"):
        model = mlp(0)
        opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.05, every=1, normalization=mode)
        assert opt.needs_per_sample_losses  # both modes take per-sample-loss closures (forward-only endpoints)
        for _ in range(3):
            opt.step(make_closure(opt, model, x, y))
        results.append((list(opt.sharpness_history), [p.detach().clone() for p in model.parameters()]))
    (s_batch, w_batch), (s_sample, w_sample) = results
    assert s_sample == pytest.approx(s_batch, rel=1e-9)
    for a, b in zip(w_batch, w_sample):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_per_sample_mode_equals_the_torch_func_measure_algorithm_2():
    """Our vmapped-backward per-sample walk against salr_stochastic_sharpness (functional_call + vmap(grad))."""
    x, y = classification_data(1, n=12)
    model = mlp(0)
    expected = sharpness.measures.salr_stochastic_sharpness(model, nn.functional.cross_entropy, (x, y), 0.05,
                                                            ascent_steps=3, descent_steps=2, mode="train").value
    opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), n_descent=2, n_ascent=3, gamma=0.05,
                         normalization="per_sample")
    opt.step(make_closure(opt, model, x, y))
    assert opt.last_sharpness == pytest.approx(expected, rel=1e-9)


def test_batch_mode_equals_the_sharpness_hat_measure():
    x, y = classification_data(2, n=16)
    model = mlp(0)
    expected = sharpness.measures.salr_sharpness_hat(model, nn.functional.cross_entropy, (x, y), 0.03,
                                                     ascent_steps=4, descent_steps=2, mode="train").value
    opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), n_descent=2, n_ascent=4, gamma=0.03)
    opt.step(make_closure(opt, model, x, y))
    assert opt.last_sharpness == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------------------------------------ the lr rule
def test_sgd_salr_steps_equal_algorithm_3_by_hand():
    gamma, lr, steps = 0.05, 0.1, 5
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    param = nn.Parameter(w.clone())
    opt = sharpness.SALR(torch.optim.SGD([param], lr=lr), n_descent=3, n_ascent=2, gamma=gamma, every=2)
    history, factor = [], None
    for k in range(steps):
        opt.step(closure_for(opt, param, quad))
        if k % 2 == 0:  # k mod c = 0: estimate, otherwise reuse
            history.append(by_hand_sharpness(quad, quad_grad, w, gamma, 3, 2))
            factor = history[-1] / statistics.median(history)
        w = w - lr * factor * quad_grad(w)
        torch.testing.assert_close(param.detach(), w, rtol=0, atol=1e-13)
        assert opt.factor_history[-1] == pytest.approx(factor, rel=1e-12)
        assert opt.lr_history[-1] == pytest.approx(lr * factor, rel=1e-12)
    assert opt.param_groups[0]["lr"] == lr  # the base rate is restored exactly
    assert any(abs(f - 1) > 1e-3 for f in opt.factor_history[1:])  # the rule was exercised


def test_adam_salr_steps_equal_algorithm_4_by_hand():
    gamma, lr, b1, b2, eps = 0.05, 0.05, 0.9, 0.999, 1e-8
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    param = nn.Parameter(w.clone())
    opt = sharpness.SALR(torch.optim.Adam([param], lr=lr, betas=(b1, b2), eps=eps), gamma=gamma, every=1)
    m = torch.zeros(2, dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)
    history = []
    for k in range(4):
        opt.step(closure_for(opt, param, quad))
        history.append(by_hand_sharpness(quad, quad_grad, w, gamma, 5, 5))
        eta = lr * history[-1] / statistics.median(history)
        g = quad_grad(w)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (k + 1)), v / (1 - b2 ** (k + 1))  # (Algorithm 4's indices corrected)
        w = w - eta * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(param.detach(), w, rtol=0, atol=1e-12)


def test_factor_is_one_for_a_constant_history():
    """A linear loss has the same S_hat = gamma (n1 + n2) ||c|| everywhere: the factor stays 1."""
    c = torch.tensor([0.3, -0.4], dtype=torch.float64)
    param = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = sharpness.SALR(torch.optim.SGD([param], lr=0.1), gamma=0.01, every=1)
    for _ in range(6):
        opt.step(closure_for(opt, param, lambda w: c @ w))
    assert opt.sharpness_history == pytest.approx([0.01 * 10 * 0.5] * 6, rel=1e-10)
    assert opt.factor_history == pytest.approx([1.0] * 6, rel=1e-10)
    record = sharpness.SALR(torch.optim.SGD([param], lr=0.1))
    for _ in range(5):
        record._record(0.37)
        assert record.last_factor == 1.0  # exactly


def test_running_median_equals_statistics_median():
    rng = random.Random(0)
    values, median = [], _RunningMedian()
    for _ in range(200):
        values.append(rng.choice([rng.random(), 0.5, rng.expovariate(1.0)]))
        median.push(values[-1])
        assert median.median() == statistics.median(values)


def test_degenerate_estimates_never_give_a_nan_or_negative_lr():
    opt = sharpness.SALR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    opt._record(float("nan"))  # skipped, not recorded, factor kept
    assert opt.skipped_estimates == 1 and opt.sharpness_history == [] and opt.last_factor == 1.0
    opt._record(2.0)
    opt._record(6.0)  # median 4 -> factor 1.5
    assert opt.last_factor == 1.5
    opt._record(float("inf"))
    assert opt.last_factor == 1.5 and opt.skipped_estimates == 2
    opt._record(-1.0)  # negative estimate: undefined ratio -> 1
    assert opt.last_factor == 1.0 and opt.sharpness_history[-1] == -1.0
    zero = sharpness.SALR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    zero._record(0.0)
    zero._record(0.0)
    zero._record(0.0)  # median 0 (a stationary start)
    assert zero.last_factor == 1.0
    bounded = sharpness.SALR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), min_factor=0.5, max_factor=2.0)
    for value in (1.0, 10.0, 0.01):
        bounded._record(value)
    assert bounded.factor_history == [] and bounded.last_factor == 0.5  # 0.01 / 1.0 clamped up


def test_zero_gradient_walk_stays_put_and_keeps_the_lr():
    """At a stationary point (g = 0 everywhere) the walk stays at w, S_hat = 0 and the lr is lr_0."""
    param = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = sharpness.SALR(torch.optim.SGD([param], lr=0.1), every=1)
    for _ in range(3):
        opt.step(closure_for(opt, param, lambda w: 0.0 * w.sum()))
    assert opt.sharpness_history == [0.0, 0.0, 0.0]
    assert opt.lr_history == [0.1, 0.1, 0.1]
    assert torch.equal(param.detach(), torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ costs
@pytest.mark.parametrize("inner,per_step", [(None, 1), ("sam", 2), ("entropysgd", 5)])
def test_grad_evals_count_every_closure_call(inner, per_step):
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), n_descent=3, n_ascent=4, every=2,
                         inner=inner, model=model)
    counter = [0]
    for _ in range(5):
        opt.step(make_closure(opt, model, x, y, counter))
    assert opt.estimates == 3
    # per-sample-loss closure (make_closure): the walks' gradients, and the two endpoints forward only
    assert counter[0] == opt.grad_evals + opt.loss_evals == 5 * per_step + 3 * (3 + 4)
    assert opt.grad_evals == 5 * per_step + 3 * (3 + 4 - 2) and opt.loss_evals == 3 * 2
    assert opt.grad_evals <= opt.max_grad_evals_per_step * opt.steps
    assert opt.sam_steps == (5 if inner == "sam" else 0)


def test_a_standard_closure_gives_the_same_estimates_at_the_papers_count():
    """A hand-written closure that back-propagates a scalar loss: same S_k (to rounding), endpoints cost a pass."""
    x, y = classification_data(0)
    histories, counts = [], []
    for standard in (False, True):
        model = mlp(0)
        opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), n_descent=3, n_ascent=4, every=2)
        counter = [0]

        def closure(model=model, opt=opt, counter=counter):
            counter[0] += 1
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure if standard else make_closure(opt, model, x, y, counter))
        histories.append(opt.sharpness_history)
        counts.append((counter[0], opt.grad_evals, opt.loss_evals))
    assert histories[1] == pytest.approx(histories[0], rel=1e-9, abs=1e-15)
    assert counts[0] == (5 + 3 * 7, 5 + 3 * 5, 3 * 2)  # per-sample closure: the floor
    assert counts[1] == (5 + 3 * 7, 5 + 3 * 7, 0)  # standard closure: the paper's count


def test_per_sample_mode_counts_forward_only_endpoints_separately():
    model = mlp(0)
    x, y = classification_data(0, n=8)
    opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), n_descent=3, n_ascent=2, every=2,
                         normalization="per_sample")
    counter = [0]
    for _ in range(4):
        opt.step(make_closure(opt, model, x, y, counter))
    assert opt.loss_evals == 2 * opt.estimates == 4
    assert opt.grad_evals == 4 + 2 * (3 + 2 - 2)
    assert counter[0] == opt.grad_evals + opt.loss_evals


def test_training_randomness_and_batchnorm_statistics_are_untouched_by_the_walks():
    """With dropout and BatchNorm, min/max_factor = 1 makes SALR the base optimizer exactly."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3)).double()

    x, y = classification_data(0)
    m_ours, m_base = net(), net()
    ours = sharpness.SALR(torch.optim.SGD(m_ours.parameters(), lr=0.1, momentum=0.9), min_factor=1.0, max_factor=1.0,
                          model=m_ours, every=1)
    base = torch.optim.SGD(m_base.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(4):
        ours.step(make_closure(ours, m_ours, x, y))
    torch.manual_seed(1)
    for _ in range(4):
        base.zero_grad()
        nn.functional.cross_entropy(m_base(x), y).backward()
        base.step()
    assert all(torch.equal(a, b) for a, b in zip(m_ours.state_dict().values(), m_base.state_dict().values()))


# ------------------------------------------------------------------------------------------------ composition
def test_step_lr_scheduler_owns_the_base_rate_and_salr_the_factor():
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.2), every=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(6):
        expected_base = 0.2 * 0.5 ** (t // 2)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_base)
        opt.step(make_closure(opt, model, x, y))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_base)  # restored after the step
        assert opt.lr_history[-1] == pytest.approx(expected_base * opt.factor_history[-1], rel=1e-12)
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.2 * 0.5 ** 3)


def test_state_dict_lockstep_with_inner_sam_and_per_sample_mode():
    x, y = classification_data(3)
    for kwargs in ({"inner": "sam", "rho": 0.1}, {"normalization": "per_sample"}):
        model = mlp(0)
        opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), every=2, **kwargs)
        for _ in range(3):
            opt.step(make_closure(opt, model, x, y))
        saved = checkpoint_round_trip(model, opt)
        model2 = mlp(4)
        model2.load_state_dict(saved["model"])
        opt2 = sharpness.SALR(torch.optim.SGD(model2.parameters(), lr=0.5), every=2, **kwargs)
        opt2.load_state_dict(saved["opt"])
        assert opt2.median_sharpness == opt.median_sharpness
        for _ in range(3):
            opt.step(make_closure(opt, model, x, y))
            opt2.step(make_closure(opt2, model2, x, y))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
        assert native(opt.state_dict())["sharpness"]["salr"] == native(opt2.state_dict())["sharpness"]["salr"]
        assert opt.sharpness_history == opt2.sharpness_history and opt.grad_evals == opt2.grad_evals


# ------------------------------------------------------------------------------------------------ inner options
def _trajectory(**kwargs):
    model = mlp(0)
    x, y = classification_data(5)
    opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), every=2, model=model, **kwargs)
    for _ in range(4):
        opt.step(make_closure(opt, model, x, y))
    return opt, [p.detach().clone() for p in model.parameters()]


def test_inner_options_reach_the_inner_optimizer_as_keywords_do():
    """``inner_options={"rho": 0.1}`` is ``rho=0.1``: the same SAM inside, the same weights bit for bit."""
    opt_a, weights_a = _trajectory(inner="sam", rho=0.1)
    opt_b, weights_b = _trajectory(inner="sam", inner_options={"rho": 0.1})
    assert opt_b.optimizer.param_groups[0]["rho"] == 0.1
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    assert opt_a.sharpness_history == opt_b.sharpness_history
    _, weights_c = _trajectory(inner="sam", rho=0.05)  # (the option does change the run)
    assert not all(torch.equal(a, c) for a, c in zip(weights_a, weights_c))


def test_inner_options_set_an_inner_option_that_shares_salr_s_name():
    """Entropy-SGD's scope ``gamma`` and SALR's walk step ``gamma``: each optimizer gets its own."""
    opt, _ = _trajectory(inner="entropysgd", gamma=0.004, inner_options={"gamma": 0.5, "langevin_steps": 2})
    assert opt.gamma == 0.004
    assert opt.optimizer.langevin_steps == 2
    # the scope after 4 steps: gamma_t = gamma_0 gamma_growth^t = 0.5 * 1.001^4 (Chaudhari et al.'s scoping)
    assert opt.optimizer.scope == pytest.approx(0.5 * 1.001**4, rel=1e-12)
    default, _ = _trajectory(inner="entropysgd", gamma=0.004)
    assert default.optimizer.scope == pytest.approx(0.03 * 1.001**4, rel=1e-12)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"inner": "sam", "rho": 0.1, "inner_options": {"rho": 0.2}}, ValueError,
     r"Invalid inner options: \['rho'\] given both as keywords and in inner_options"),
    ({"inner": "sam", "inner_options": [("rho", 0.1)]}, TypeError, "Invalid inner_options type: list"),
    ({"inner_options": {"rho": 0.1}}, TypeError, "inner="),
])
def test_bad_inner_options_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        sharpness.SALR(_sgd(), **kwargs)


def test_a_config_s_inner_options_become_floats_and_keep_their_seed():
    from sharpness.harness import TrainConfig
    from sharpness.harness.train import build_optimizer

    config = TrainConfig(optimizer="salr", seed=3, optimizer_options={
        "inner": "entropysgd", "gamma": 0.002, "inner_options": {"gamma": 1, "langevin_steps": 2, "seed": 7}})
    assert config.optimizer_options["inner_options"] == {"gamma": 1.0, "langevin_steps": 2, "seed": 7}
    assert isinstance(config.optimizer_options["inner_options"]["gamma"], float)
    opt = build_optimizer(config, mlp(0), total_steps=10)
    assert opt.optimizer.seed == 7 and opt.optimizer.gamma == 1.0  # not the run's seed 3, not SALR's gamma
    plain = build_optimizer(TrainConfig(optimizer="salr", seed=3, optimizer_options={"inner": "entropysgd"}),
                            mlp(0), total_steps=10)
    assert plain.optimizer.seed == 3


# ------------------------------------------------------------------------------------------------ errors
def _sgd(lr=0.1):
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"n_descent": 0}, ValueError, "n_descent"),
    ({"n_ascent": 0}, ValueError, "n_ascent"),
    ({"n_ascent": 1.5}, (TypeError, ValueError), "n_ascent"),
    ({"gamma": 0.0}, ValueError, "gamma"),
    ({"gamma": -0.1}, ValueError, "gamma"),
    ({"every": 0}, ValueError, "every"),
    ({"normalization": "layer"}, ValueError, "normalization"),
    ({"min_factor": 2.0, "max_factor": 1.0}, ValueError, "min_factor"),
    ({"max_factor": 0.0}, ValueError, "max_factor"),
    ({"rho": 0.1}, TypeError, "inner="),
])
def test_bad_options_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        sharpness.SALR(_sgd(), **kwargs)


def test_bad_base_rate_and_types_raise():
    with pytest.raises(ValueError, match="lr_0 > 0"):
        sharpness.SALR(_sgd(lr=0.0))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sharpness.SALR([nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="another SALR"):
        sharpness.SALR(sharpness.SALR(_sgd()))
    opt = sharpness.SALR(_sgd())
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    per_sample = sharpness.SALR(_sgd(), normalization="per_sample")
    with pytest.raises(ValueError, match="per-sample losses"):
        per_sample.step(lambda: torch.tensor(1.0, requires_grad=True))


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_per_sample_chunks_give_the_whole_batch_result(chunk):
    """``per_sample_chunk`` runs the vmapped backward over a few samples at a time: the same direction, mean
    gradient, estimates and weights as the whole batch at once (float64, to rounding; 16 is the batch)."""
    x, y = classification_data(2, n=16)
    results = []
    for option in (None, chunk):
        model = mlp(0)
        opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.05, every=1,
                             n_descent=2, n_ascent=3, normalization="per_sample", per_sample_chunk=option)
        for _ in range(4):
            opt.step(make_closure(opt, model, x, y))
        results.append((list(opt.sharpness_history), [p.detach().clone() for p in model.parameters()]))
    (s_whole, w_whole), (s_chunk, w_chunk) = results
    assert len(s_whole) == 4 and s_chunk == pytest.approx(s_whole, rel=1e-10, abs=1e-14)
    for a, b in zip(w_whole, w_chunk):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-13)


def test_per_sample_chunks_bound_the_step_memory():
    """The step's allocation peak holds |B| per-sample gradients at once without chunks (at least |B| x the
    parameter bytes) and a small fraction of that with ``per_sample_chunk=2``."""
    from sharpness._ops import cpu_peak_bytes

    torch.manual_seed(0)
    batch = 64
    x, y = torch.randn(batch, 128, dtype=torch.float64), torch.randint(0, 4, (batch,))
    peaks = {}
    for option in (None, 2):
        model = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 4)).double()
        opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.01), gamma=0.01, every=1,
                             normalization="per_sample", per_sample_chunk=option)
        opt.step(make_closure(opt, model, x, y))  # buffers allocated
        peaks[option] = cpu_peak_bytes(lambda: opt.step(make_closure(opt, model, x, y)), calls=1)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peaks[None] >= batch * param_bytes
    assert peaks[2] < 0.1 * peaks[None], (peaks, param_bytes)


def test_per_sample_chunk_is_validated():
    model = mlp(0)
    with pytest.raises(ValueError, match=r"Invalid per_sample_chunk value: 0 \(expected"):
        sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), normalization="per_sample", per_sample_chunk=0)
    with pytest.raises(ValueError, match="Invalid per_sample_chunk value: 4 with normalization='batch'"):
        sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), per_sample_chunk=4)
    opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.1), normalization="per_sample", per_sample_chunk=4)
    assert "per_sample_chunk=4" in repr(opt)
