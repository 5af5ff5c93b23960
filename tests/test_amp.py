"""``torch.amp.GradScaler("cpu")`` and bf16 autocast with the sharpness-aware optimizers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sharpness
from helpers import create_for_test, has_both_branches as _has_both_branches

OPTIMIZER_NAMES = [info.name for info in sharpness.list_optimizers()]
# Optimizers that can take a perturbed (second) pass.
PERTURBING_NAMES = [info.name for info in sharpness.list_optimizers() if info.max_grad_evals_per_step == 2]

# Settings under which every step of every optimizer is a SAM step (for the second-pass overflow tests).
ALWAYS_SAM = {
    "aesam": {"lambda1": -1e6, "lambda2": -1e6},
    "aelooksam": {"lambda1": -1e6, "lambda2": -1e6},
    "looksam": {"k": 1},
    "sssam": {"p": 1.0},
}
# Settings under which a short run takes both SAM and ERM steps.
MIXED = {
    "aesam": {"lambda1": 1.0, "lambda2": 1.0},
    "aelooksam": {"lambda1": 1.0, "lambda2": 1.0},
    "looksam": {"k": 2},
    "sssam": {"p": 0.5, "seed": 1},
}


def make_opt(name, model, *, settings=None, lr=0.1, momentum=0.9, **kwargs):
    kwargs = {**(settings or {}).get(name, {}), **kwargs}
    if "total_steps" in sharpness.get_optimizer_info(name).required:
        kwargs.setdefault("total_steps", 20)
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return create_for_test(name, base, rho=0.1, **kwargs)


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batches(steps, n=32, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(n, 6, generator=g, dtype=dtype)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
        out.append((x, y))
    return out


def skip_without_grad_scaler(name):
    """Methods with ``supports_grad_scaler = False`` must refuse ``grad_scaler=`` loudly; then the test is skipped."""
    if sharpness.get_optimizer_info(name).cls.supports_grad_scaler:
        return
    with pytest.raises((TypeError, ValueError), match="grad_scaler"):
        make_opt(name, make_model(), grad_scaler=torch.amp.GradScaler("cpu"))
    pytest.skip(f"{name}: supports_grad_scaler is False (grad_scaler= is refused with an error)")


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def momentum_buffers(opt, model):
    return [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()]


def counters(opt):
    return (opt.steps, opt.sam_steps, opt.grad_evals, opt.skipped_steps)


def scaled_closure(opt, model, x, y, scaler, *, poison_call=None, calls=None, autocast_dtype=None):
    """``scaler.scale(loss).backward()``; on call ``poison_call`` (0-based) the loss is multiplied by inf. With
    ``autocast_dtype`` the forward runs under ``torch.autocast`` on ``x``'s device."""
    calls = calls if calls is not None else [0]

    def closure():
        index = calls[0]
        calls[0] += 1
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        scaled = scaler.scale(loss) if scaler is not None else loss
        if index == poison_call:
            scaled = scaled * math.inf
        scaled.backward()
        return loss

    return closure


# ---------------------------------------------------------------------------------------------- no overflow
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaled_steps_equal_unscaled_steps(name, dtype):
    skip_without_grad_scaler(name)
    data = batches(8, dtype=dtype)
    ref_model, amp_model = make_model(dtype), make_model(dtype)
    ref = make_opt(name, ref_model, settings=MIXED)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)  # the scale changes mid-run
    amp = make_opt(name, amp_model, settings=MIXED, grad_scaler=scaler)
    for x, y in data:
        ref.step(scaled_closure(ref, ref_model, x, y, None))
        amp.step(scaled_closure(amp, amp_model, x, y, scaler))
        scaler.update()
        for p, q in zip(ref_model.parameters(), amp_model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
            # The gradients left for the user are unscaled too.
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6)
    assert counters(amp) == counters(ref)
    assert amp.skipped_steps == 0
    if _has_both_branches(name):
        assert 0 < amp.sam_steps < amp.steps  # both branches were compared
    assert scaler.get_scale() > 2.0**12  # it grew, and the steps still matched


