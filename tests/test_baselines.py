"""ESAM, GSAM, SSAM-F and SmoothOut: one step equals the by-hand formula (fixed randomness reproduced from the
same seed), degenerate settings reduce to SAM / the base optimizer bit for bit, GSAM follows pytorch-optimizer,
counters match closure calls, checkpoints continue in lockstep, bad input is rejected clearly."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sharpness
from helpers import assert_nested_equal, checkpoint_round_trip, classification_data, make_closure, mlp, params_equal

LR, RHO = 0.1, 0.2


# ---------------------------------------------------------------------------------------------- tiny problem
def softmax_regression(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).double()


def per_sample_losses(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    weight, bias = params
    return F.cross_entropy(x @ weight.T + bias, y, reduction="none")


def grads_at(params: list[torch.Tensor], x, y, weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    ps = [p.detach().clone().requires_grad_() for p in params]
    losses = per_sample_losses(ps, x, y)
    loss = losses.mean() if weights is None else (losses * weights).sum()
    return list(torch.autograd.grad(loss, ps))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def step_with(opt, model, x, y, counter=None):
    return opt.step(make_closure(opt, model, x, y, counter))


# ---------------------------------------------------------------------------------------------- GSAM
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.5])
def test_gsam_one_step_equals_formula(alpha):
    model = softmax_regression()
    x, y = classification_data(0, n=16)
    w = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.GSAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, alpha=alpha)
    step_with(opt, model, x, y)

    g = flat(grads_at(w, x, y))
    e = RHO * g / (g.norm() + 1e-12)
    shapes = [t.shape for t in w]
    w_pert = [t + d.view(s) for t, d, s in zip(w, e.split([t.numel() for t in w]), shapes)]
    g_s = flat(grads_at(w_pert, x, y))
    g_perp = g - (g @ g_s) / (g_s @ g_s) * g_s  # component of the clean gradient orthogonal to g_s
    assert abs(float(g_perp @ g_s)) < 1e-12
    expected = flat(w) - LR * (g_s - alpha * g_perp)
    torch.testing.assert_close(flat(model.parameters()).detach(), expected, rtol=0, atol=1e-13)


def test_gsam_rho_follows_the_learning_rate():
    """rho_t = rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max - lr_min): equals SAM with that rho set by hand."""
    rho_max, rho_min, lr_max, lr_min = 0.3, 0.02, 0.2, 0.0
    m1, m2 = mlp(0), mlp(0)
    x, y = classification_data(1)
    gsam = sharpness.GSAM(torch.optim.SGD(m1.parameters(), lr=lr_max, momentum=0.9), rho=rho_max, alpha=0.0,
                          rho_min=rho_min)
    sam = sharpness.SAM(torch.optim.SGD(m2.parameters(), lr=lr_max, momentum=0.9), rho=rho_max)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(gsam, T_max=12)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(sam, T_max=12)
    for _ in range(12):
        lr = sam.param_groups[0]["lr"]
        sam.param_groups[0]["rho"] = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        step_with(gsam, m1, x, y)
        step_with(sam, m2, x, y)
        s1.step()
        s2.step()
    assert params_equal(m1, m2)
    assert gsam.param_groups[0]["rho"] == rho_max  # the schedule does not overwrite the group's rho
    assert gsam.rule.rho_at(rho_max, 0.1) == pytest.approx(rho_min + (rho_max - rho_min) * 0.5)


def test_gsam_lr_max_defaults_to_the_base_learning_rate_in_both_forms():
    """Without ``lr_max`` the schedule starts at the base optimizer's lr: the instance's, or in the davda54 form
    the one given or the class default (it raised TypeError there without an explicit ``lr=``)."""
    model = mlp(0)
    forms = [
        sharpness.GSAM(torch.optim.Adam(model.parameters()), rho=0.1, rho_min=0.01),
        sharpness.GSAM(model.parameters(), torch.optim.Adam, rho=0.1, rho_min=0.01),
        sharpness.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.01, lr=0.3),
        sharpness.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.01, lr=0.3, lr_max=0.6),
    ]
    assert [opt.rule.lr_max for opt in forms] == [1e-3, 1e-3, 0.3, 0.6]
    with pytest.raises(ValueError, match=r"Invalid lr_max value: 0.1 \(expected lr_max > lr_min = 0.2\)"):
        sharpness.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.01, lr=0.1, lr_min=0.2)


def test_gsam_alpha_zero_is_sam_bit_for_bit():
    m1, m2 = mlp(0), mlp(0)
    x, y = classification_data(2)
    o1 = sharpness.GSAM(torch.optim.Adam(m1.parameters(), lr=1e-2), rho=0.1, alpha=0.0)
    o2 = sharpness.SAM(torch.optim.Adam(m2.parameters(), lr=1e-2), rho=0.1)
    for _ in range(10):
        step_with(o1, m1, x, y)
        step_with(o2, m2, x, y)
    assert params_equal(m1, m2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gsam_trajectory_matches_pytorch_optimizer(dtype):
    from pytorch_optimizer import GSAM as PeerGSAM
    from pytorch_optimizer import ProportionScheduler

    rho_max, rho_min, alpha, lr_max, steps = 0.1, 0.01, 0.3, 0.05, 60
    ours_model, peer_model = mlp(0, dtype, width=16), mlp(0, dtype, width=16)
    x, y = classification_data(0, n=128, dtype=dtype)

    base = torch.optim.SGD(ours_model.parameters(), lr=lr_max, momentum=0.9, weight_decay=5e-4)
    ours = sharpness.GSAM(base, rho=rho_max, alpha=alpha, rho_min=rho_min, lr_max=lr_max, lr_min=0.0)
    ours_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ours, T_max=steps)

    peer_base = torch.optim.SGD(peer_model.parameters(), lr=lr_max, momentum=0.9, weight_decay=5e-4)
    peer_sched = torch.optim.lr_scheduler.CosineAnnealingLR(peer_base, T_max=steps)
    rho_sched = ProportionScheduler(peer_sched, max_lr=lr_max, min_lr=0.0, max_value=rho_max, min_value=rho_min)
    peer = PeerGSAM(peer_model.parameters(), peer_base, peer_model, rho_sched, alpha=alpha)

    for t in range(steps):
        xb, yb = x[(t * 16) % 128:(t * 16) % 128 + 32], y[(t * 16) % 128:(t * 16) % 128 + 32]
        ours_loss = step_with(ours, ours_model, xb, yb)
        peer.set_closure(nn.functional.cross_entropy, xb, yb)
        _, peer_loss = peer.step()
        ours_sched.step()
        peer_sched.step()
        peer.update_rho_t()
        assert ours_loss.item() == pytest.approx(peer_loss.item(), abs=1e-5)
    # The peer restores w by subtracting e (ours restores exactly) and accumulates the global gradient norm in
    # float32 even for float64 parameters, so float64 agrees to ~1e-9 after 60 steps, not to machine precision.
    tol = 1e-5 if dtype == torch.float32 else 1e-8
    for a, b in zip(ours_model.parameters(), peer_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert ours.grad_evals == 2 * steps


# ---------------------------------------------------------------------------------------------- ESAM
def _esam_reference(w, x, y, *, beta, gamma, seed, mask):
    """ESAM's step by hand: the masks are redrawn from a fresh generator with the same seed."""
    g_list = grads_at(w, x, y)
    gen = torch.Generator().manual_seed(seed)
    if mask == "coordinate":
        masks = [(torch.empty_like(t).uniform_(generator=gen) < beta).to(t.dtype) for t in w]  # Bernoulli(beta)
        m_g = [m * g for m, g in zip(masks, g_list)]
        norm = flat(g_list).norm()  # the full gradient's norm (the paper's unbiased estimate)
    else:
        keep = torch.rand(len(w), generator=gen) < beta
        m_g = [g * float(k) for g, k in zip(g_list, keep)]
        norm = flat(m_g).norm()  # the public code: norm over the kept tensors
    e = [RHO / beta * t / (norm + 1e-12) for t in m_g]
    w_pert = [t + d for t, d in zip(w, e)]
    with torch.no_grad():
        increase = per_sample_losses(w_pert, x, y) - per_sample_losses(w, x, y)
    k = max(1, math.floor(gamma * len(y) + 1e-9))
    weights = torch.zeros(len(y), dtype=x.dtype)
    weights[torch.topk(increase, k).indices] = 1.0 / k
    g_s = grads_at(w_pert, x, y, weights)
    return [t - LR * g for t, g in zip(w, g_s)], increase, k


