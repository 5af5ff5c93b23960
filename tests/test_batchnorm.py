"""BatchNorm running statistics come from the unperturbed pass only (``model=``, ``frozen_running_stats``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sharpness
from helpers import create_for_test, has_both_branches as _has_both_branches
from helpers import make_closure as closure_for

OPTIMIZER_NAMES = [info.name for info in sharpness.list_optimizers()]
# Settings under which a short run takes both SAM and ERM steps.
SETTINGS = {
    "aesam": {"lambda1": 1.0, "lambda2": 1.0},
    "aelooksam": {"lambda1": 1.0, "lambda2": 1.0},
    "looksam": {"k": 2},
    "sssam": {"p": 0.5, "seed": 1},
}
STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def make_model(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=momentum), nn.ReLU(),
        nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Tanh(),
        nn.Linear(8, 3),
    ).double()


def make_opt(name, net, steps=6, **kwargs):
    kwargs = {**SETTINGS.get(name, {}), **kwargs}
    if "total_steps" in sharpness.get_optimizer_info(name).required:
        kwargs["total_steps"] = steps
    return create_for_test(name, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), rho=0.5, **kwargs)


def batches(steps, n=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x = 2.0 * torch.randn(n, 5, generator=g, dtype=torch.float64) + 1.0
        y = torch.randint(0, 3, (n,), generator=g)
        out.append((x, y))
    return out


def bn_stats(model):
    modules = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    return [getattr(m, k).clone() for m in modules for k in STAT_NAMES]


def assert_stats_equal(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e), f"{a} != {e}"



def reference_stats(model, x):
    """One training-mode forward pass at the current (unperturbed) weights, on a copy of the model."""
    ref = copy.deepcopy(model)
    ref.train()
    with torch.no_grad():
        ref(x)
    return bn_stats(ref)


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average driven by num_batches_tracked
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_running_stats_come_from_the_unperturbed_pass(name, momentum):
    if not sharpness.get_optimizer_info(name).cls.has_unperturbed_pass:
        pytest.skip(f"{name}: has_unperturbed_pass is False (no pass at w whose statistics could be kept)")
    model = make_model(momentum)
    opt = make_opt(name, model, model=model)
    for x, y in batches(6):
        expected = reference_stats(model, x)
        opt.step(closure_for(opt, model, x, y))
        assert_stats_equal(bn_stats(model), expected)
        assert model.training and all(m.training for m in model.modules())
    assert model[1].num_batches_tracked.item() == 6
    # Pass accounting by the instance's flags (multi-pass methods: Langevin chains, HVPs, walks).
    assert opt.steps * opt.min_grad_evals_per_step <= opt.grad_evals <= opt.steps * opt.max_grad_evals_per_step
    info = sharpness.get_optimizer_info(name)
    if _has_both_branches(name):
        assert 0 < opt.sam_steps < opt.steps
    elif info.max_grad_evals_per_step <= 2:  # one pass: no SAM step; two passes every step: all SAM steps
        assert opt.sam_steps == opt.steps * (info.max_grad_evals_per_step - 1)
    else:
        assert 0 <= opt.sam_steps <= opt.steps


@pytest.mark.parametrize(
    "name", [n for n in OPTIMIZER_NAMES if not sharpness.get_optimizer_info(n).cls.has_unperturbed_pass]
)
def test_without_an_unperturbed_pass_the_single_pass_updates_the_stats_once(name):
    """``has_unperturbed_pass = False`` (SmoothOut): the statistics come from the one (noisy) pass per step,
    exactly one update per step, and they are not those of a pass at the unperturbed weights."""
    model = make_model()
    opt = make_opt(name, model, model=model)
    for step, (x, y) in enumerate(batches(3), start=1):
        clean = reference_stats(model, x)
        opt.step(closure_for(opt, model, x, y))
        assert model[1].num_batches_tracked.item() == step
        assert not torch.equal(model[1].running_mean, clean[0])
    assert opt.grad_evals == opt.steps == 3


def test_without_model_the_perturbed_pass_updates_the_stats_too():
    """Sensitivity check: without ``model=`` both passes update the statistics."""
    model = make_model()
    opt = make_opt("sam", model)
    x, y = batches(1)[0]
    once = reference_stats(model, x)
    expected_twice = copy.deepcopy(model)
    opt.step(closure_for(opt, model, x, y))
    assert model[1].num_batches_tracked.item() == 2
    assert not torch.equal(model[1].running_mean, once[0])
    assert not torch.equal(model[1].running_var, once[1])
    # Exactly two updates: the unperturbed one and one from the perturbed weights (not the same twice).
    with torch.no_grad():
        expected_twice(x)
        expected_twice(x)
    assert not torch.equal(model[4].running_mean, expected_twice[4].running_mean)


def test_erm_step_updates_the_stats_once():
    model = make_model()
    opt = make_opt("sssam", model, model=model, p=0.0)
    x, y = batches(1)[0]
    expected = reference_stats(model, x)
    opt.step(closure_for(opt, model, x, y))
    assert opt.sam_steps == 0
    assert_stats_equal(bn_stats(model), expected)


def test_two_phase_api_with_model_restores_the_stats():
    model = make_model()
    opt = make_opt("sam", model, model=model)
    x, y = batches(1)[0]
    expected = reference_stats(model, x)
    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()  # perturbed pass, statistics bumped
    assert model[1].num_batches_tracked.item() == 2
    opt.second_step(zero_grad=True)
    assert_stats_equal(bn_stats(model), expected)
    assert model.training


def test_model_with_ddp_style_wrapper_module():
    """``model=`` may be any module containing the BatchNorm layers (here a wrapper around the network)."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, x):
            return self.module(x)

    inner = make_model()
    wrapped = Wrapper(inner)
    opt = make_opt("asam", inner, model=wrapped)
    x, y = batches(1)[0]
    expected = reference_stats(inner, x)
    opt.step(closure_for(opt, wrapped, x, y))
    assert_stats_equal(bn_stats(inner), expected)


