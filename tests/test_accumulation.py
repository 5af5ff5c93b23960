"""Gradient accumulation inside the closure gives the full-batch trajectory, for every optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpness
from helpers import create_for_test, has_both_branches as _has_both_branches

OPTIMIZER_NAMES = [info.name for info in sharpness.list_optimizers()]
STEPS = 10
# Settings under which a 10-step run takes both SAM and ERM steps.
SETTINGS = {
    "aesam": {"lambda1": 1.0, "lambda2": 1.0},
    "aelooksam": {"lambda1": 1.0, "lambda2": 1.0},
    "looksam": {"k": 3},
    "sssam": {"p": 0.5, "seed": 2},
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def make_opt(name, model, base_factory):
    kwargs = dict(SETTINGS.get(name, {}))
    if "total_steps" in sharpness.get_optimizer_info(name).required:
        kwargs["total_steps"] = STEPS
    return create_for_test(name, base_factory(model.parameters()), rho=0.1, **kwargs)


def data():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        x = torch.randn(24, 6, generator=g, dtype=torch.float64)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
        out.append((x, y))
    return out


BASES = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
}


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("num_micro", [3, 4])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_micro_batch_closure_matches_full_batch(name, num_micro, base):
    full_model, micro_model = make_model(), make_model()
    full = make_opt(name, full_model, BASES[base])
    micro = make_opt(name, micro_model, BASES[base])

    for x, y in data():
        def full_closure():
            full.zero_grad()
            loss = nn.functional.cross_entropy(full_model(x), y)
            loss.backward()
            return loss

        def micro_closure():
            micro.zero_grad()
            total = 0.0
            for xm, ym in zip(x.chunk(num_micro), y.chunk(num_micro), strict=True):
                loss = nn.functional.cross_entropy(micro_model(xm), ym) / num_micro
                loss.backward()
                total = total + loss.detach()
            return total

        full_loss = full.step(full_closure)
        micro_loss = micro.step(micro_closure)
        torch.testing.assert_close(micro_loss, full_loss.detach(), rtol=0, atol=1e-12)
        for p, q in zip(full_model.parameters(), micro_model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-6)

    assert (micro.steps, micro.sam_steps, micro.grad_evals) == (full.steps, full.sam_steps, full.grad_evals)
    if _has_both_branches(name):
        assert 0 < full.sam_steps < full.steps, f"{name}: only one branch was exercised"
    # The runs moved (the comparison is not trivially between two untouched models).
    assert any(not torch.equal(p, q) for p, q in zip(full_model.parameters(), make_model().parameters()))