@pytest.mark.parametrize("mask", ["coordinate", "tensor"])
@pytest.mark.parametrize("beta, gamma", [(0.5, 0.5), (0.7, 1.0), (1.0, 0.25)])
def test_esam_one_step_equals_formula(mask, beta, gamma):
    model = softmax_regression(1)
    x, y = classification_data(4, n=16)
    w = [p.detach().clone() for p in model.parameters()]
    opt = sharpness.ESAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, beta=beta, gamma=gamma, mask=mask,
                         seed=7)
    assert opt.needs_per_sample_losses is (gamma < 1)
    counter = [0]
    loss = step_with(opt, model, x, y, counter)
    expected, increase, k = _esam_reference(w, x, y, beta=beta, gamma=gamma, seed=7, mask=mask)
    if gamma < 1:  # the selected samples are a strict subset and the cut is not a tie
        top = torch.sort(increase, descending=True).values
        assert top[k - 1] > top[k] + 1e-12
    for p, ref in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-13)
    assert loss.dim() == 0 and loss.item() == pytest.approx(per_sample_losses(w, x, y).mean().item(), abs=1e-14)
    assert counter[0] == 2 and opt.grad_evals == 2


def test_esam_beta_one_gamma_one_is_sam_bit_for_bit():
    m1, m2 = mlp(0), mlp(0)
    x, y = classification_data(3)
    o1 = sharpness.ESAM(torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), rho=0.1, beta=1.0, gamma=1.0)
    o2 = sharpness.SAM(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    for _ in range(10):
        step_with(o1, m1, x, y)
        step_with(o2, m2, x, y)
    assert params_equal(m1, m2)
    assert o1.grad_evals == o2.grad_evals == 20


def test_esam_selection_rejects_an_ordinary_closure():
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.ESAM(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="per-sample losses"):
        opt.step(closure)


# ---------------------------------------------------------------------------------------------- SSAM-F
def test_ssamf_one_step_equals_formula():
    model = softmax_regression(2)
    x, y = classification_data(5, n=16)
    w = [p.detach().clone() for p in model.parameters()]
    sparsity, n = 0.6, 10
    opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, sparsity=sparsity, num_samples=n,
                          update_freq=5)
    step_with(opt, model, x, y)

    # Empirical Fisher from the first n examples' own gradients, top (1 - s) fraction over all weights.
    fisher = sum(flat(grads_at(w, x[i:i + 1], y[i:i + 1])) ** 2 for i in range(n))
    keep = math.floor(Fraction(fisher.numel()) * (1 - Fraction(str(sparsity))))  # exact
    mask = torch.zeros_like(fisher, dtype=torch.bool)
    mask[torch.topk(fisher, keep).indices] = True
    stored = flat([opt.state[p]["perturbation_mask"] for p in model.parameters()])
    assert stored.dtype == torch.bool and torch.equal(stored, mask)

    g = flat(grads_at(w, x, y))
    e = RHO * mask.to(g.dtype) * g / (g.norm() + 1e-12)
    w_pert = [t + d.view(t.shape) for t, d in zip(w, e.split([t.numel() for t in w]))]
    expected = flat(w) - LR * flat(grads_at(w_pert, x, y))
    torch.testing.assert_close(flat(model.parameters()).detach(), expected, rtol=0, atol=1e-13)
    assert opt.fisher_samples == n and opt.mask_updates == 1
    assert opt.mask_density == pytest.approx(keep / fisher.numel())


