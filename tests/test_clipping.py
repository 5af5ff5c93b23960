"""``max_grad_norm``: the final gradient handed to the base optimizer is clipped in norm, not in direction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpness
from helpers import create_for_test, has_both_branches as _has_both_branches
from helpers import make_closure as closure_for

OPTIMIZER_NAMES = [info.name for info in sharpness.list_optimizers()]
# Settings under which a short run takes both SAM and ERM (and, for LookSAM, reuse) steps.
SETTINGS = {
    "aesam": {"lambda1": 1.0, "lambda2": 1.0},
    "aelooksam": {"lambda1": 1.0, "lambda2": 1.0},
    "looksam": {"k": 2},
    "sssam": {"p": 0.5, "seed": 1},
}
STEPS = 6
TORCH_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1


class RecordingSGD(torch.optim.SGD):
    """SGD that records the gradients it is handed (the 'final gradient' of the wrapper)."""

    def step(self, closure=None):
        self.seen = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        self.seen_lr = [group["lr"] for group in self.param_groups]
        return super().step(closure)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def make_opt(name, net, **kwargs):
    kwargs = {**SETTINGS.get(name, {}), **kwargs}
    if "total_steps" in sharpness.get_optimizer_info(name).required:
        kwargs["total_steps"] = STEPS
    return create_for_test(name, RecordingSGD(net.parameters(), lr=1.0), rho=0.1, **kwargs)


def batches(steps=STEPS, n=32):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
        out.append((x, y))
    return out



def global_norm(tensors):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_clip_scales_the_final_gradient_only(name):
    """Lockstep with an unclipped twin synced to the same weights before every step: the clipped final
    gradient is the unclipped one times min(1, max_norm / ||g||); the update is w - lr * clipped with the lr the
    base optimizer was handed: the scheduler's lr=1, or lr=1 times the method's factor (``scales_base_lr``)."""
    max_norm = 0.05
    clipped_model, twin_model = make_model(), make_model()
    clipped = make_opt(name, clipped_model, max_grad_norm=max_norm)
    twin = make_opt(name, twin_model)
    was_clipped = 0
    for x, y in batches():
        with torch.no_grad():
            for p, q in zip(twin_model.parameters(), clipped_model.parameters(), strict=True):
                p.copy_(q)
        before = [p.detach().clone() for p in clipped_model.parameters()]
        clipped.step(closure_for(clipped, clipped_model, x, y))
        twin.step(closure_for(twin, twin_model, x, y))
        g_clip, g_raw = clipped.base_optimizer.seen, twin.base_optimizer.seen

        norm_raw = global_norm(g_raw)
        assert global_norm(g_clip) <= max_norm * (1 + 1e-12)
        coef = min(1.0, max_norm / (norm_raw.item() + TORCH_CLIP_EPS))
        was_clipped += coef < 1.0
        torch.testing.assert_close(flat(g_clip), coef * flat(g_raw), rtol=1e-10, atol=1e-14)
        cos = torch.dot(flat(g_clip), flat(g_raw)) / (global_norm(g_clip) * norm_raw)
        assert cos.item() == pytest.approx(1.0, abs=1e-12)
        (lr,) = clipped.base_optimizer.seen_lr
        assert lr == twin.base_optimizer.seen_lr[0]
        if not clipped.scales_base_lr:
            assert lr == 1.0
        for p, w, g in zip(clipped_model.parameters(), before, g_clip, strict=True):
            torch.testing.assert_close(p.detach(), w - lr * g, rtol=0, atol=1e-14)
    assert was_clipped == STEPS, "max_norm too large: the test would not exercise the clipping"
    assert (clipped.steps, clipped.sam_steps) == (twin.steps, twin.sam_steps)
    if _has_both_branches(name):
        assert 0 < clipped.sam_steps < clipped.steps


def test_clipped_sam_step_by_hand():
    """w_new = w - clip(g_s), g_s = grad L(w + rho g/||g||), with the norm over all parameter groups."""
    rho, max_norm = 0.1, 0.03
    model = make_model()
    x, y = batches(1)[0]
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]

    def grad_at(weights):
        ws = [w.clone().requires_grad_(True) for w in weights]
        h = torch.tanh(x @ ws[0].T + ws[1])
        loss = nn.functional.cross_entropy(h @ ws[2].T + ws[3], y)
        return torch.autograd.grad(loss, ws)

    g = grad_at(w0)
    e_scale = rho / (global_norm(g) + 1e-12)
    g_s = grad_at([w + e_scale * gi for w, gi in zip(w0, g, strict=True)])
    norm_s = global_norm(g_s)
    assert norm_s > max_norm
    expected = [w - (max_norm / (norm_s + TORCH_CLIP_EPS)) * gs for w, gs in zip(w0, g_s, strict=True)]

    # Two param groups (weights / biases) with the same lr: clipping must use the global norm.
    base = torch.optim.SGD([{"params": params[0::2]}, {"params": params[1::2]}], lr=1.0)
    opt = sharpness.SAM(base, rho=rho, max_grad_norm=max_norm)
    opt.step(closure_for(opt, model, x, y))
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)
    assert global_norm([p.grad for p in params]) == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_large_max_grad_norm_changes_nothing(name):
    a, b = make_model(), make_model()
    clipped, plain = make_opt(name, a, max_grad_norm=1e6), make_opt(name, b)
    for x, y in batches():
        clipped.step(closure_for(clipped, a, x, y))
        plain.step(closure_for(plain, b, x, y))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_clipping_uses_unscaled_gradients_under_grad_scaler():
    max_norm = 0.05
    a, b = make_model(), make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    with_scaler = make_opt("sam", a, max_grad_norm=max_norm, grad_scaler=scaler)
    without = make_opt("sam", b, max_grad_norm=max_norm)
    for x, y in batches():
        def scaled_closure():
            with_scaler.zero_grad()
            loss = nn.functional.cross_entropy(a(x), y)
            scaler.scale(loss).backward()
            return loss

        with_scaler.step(scaled_closure)
        scaler.update()
        without.step(closure_for(without, b, x, y))
        assert global_norm(with_scaler.base_optimizer.seen) <= max_norm * (1 + 1e-12)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_invalid_max_grad_norm_is_rejected(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_opt("sam", make_model(), max_grad_norm=bad)