@pytest.mark.parametrize("name", ["sam", "aesam"])
def test_disabled_scaler_is_a_no_op(name):
    x, y = batches(1)[0]
    ref_model, amp_model = make_model(), make_model()
    ref = make_opt(name, ref_model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    amp = make_opt(name, amp_model, grad_scaler=scaler)
    for _ in range(3):
        ref.step(scaled_closure(ref, ref_model, x, y, None))
        amp.step(scaled_closure(amp, amp_model, x, y, scaler))
        scaler.update()
    assert_bitwise_equal(snapshot(amp_model), snapshot(ref_model))
    assert counters(amp) == counters(ref)


# ---------------------------------------------------------------------------------------------- overflow
def _warm_up(opt, model, scaler, x, y):
    """One normal step so the base optimizer has momentum state that a skipped step must not touch."""
    opt.step(scaled_closure(opt, model, x, y, scaler))
    scaler.update()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_inf_in_first_pass_skips_the_step(name):
    skip_without_grad_scaler(name)
    (x0, y0), (x1, y1) = batches(2)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = make_opt(name, model, settings=ALWAYS_SAM, grad_scaler=scaler)
    _warm_up(opt, model, scaler, x0, y0)
    weights = snapshot(model)
    momentum = [buf.clone() for buf in momentum_buffers(opt, model)]
    steps, sam_steps, grad_evals, skipped = counters(opt)
    scale = scaler.get_scale()

    calls = [0]
    opt.step(scaled_closure(opt, model, x1, y1, scaler, poison_call=0, calls=calls))

    assert calls[0] == 1, "the perturbed pass must not run after an overflow in the first pass"
    assert_bitwise_equal(snapshot(model), weights)
    assert_bitwise_equal(momentum_buffers(opt, model), momentum)
    assert (opt.steps, opt.sam_steps, opt.skipped_steps) == (steps, sam_steps, skipped + 1)
    assert opt.grad_evals == grad_evals + 1
    scaler.update()
    assert scaler.get_scale() == scale * 0.5  # backoff


@pytest.mark.parametrize("name", PERTURBING_NAMES)
def test_inf_in_second_pass_skips_the_step(name):
    (x0, y0), (x1, y1) = batches(2)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = make_opt(name, model, settings=ALWAYS_SAM, grad_scaler=scaler)
    _warm_up(opt, model, scaler, x0, y0)
    weights = snapshot(model)
    momentum = [buf.clone() for buf in momentum_buffers(opt, model)]
    steps, sam_steps, grad_evals, skipped = counters(opt)
    scale = scaler.get_scale()

    calls = [0]
    opt.step(scaled_closure(opt, model, x1, y1, scaler, poison_call=1, calls=calls))

    assert calls[0] == 2
    # The weights were perturbed for the second pass: they must be restored bit-exactly and not updated.
    assert_bitwise_equal(snapshot(model), weights)
    assert_bitwise_equal(momentum_buffers(opt, model), momentum)
    assert (opt.steps, opt.sam_steps, opt.skipped_steps) == (steps, sam_steps, skipped + 1)
    assert opt.grad_evals == grad_evals + 2
    scaler.update()
    assert scaler.get_scale() == scale * 0.5


def test_inf_in_a_single_gradient_element_is_caught():
    """Overflow confined to one element of one parameter's gradient (a tensor hook), in the perturbed pass."""
    x, y = batches(1)[0]
    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    opt = make_opt("sam", model, grad_scaler=scaler)
    weights = snapshot(model)
    calls = [0]

    def poison(grad):
        if calls[0] == 2:  # during the second closure call
            grad = grad.clone()
            grad.view(-1)[0] = math.inf
        return grad

    handle = model[2].bias.register_hook(poison)
    opt.step(scaled_closure(opt, model, x, y, scaler, calls=calls))
    handle.remove()
    assert calls[0] == 2
    assert_bitwise_equal(snapshot(model), weights)
    assert (opt.steps, opt.skipped_steps) == (0, 1)
    scaler.update()
    assert scaler.get_scale() == 2.0**15


@pytest.mark.parametrize("name", PERTURBING_NAMES)
def test_first_pass_overflow_is_as_if_the_step_never_happened(name):
    """Skipping in the first pass leaves no trace (policy state, base state, counters): the run then continues
    exactly like a run without that batch."""
    data = batches(6)
    poisoned_model, clean_model = make_model(), make_model()
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    poisoned = make_opt(name, poisoned_model, settings=MIXED, grad_scaler=s1)
    clean = make_opt(name, clean_model, settings=MIXED, grad_scaler=s2)
    for t, (x, y) in enumerate(data):
        poisoned.step(scaled_closure(poisoned, poisoned_model, x, y, s1, poison_call=0 if t == 2 else None))
        s1.update()
        if t != 2:
            clean.step(scaled_closure(clean, clean_model, x, y, s2))
            s2.update()
    assert_bitwise_equal(snapshot(poisoned_model), snapshot(clean_model))
    assert poisoned.skipped_steps == 1 and clean.skipped_steps == 0
    assert (poisoned.steps, poisoned.sam_steps) == (clean.steps, clean.sam_steps)
    assert clean.sam_steps > 0


def test_two_phase_api_with_overflow():
    x, y = batches(1)[0]
    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    opt = make_opt("sam", model, grad_scaler=scaler)
    weights = snapshot(model)
    loss = nn.functional.cross_entropy(model(x), y)
    (scaler.scale(loss) * math.inf).backward()
    assert opt.first_step(zero_grad=True) is False
    opt.second_step(zero_grad=True)
    assert_bitwise_equal(snapshot(model), weights)
    assert (opt.steps, opt.skipped_steps) == (0, 1)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    # and the next (finite) step goes through
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    assert opt.first_step(zero_grad=True) is True
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    opt.second_step(zero_grad=True)
    scaler.update()
    assert (opt.steps, opt.skipped_steps) == (1, 1)


@pytest.mark.parametrize("overflow_pass", [1, 2])
def test_a_skipped_two_phase_step_honours_zero_grad_and_training_goes_on(overflow_pass):
    """The README loop (no zero_grad of its own): a skipped step must clear the inf gradients as an applied one
    does, or the next backward adds onto them and every later step overflows (the scale halving for good)."""
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = make_opt("sam", model, grad_scaler=scaler)
    log = []
    for t, (x, y) in enumerate(batches(5)):
        bad = math.inf if t == 2 else 1.0
        scaler.scale(nn.functional.cross_entropy(model(x), y) * (bad if overflow_pass == 1 else 1.0)).backward()
        if opt.first_step(zero_grad=True):
            scaler.scale(nn.functional.cross_entropy(model(x), y) * (bad if overflow_pass == 2 else 1.0)).backward()
        opt.second_step(zero_grad=True)
        scaler.update()
        log.append((opt.steps, opt.skipped_steps))
    assert log == [(1, 0), (2, 0), (2, 1), (3, 1), (4, 1)]  # one skip, then steps again
    assert all(p.grad is None for p in model.parameters())


def test_gradients_unscaled_by_the_user_are_refused():
    """torch's AMP recipe calls scaler.unscale_(opt) before clipping; the engine unscales each pass itself, so a
    second division would shrink an ERM step's gradient by the scale (1/1024 here) without a word."""
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = make_opt("sam", model, grad_scaler=scaler)
    x, y = batches(1)[0]
    weights = snapshot(model)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"scaler.unscale_\(optimizer\) was called before this step.*"
                                           r"max_grad_norm"):
        opt.first_step(zero_grad=True)
    assert_bitwise_equal(snapshot(model), weights)
    assert (opt.grad_evals, opt.steps) == (0, 0)