@pytest.mark.parametrize("sparsity, kept", [(0.9, 10), (0.8, 20), (0.5, 50), (0.99, 1), (0.0, 100)])
def test_ssamf_keeps_the_top_one_minus_sparsity_fraction_exactly(sparsity, kept):
    """100 weights: ``(1 - s) N`` of them, also where ``1 - s`` rounds below (1 - 0.9 = 0.0999...98 kept 9)."""
    torch.manual_seed(0)
    model = nn.Linear(9, 10).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 9, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)
    opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, sparsity=sparsity, num_samples=8,
                          fisher="vmap")
    opt.update_mask(model, F.cross_entropy, x, y)
    assert sum(int(opt.state[p]["perturbation_mask"].sum()) for p in model.parameters()) == kept


def test_ssamf_a_non_finite_refresh_keeps_the_mask():
    """A refresh step with NaN losses raises FloatingPointError with the weights unchanged, and the mask is not
    rebuilt from the NaN gradients (it was: 18 of 51 entries changed); the retry collects again."""
    model = mlp(0)
    x, y = classification_data(0, n=16)
    opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, num_samples=8, update_freq=2)
    for _ in range(2):
        step_with(opt, model, x, y)
    masks = [opt.state[p]["perturbation_mask"].clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]

    def poisoned():
        opt.zero_grad()
        return F.cross_entropy(model(x), y, reduction="none") * float("nan")

    with pytest.warns(RuntimeWarning, match="Fisher sums are not finite"), pytest.raises(FloatingPointError):
        opt.step(poisoned)
    assert params_equal(list(model.parameters()), weights) and opt.mask_updates == 1
    assert all(torch.equal(opt.state[p]["perturbation_mask"], m) for p, m in zip(model.parameters(), masks))
    step_with(opt, model, x, y)  # the retry is the refresh step again
    assert opt.mask_updates == 2 and opt.steps == 3