# ------------------------------------------------------------------------------------------- context manager
def test_frozen_running_stats_leaves_stats_untouched_and_keeps_train_mode():
    model = make_model()
    x, _ = batches(1)[0]
    with torch.no_grad():
        model(x)  # non-trivial statistics to protect
    before = bn_stats(model)
    with torch.no_grad():
        expected_out = copy.deepcopy(model)(x)  # training-mode output (batch statistics)
    with sharpness.frozen_running_stats(model):
        assert model.training
        out = model(x)
        out.sum().backward()
        model(x + 1.0)
    assert torch.equal(out, expected_out), "the forward pass inside must be the training-mode one"
    assert_stats_equal(bn_stats(model), before)
    assert model.training and all(m.training for m in model.modules())
    # Outside the context the statistics update again.
    with torch.no_grad():
        model(x)
    assert model[1].num_batches_tracked.item() == before[2].item() + 1


def test_frozen_running_stats_restores_on_exception():
    model = make_model()
    x, _ = batches(1)[0]
    before = bn_stats(model)
    with pytest.raises(RuntimeError, match="boom"):
        with sharpness.frozen_running_stats(model):
            model(x)
            raise RuntimeError("boom")
    assert_stats_equal(bn_stats(model), before)


def test_frozen_running_stats_around_the_perturbed_pass_of_the_two_phase_api():
    model = make_model()
    opt = make_opt("sam", model)  # no model=: the context manager does the job
    x, y = batches(1)[0]
    expected = reference_stats(model, x)
    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    with sharpness.frozen_running_stats(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert_stats_equal(bn_stats(model), expected)


def test_frozen_running_stats_does_not_touch_parameters():
    model = make_model()
    x, _ = batches(1)[0]
    with sharpness.frozen_running_stats(model):
        with torch.no_grad():
            model[1].weight.add_(1.0)
            model(x)
    assert torch.equal(model[1].weight, make_model()[1].weight + 1.0)