# ---------------------------------------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bf16_autocast_trains(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    # A method stepping on a weight displacement (Entropy-SGD's x - mu) is run at its natural lr scale, 1.
    displacement = sharpness.get_optimizer_info(name).cls.base_gradient_is_displacement
    opt = make_opt(name, model, settings=MIXED, lr=1.0 if displacement else 0.2, momentum=0.0)
    x, y = batches(1, n=128, dtype=torch.float32, seed=5)[0]

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert opt.steps == 30


@pytest.mark.parametrize("poison_call", [0, 1])
@pytest.mark.parametrize("name", ["aesam", "sssam"])
def test_a_skipped_step_leaves_the_policy_as_the_last_applied_step_left_it(name, poison_call):
    """An overflow in the perturbed pass (call 1) skips a step whose decision was made: the policy goes back to
    its state before it. One in the first pass (call 0) skips before any decision: the warm-up step's decision,
    already applied, stands (it is not undone)."""
    (x0, y0), (x1, y1) = batches(2)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = make_opt(name, model, settings=ALWAYS_SAM, grad_scaler=scaler)
    before_warm_up = copy.deepcopy(opt.policy.state_dict())
    _warm_up(opt, model, scaler, x0, y0)
    after_warm_up = copy.deepcopy(opt.policy.state_dict())
    assert not _same_state(before_warm_up, after_warm_up)  # the warm-up's decision moved the policy
    opt.step(scaled_closure(opt, model, x1, y1, scaler, poison_call=poison_call))
    assert opt.skipped_steps == 1
    assert _same_state(opt.policy.state_dict(), after_warm_up)


def _same_state(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