def test_ssamf_refresh_schedule_and_collection_across_batches():
    model = mlp(0)
    x, y = classification_data(0, n=64)
    opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, num_samples=40, update_freq=4)
    counter = [0]
    for t in range(9):
        xb, yb = x[(t % 4) * 16:(t % 4) * 16 + 16], y[(t % 4) * 16:(t % 4) * 16 + 16]
        step_with(opt, model, xb, yb, counter)
        # 40 samples from batches of 16: collected over steps 0-2 and 4-6 (the refresh at step 8 is under way)
        assert opt.mask_updates == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2}[t]
    assert opt.fisher_samples == 40 + 40 + 16
    assert counter[0] == opt.grad_evals == 18  # Fisher gradients are not closure calls


def test_ssamf_sparsity_zero_is_sam_bit_for_bit():
    m1, m2 = mlp(0), mlp(0)
    x, y = classification_data(3)
    o1 = sharpness.SSAMF(torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), rho=0.1, sparsity=0.0)
    o2 = sharpness.SAM(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    assert o1.needs_per_sample_losses is False
    for _ in range(10):
        step_with(o1, m1, x, y)
        step_with(o2, m2, x, y)
    assert params_equal(m1, m2)


@pytest.mark.parametrize("fisher", ["per_sample", "sketch"])
def test_ssamf_fisher_estimates_against_the_per_example_sum(fisher):
    """The exact mode is sum_i g_i^2 to rounding; the sketch is unbiased for it (K = 2000 probes: per-weight
    relative standard deviation <= sqrt(2/K) = 3.2%, checked at 20%) and costs K backward passes, not B."""
    model = softmax_regression(4)
    x, y = classification_data(6, n=6)
    w = [p.detach().clone() for p in model.parameters()]
    probes = 2000
    opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, sparsity=0.5, num_samples=1000,
                          update_freq=5, fisher=fisher, fisher_probes=probes, seed=1)
    step_with(opt, model, x, y)  # still collecting (6 of 1000 examples): the running sum is in the state
    estimate = flat([opt.state[p]["fisher_sum"] for p in model.parameters()])
    exact = sum(flat(grads_at(w, x[i:i + 1], y[i:i + 1])) ** 2 for i in range(6))
    assert opt.fisher_samples == 6
    if fisher == "per_sample":
        torch.testing.assert_close(estimate, exact, rtol=1e-12, atol=1e-15)
        assert opt.fisher_backward_passes == 6
    else:
        torch.testing.assert_close(estimate, exact, rtol=0.2, atol=0.01 * exact.max().item())
        assert not torch.allclose(estimate, exact, rtol=1e-6)  # an estimate, not the exact sum
        assert opt.fisher_backward_passes == probes


def test_ssamf_vmap_update_mask_is_the_exact_fisher_and_equals_the_per_sample_mode():
    """fisher="vmap": update_mask builds the mask of the by-hand per-example sum over the first num_samples
    examples (chunked: 10 examples in chunks of 3), and the step then equals the paper's per_sample mode."""
    x, y = classification_data(5, n=16)
    sparsity, n = 0.6, 10
    m1, m2 = softmax_regression(2), softmax_regression(2)
    w = [p.detach().clone() for p in m1.parameters()]
    o1 = sharpness.SSAMF(torch.optim.SGD(m1.parameters(), lr=LR), rho=RHO, sparsity=sparsity, num_samples=n,
                         update_freq=5, fisher="vmap", fisher_chunk_size=3)
    o2 = sharpness.SSAMF(torch.optim.SGD(m2.parameters(), lr=LR), rho=RHO, sparsity=sparsity, num_samples=n,
                         update_freq=5)
    assert o1.needs_per_sample_losses is False and o1.mask_due
    o1.update_mask(m1, F.cross_entropy, x, y)  # uses x[:10]
    fisher = sum(flat(grads_at(w, x[i:i + 1], y[i:i + 1])) ** 2 for i in range(n))
    keep = math.floor(Fraction(fisher.numel()) * (1 - Fraction(str(sparsity))))  # exact
    mask = torch.zeros_like(fisher, dtype=torch.bool)
    mask[torch.topk(fisher, keep).indices] = True
    assert torch.equal(flat([o1.state[p]["perturbation_mask"] for p in m1.parameters()]), mask)
    assert o1.fisher_samples == n and o1.mask_updates == 1 and o1.fisher_backward_passes == 0

    counter = [0]
    step_with(o1, m1, x, y, counter)
    step_with(o2, m2, x, y)
    assert counter[0] == 2 and not o1.mask_due  # the ordinary closure: two passes, no collection
    torch.testing.assert_close(flat(m1.parameters()), flat(m2.parameters()), rtol=0, atol=1e-13)


def test_ssamf_vmap_schedule_and_harness_refresh(tmp_path):
    model = mlp(0)
    x, y = classification_data(0, n=32)
    opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, num_samples=8, update_freq=3,
                          fisher="vmap")
    due = []
    for _ in range(7):
        due.append(opt.mask_due)
        if opt.mask_due:
            opt.update_mask(model, F.cross_entropy, x, y)
        step_with(opt, model, x, y)
    assert due == [True, False, False, True, False, False, True]
    assert opt.mask_updates == 3 and opt.fisher_samples == 24 and opt.mask_density == 33 / 67
    # without update_mask the mask stays empty: the steps are the base optimizer's, at two passes each
    plain = sharpness.SSAMF(torch.optim.SGD(mlp(0).parameters(), lr=0.1), sparsity=0.5, fisher="vmap")
    step_with(plain, mlp(0), x, y)
    assert plain.mask_updates == 0 and plain.mask_density == 0.0


def test_ssamf_update_mask_errors():
    model = mlp(0)
    x, y = classification_data(0, n=8)
    opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=0.1), fisher="vmap")
    with pytest.raises(ValueError, match="not trainable parameters of the model"):
        opt.update_mask(mlp(1), F.cross_entropy, x, y)
    with pytest.raises(ValueError, match="at least one example"):
        opt.update_mask(model, F.cross_entropy, x[:0], y[:0])
    with pytest.raises(TypeError, match="loss_fn"):
        opt.update_mask(model, None, x, y)
    with pytest.raises(ValueError, match="fisher_chunk_size"):
        sharpness.SSAMF(torch.optim.SGD(mlp(0).parameters(), lr=0.1), fisher="vmap", fisher_chunk_size=0)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    train_mode = sharpness.SSAMF(torch.optim.SGD(bn.parameters(), lr=0.1), fisher="vmap", fisher_mode="train")
    with pytest.raises(ValueError, match="BatchNorm"):
        train_mode.update_mask(bn, F.cross_entropy, x, y)
    eval_mode = sharpness.SSAMF(torch.optim.SGD(bn.parameters(), lr=0.1), fisher="vmap")
    stats = bn[1].running_mean.clone()
    bn.train()
    eval_mode.update_mask(bn, F.cross_entropy, x, y)  # eval mode: running statistics untouched, flags restored
    assert torch.equal(bn[1].running_mean, stats) and bn.training and eval_mode.mask_updates == 1


@pytest.mark.parametrize("fisher", ["per_sample", "sketch"])
def test_ssamf_parameter_unfrozen_during_a_collection(fisher):
    """Progressive unfreezing while the Fisher sum is collected over several batches: the new parameter's sum
    starts at zero and the mask is built over every trainable weight."""
    model = mlp(0)
    x, y = classification_data(0, n=64)
    model[0].weight.requires_grad_(False)
    opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, num_samples=48, update_freq=1,
                          fisher=fisher)
    step_with(opt, model, x[:32], y[:32])  # 32 of 48 examples collected
    model[0].weight.requires_grad_(True)
    step_with(opt, model, x[32:], y[32:])  # completes the sum, with the unfrozen weight
    assert opt.mask_updates == 1 and opt.state[model[0].weight]["perturbation_mask"].shape == (8, 4)


def test_ssamf_bad_fisher_options():
    params = mlp(0).parameters()
    with pytest.raises(ValueError, match="fisher"):
        sharpness.SSAMF(torch.optim.SGD(params, lr=0.1), fisher="diagonal")
    with pytest.raises(ValueError, match="fisher_probes"):
        sharpness.SSAMF(torch.optim.SGD(mlp(0).parameters(), lr=0.1), fisher="sketch", fisher_probes=0)


# ---------------------------------------------------------------------------------------------- SmoothOut
@pytest.mark.parametrize("adaptive", [False, True])
def test_smoothout_one_step_equals_formula(adaptive):
    model = softmax_regression(3)
    x, y = classification_data(6, n=16)
    w = [p.detach().clone() for p in model.parameters()]
    a = 0.05
    opt = sharpness.SmoothOut(torch.optim.SGD(model.parameters(), lr=LR), a=a, adaptive=adaptive, seed=11)
    counter = [0]
    loss = step_with(opt, model, x, y, counter)

    gen = torch.Generator().manual_seed(11)
    noise = [torch.empty_like(t).uniform_(-a, a, generator=gen) for t in w]
    if adaptive:  # weight [3, 4]: each output row scaled by its norm; bias: each entry by its magnitude
        noise = [noise[0] * w[0].norm(dim=1, keepdim=True), noise[1] * w[1].abs()]
    noisy = [t + xi for t, xi in zip(w, noise)]
    expected = [t - LR * g for t, g in zip(w, grads_at(noisy, x, y))]
    for p, ref in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-14)
    assert loss.item() == pytest.approx(per_sample_losses(noisy, x, y).mean().item(), abs=1e-14)
    assert counter[0] == opt.grad_evals == opt.steps == 1 and opt.sam_steps == 0


def test_smoothout_copies_average_the_gradients_of_independent_noisy_copies():
    """copies=3: w <- w - lr * (1/3) sum_k grad L(w + xi_k), xi_k drawn in turn from the seeded stream."""
    model = softmax_regression(3)
    x, y = classification_data(6, n=16)
    w = [p.detach().clone() for p in model.parameters()]
    a, copies = 0.05, 3
    opt = sharpness.SmoothOut(torch.optim.SGD(model.parameters(), lr=LR), a=a, copies=copies, seed=11)
    counter = [0]
    loss = step_with(opt, model, x, y, counter)

    gen = torch.Generator().manual_seed(11)
    points = [[t + torch.empty_like(t).uniform_(-a, a, generator=gen) for t in w] for _ in range(copies)]
    grads = [grads_at(point, x, y) for point in points]
    mean_grad = [sum(g[i] for g in grads) / copies for i in range(len(w))]
    for p, t, g in zip(model.parameters(), w, mean_grad):
        torch.testing.assert_close(p.detach(), t - LR * g, rtol=0, atol=1e-14)
    expected_loss = sum(per_sample_losses(point, x, y).mean() for point in points) / copies
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-14)
    assert counter[0] == opt.grad_evals == copies and opt.steps == 1
    assert opt.min_grad_evals_per_step == opt.max_grad_evals_per_step == copies
    # the average really differs from a single copy (the test would catch copies being ignored)
    assert not torch.allclose(mean_grad[0], grads[0][0])


def test_smoothout_copies_with_model_update_batchnorm_once_per_step():
    """``copies=3, model=model``: the running statistics are those of the first copy's pass, as with one copy (the
    first noise draw is the same); without ``model`` every copy updates them (three EMA updates)."""
    def run(copies, with_model):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
        x, y = classification_data(6, n=16)
        extra = {"model": model} if with_model else {}
        opt = sharpness.SmoothOut(torch.optim.SGD(model.parameters(), lr=LR), a=0.05, copies=copies, seed=11,
                                  **extra)
        step_with(opt, model, x, y)
        return model[1].running_mean.clone(), int(model[1].num_batches_tracked)

    one, _ = run(1, False)
    three, tracked = run(3, True)
    assert torch.equal(three, one) and tracked == 1
    unguarded, tracked = run(3, False)
    assert not torch.allclose(unguarded, one) and tracked == 3


def test_smoothout_a_zero_is_adam_bit_for_bit():
    m1, m2 = mlp(0), mlp(0)
    x, y = classification_data(3)
    o1 = sharpness.SmoothOut(torch.optim.Adam(m1.parameters(), lr=1e-2), a=0.0, adaptive=True)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    for _ in range(10):
        step_with(o1, m1, x, y)
        o2.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        o2.step()
    assert params_equal(m1, m2)


def test_smoothout_has_no_two_phase_api():
    opt = sharpness.SmoothOut(torch.optim.SGD(mlp(0).parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="step\\(closure\\)"):
        opt.first_step()


# ---------------------------------------------------------------------------------------------- shared checks
CONFIGS = {
    "gsam": lambda base: sharpness.GSAM(base, rho=0.1, alpha=0.2, rho_min=0.02),
    "esam-coordinate": lambda base: sharpness.ESAM(base, rho=0.1, beta=0.6, gamma=0.5, seed=3),
    "esam-tensor": lambda base: sharpness.ESAM(base, rho=0.1, beta=0.5, gamma=0.75, mask="tensor", seed=3),
    "ssamf": lambda base: sharpness.SSAMF(base, rho=0.1, sparsity=0.5, num_samples=24, update_freq=3),
    "ssamf-sketch": lambda base: sharpness.SSAMF(base, rho=0.1, sparsity=0.5, num_samples=24, update_freq=3,
                                                 fisher="sketch", fisher_probes=3, seed=2),
    "smoothout": lambda base: sharpness.SmoothOut(base, a=0.02, seed=5),
    "adasmoothout": lambda base: sharpness.SmoothOut(base, a=0.05, adaptive=True, seed=5),
    "smoothout-copies": lambda base: sharpness.SmoothOut(base, a=0.02, copies=2, seed=5),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grad_evals_count_closure_calls(name):
    model = mlp(0)
    x, y = classification_data(0)
    opt = CONFIGS[name](torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    counter = [0]
    losses = [step_with(opt, model, x, y, counter).item() for _ in range(30)]
    assert counter[0] == opt.grad_evals
    assert opt.grad_evals == opt.max_grad_evals_per_step * opt.steps  # the instance's (copies) passes per step
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_lockstep_with_generator_and_masks(name):
    """Save mid-run (SSAM-F in the middle of a Fisher collection), reload into fresh objects, continue equally."""
    x, y = classification_data(3)
    model = mlp(0)
    opt = CONFIGS[name](torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    batches = [(x[i * 16:i * 16 + 16], y[i * 16:i * 16 + 16]) for i in range(4)]
    for t in range(4):
        step_with(opt, model, *batches[t % 4])
    saved = checkpoint_round_trip(model, opt)
    model2 = mlp(9)
    model2.load_state_dict(saved["model"])
    opt2 = CONFIGS[name](torch.optim.SGD(model2.parameters(), lr=0.5))
    opt2.load_state_dict(saved["opt"])
    for t in range(4, 12):
        step_with(opt, model, *batches[t % 4])
        step_with(opt2, model2, *batches[t % 4])
    assert params_equal(model, model2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert_nested_equal(s1, s2)


# ---------------------------------------------------------------------------------------------- bad input
BAD_ARGUMENTS = [
    (sharpness.GSAM, {"alpha": -0.1}, ValueError, ["alpha", "-0.1", ">= 0"]),
    (sharpness.GSAM, {"rho": 0.1, "rho_min": 0.2}, ValueError, ["rho_min", "0.2", "rho_min <= rho"]),
    (sharpness.GSAM, {"rho_min": -0.01}, ValueError, ["rho_min", "-0.01", ">= 0"]),
    (sharpness.GSAM, {"rho_min": 0.01, "lr_max": 0.0}, ValueError, ["lr_max", "0.0", "> 0"]),
    (sharpness.GSAM, {"rho_min": 0.01, "lr_max": 0.1, "lr_min": 0.2}, ValueError, ["lr_max", "lr_max > lr_min"]),
    (sharpness.GSAM, {"lr_max": 0.1}, ValueError, ["lr_max", "rho_min"]),
    (sharpness.GSAM, {"lr_min": 0.001}, ValueError, ["GSAM got lr_min without rho_min"]),
    (sharpness.ESAM, {"beta": 0.0}, ValueError, ["beta", "0.0", "0 < beta <= 1"]),
    (sharpness.ESAM, {"beta": 1.5}, ValueError, ["beta", "1.5", "0 < beta <= 1"]),
    (sharpness.ESAM, {"gamma": 0.0}, ValueError, ["gamma", "0.0", "0 < gamma <= 1"]),
    (sharpness.ESAM, {"gamma": 1.01}, ValueError, ["gamma", "1.01", "0 < gamma <= 1"]),
    (sharpness.ESAM, {"gamma": "half"}, TypeError, ["gamma", "str"]),
    (sharpness.ESAM, {"mask": "layer"}, ValueError, ["mask", "'layer'", "'coordinate'", "'tensor'"]),
    (sharpness.ESAM, {"seed": -1}, ValueError, ["seed", "-1", ">= 0"]),
    (sharpness.SSAMF, {"sparsity": 1.0}, ValueError, ["sparsity", "1.0", "0 <= sparsity < 1"]),
    (sharpness.SSAMF, {"sparsity": -0.1}, ValueError, ["sparsity", "-0.1", "0 <= sparsity < 1"]),
    (sharpness.SSAMF, {"num_samples": 0}, ValueError, ["num_samples", "0", ">= 1"]),
    (sharpness.SSAMF, {"update_freq": 2.5}, TypeError, ["update_freq", "float", "integer"]),
    (sharpness.SSAMF, {"rho": -1.0}, ValueError, ["rho", "-1.0", ">= 0"]),
    (sharpness.SmoothOut, {"a": -0.01}, ValueError, ["a", "-0.01", "a >= 0"]),
    (sharpness.SmoothOut, {"a": float("nan")}, ValueError, ["a", "nan"]),
    (sharpness.SmoothOut, {"seed": 1.5}, TypeError, ["seed", "float", "integer"]),
    (sharpness.SmoothOut, {"copies": 0}, ValueError, ["copies", "0"]),
]


@pytest.mark.parametrize(
    "cls, kwargs, exc, fragments", BAD_ARGUMENTS, ids=[f"{c.__name__}-{sorted(k)}" for c, k, _, _ in BAD_ARGUMENTS]
)
def test_bad_argument(cls, kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        cls(torch.optim.SGD(mlp(0).parameters(), lr=0.1), **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from {info.value}"


def test_smoothout_rejects_a_negative_group_a():
    model = mlp(0)
    opt = sharpness.SmoothOut(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="a >= 0"):
        opt.add_param_group({"params": model[2].parameters(), "a": -1.0})


# ---------------------------------------------------------------------------------------------- per-sample paths
PER_SAMPLE = {
    "esam": lambda base, **kw: sharpness.ESAM(base, rho=0.1, beta=0.6, gamma=0.5, seed=3, **kw),
    "ssamf": lambda base, **kw: sharpness.SSAMF(base, rho=0.1, sparsity=0.5, num_samples=24, update_freq=3, **kw),
}


@pytest.mark.parametrize("name", sorted(PER_SAMPLE))
def test_per_sample_path_under_a_grad_scaler_equals_the_unscaled_run(name):
    """The optimizer scales the losses it back-propagates itself; unscaled weights and gradients match."""
    x, y = classification_data(4, n=32)
    ref_model, amp_model = mlp(0), mlp(0)
    ref = PER_SAMPLE[name](torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    amp = PER_SAMPLE[name](torch.optim.SGD(amp_model.parameters(), lr=0.1, momentum=0.9), grad_scaler=scaler)
    assert ref.needs_per_sample_losses and amp.needs_per_sample_losses
    for t in range(6):
        xb, yb = x[(t % 2) * 16:(t % 2) * 16 + 16], y[(t % 2) * 16:(t % 2) * 16 + 16]
        step_with(ref, ref_model, xb, yb)
        step_with(amp, amp_model, xb, yb)
        scaler.update()
        for p, q in zip(ref_model.parameters(), amp_model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-12)
    assert (amp.steps, amp.grad_evals, amp.skipped_steps) == (ref.steps, ref.grad_evals, 0)
    assert scaler.get_scale() > 2.0**12  # the scale grew mid-run and the runs still agree


@pytest.mark.parametrize("name", sorted(PER_SAMPLE))
def test_per_sample_path_skips_an_overflowing_step(name):
    x, y = classification_data(4, n=16)
    model = mlp(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = PER_SAMPLE[name](torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    poisoned = x.clone()
    poisoned[0, 0] = math.inf  # one sample's loss and gradient are not finite
    step_with(opt, model, poisoned, y)
    scaler.update()
    assert opt.skipped_steps == 1 and opt.steps == 0
    assert params_equal(list(model.parameters()), before)
    assert scaler.get_scale() < 2.0**12  # backed off
