"""A failed pass never leaves a mark: a non-finite loss in any pass raises before the update, and an exception in
a later pass (e.g. out of memory) leaves the weights at ``w`` and the optimizer ready for the next step."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import sharpness
from helpers import create_for_test, native, registered_names
from sharpness import _foreach


def _setup(name: str, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(3, (16,), generator=g)
    opt = create_for_test(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **options)
    return model, x, y, opt


class _NaNGradient(torch.autograd.Function):
    """The identity whose backward returns NaN: a finite loss with a NaN gradient (as ``sqrt`` at 0 gives inf)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _closure(opt, model, x, y, calls, fault=None):
    """The standard closure; on call number ``fault[0]`` it applies ``fault[1]`` (NaN loss, a NaN gradient behind
    a finite loss, or an exception)."""
    def closure():
        opt.zero_grad()
        if fault is not None and calls[0] == fault[0] and fault[1] == "nan-grad":
            loss = F.cross_entropy(_NaNGradient.apply(model(x)), y)
        else:
            loss = F.cross_entropy(model(x), y)
        if fault is not None and calls[0] == fault[0] and fault[1] != "nan-grad":
            if fault[1] == "nan":
                loss = loss * float("nan")
            else:
                calls[0] += 1
                raise RuntimeError("out of memory (simulated)")
        calls[0] += 1
        loss.backward(create_graph=bool(getattr(opt, "needs_graph", False)))
        return loss
    return closure


def _snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    base = opt.base_optimizer if hasattr(opt, "base_optimizer") else opt.optimizer
    momentum = [s["momentum_buffer"].clone() for s in base.state.values() if s.get("momentum_buffer") is not None]
    return weights, momentum


def _passes_in_step(name: str, step: int) -> int:
    """Closure calls in step number ``step`` (0-based) of a clean run (LookSAM, SS-SAM, SALR vary by step)."""
    model, x, y, opt = _setup(name)
    for _ in range(step):
        opt.step(_closure(opt, model, x, y, [0]))
    calls = [0]
    opt.step(_closure(opt, model, x, y, calls))
    return calls[0]


@pytest.mark.parametrize("read", ["cpu", "device"])
@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("name", registered_names())
def test_a_non_finite_loss_in_any_pass_raises_and_changes_nothing(name, step, read, monkeypatch):
    """Every pass of the first and the second step (LookSAM: a SAM step, then a reuse step); with the CPU's
    free scalar reads and with the device path (stacked losses, one read) that a GPU step takes."""
    if read == "device":
        monkeypatch.setattr(_foreach, "host_read_is_free", lambda tensor: False)
    passes = _passes_in_step(name, step)
    for bad_pass in range(passes):
        model, x, y, opt = _setup(name)
        for _ in range(step):  # after one good step the momentum buffers exist
            opt.step(_closure(opt, model, x, y, [0]))
        before = _snapshot(model, opt)
        steps = opt.steps
        calls = [0]
        with pytest.raises(FloatingPointError, match=rf"non-finite loss in pass {bad_pass + 1} of this step"):
            opt.step(_closure(opt, model, x, y, calls, fault=(bad_pass, "nan")))
        after = _snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), f"{name}: weights changed"
        assert all(torch.equal(a, b) for a, b in zip(before[1], after[1])), f"{name}: momentum changed"
        assert opt.steps == steps
        opt.step(_closure(opt, model, x, y, [0]))  # and it goes on
        assert opt.steps == steps + 1 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("read", ["cpu", "device"])
@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("name", registered_names())
def test_a_nan_gradient_behind_a_finite_loss_raises_and_changes_nothing(name, step, read, monkeypatch):
    """A finite loss whose backward gives NaN, in any pass: the gradient joins the finite check, so the update is
    refused with the weights and the momentum unchanged (before, an ERM-type step wrote the NaN into the weights
    for all but a few methods, and a SAM step's perturbed-pass NaN went through for every one). The one pass
    whose NaN gradient may pass: the last of each SALR walk, whose gradient nothing uses (only its loss)."""
    if read == "device":
        monkeypatch.setattr(_foreach, "host_read_is_free", lambda tensor: False)
    passes = _passes_in_step(name, step)
    for bad_pass in range(passes):
        model, x, y, opt = _setup(name)
        for _ in range(step):
            opt.step(_closure(opt, model, x, y, [0]))
        before = _snapshot(model, opt)
        steps = opt.steps
        try:
            opt.step(_closure(opt, model, x, y, [0], fault=(bad_pass, "nan-grad")))
        except FloatingPointError as error:
            # (a NaN gradient in a pass that sets the climb makes the next pass's loss NaN: either message)
            assert re.search("non-finite (gradient|loss)", str(error)), error
        else:
            assert name == "salr" and opt.steps == steps + 1, f"{name} pass {bad_pass}: nothing raised"
            assert all(torch.isfinite(p).all() for p in model.parameters())
            continue
        after = _snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), f"{name} pass {bad_pass}: weights changed"
        assert all(torch.equal(a, b) for a, b in zip(before[1], after[1])), f"{name}: momentum changed"
        assert opt.steps == steps
        opt.step(_closure(opt, model, x, y, [0]))
        assert opt.steps == steps + 1 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["sam", "erm", "aesam"])
def test_the_gradient_check_names_the_gradient_and_passes_a_finite_one_beyond_float32s_norm_range(name):
    """The one-pass ERM step's error says the gradient (not a loss) was non-finite; and a finite gradient whose
    norm overflows float32 (elements of 1e20) is not an error: the probe's inf is confirmed element-wise."""
    model, x, y, opt = _setup(name)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .* with finite losses") if name == "erm" \
            else pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(_closure(opt, model, x, y, [0], fault=(0, "nan-grad")))
    w = torch.nn.Parameter(torch.ones(64))  # float32: ||g|| = 8e20 is beyond its range, every element finite
    opt = create_for_test(name, torch.optim.SGD([w], lr=1e-30), total_steps=10)

    def closure():
        opt.zero_grad()
        loss = (w * 1e20).sum()
        loss.backward()
        return loss

    assert not torch.isfinite(_foreach.largest_norm([torch.full((64,), 1e20)]))  # the probe does overflow
    opt.step(closure)
    assert opt.steps == 1 and torch.isfinite(w).all()


def _flat(tree, prefix: str = "") -> dict:
    """A nested state dict as ``{"/path/to/leaf": leaf}``."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}/{i}").items()}
    return {prefix: tree}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


#: what a failed step may leave changed: the passes it spent, the random numbers it drew (not a policy's: SS-SAM's
#: decision draw is undone), and LookSAM's direction (its buffer held the failed step's g, see
#: ``_forget_reuse_direction``)
_SPENT = ("grad_evals", "loss_evals", "generator", "sharpness_reuse_direction")


@pytest.mark.parametrize("name", registered_names())
def test_a_failed_step_leaves_the_optimizer_state_as_it_found_it(name):
    """A NaN loss or gradient in any pass of steps 0 to 2: the whole state dict after the FloatingPointError
    equals the one before, but for what :data:`_SPENT` lists. Before, AE-SAM's running mean and variance took
    the failed step's ``||g||^2``, SS-SAM's decision draw advanced, Trace/Frob/Det-SAM and GNR counted a SAM step
    that was never applied (``sam_fraction`` above the truth) and SALR recorded an estimate."""
    import copy

    failures = 0
    for step in range(3):
        for bad_pass in range(_passes_in_step(name, step)):
            for kind in ("nan", "nan-grad"):
                model, x, y, opt = _setup(name)
                for _ in range(step):
                    opt.step(_closure(opt, model, x, y, [0]))
                before = _flat(copy.deepcopy(opt.state_dict()))
                try:
                    opt.step(_closure(opt, model, x, y, [0], fault=(bad_pass, kind)))
                except FloatingPointError:
                    failures += 1
                else:
                    continue  # (SALR: a NaN gradient at a walk's end is not used)
                after = _flat(opt.state_dict())
                changed = sorted(k for k in before.keys() | after.keys()
                                 if k not in before or k not in after or not _same(before[k], after[k]))
                changed = [k for k in changed if "/policy/" in k or not any(part in k for part in _SPENT)]
                assert not changed, f"{name} step {step} pass {bad_pass} {kind}: {changed}"
    assert failures > 0


#: methods whose step draws random numbers (a retried step draws new ones)
_DRAWS = {"smoothout", "esam", "entropysgd", "tracesam", "frobsam", "detsam"}


@pytest.mark.parametrize("name", sorted(set(registered_names()) - _DRAWS))
def test_a_failed_step_retried_on_the_same_batch_continues_the_uninterrupted_run(name):
    """Three steps, the second first failing in its last pass and then retried: the weights equal those of the
    run without the failure, bit for bit (the policies' decisions and statistics, the counters and SALR's
    history are as if the failed attempt had not happened)."""
    model, x, y, opt = _setup(name)
    for _ in range(3):
        opt.step(_closure(opt, model, x, y, [0]))
    reference = [p.detach().clone() for p in model.parameters()]
    counters = (opt.steps, getattr(opt, "sam_steps", None))

    model, x, y, opt = _setup(name)
    opt.step(_closure(opt, model, x, y, [0]))
    with pytest.raises(FloatingPointError):
        opt.step(_closure(opt, model, x, y, [0], fault=(_passes_in_step(name, 1) - 1, "nan")))
    opt.step(_closure(opt, model, x, y, [0]))
    opt.step(_closure(opt, model, x, y, [0]))
    assert all(torch.equal(a, p) for a, p in zip(reference, model.parameters()))
    assert (opt.steps, getattr(opt, "sam_steps", None)) == counters


def _norms_per_step(opt, model, x, y, steps: int) -> list[int]:
    """``_foreach_norm`` calls in each of ``steps`` steps (forward and backward launch none)."""
    from sharpness._ops import OpCounter

    counts = []
    for _ in range(steps):
        closure = _closure(opt, model, x, y, [0])
        with OpCounter() as mode:
            opt.step(closure)
        counts.append(mode.ops["_foreach_norm"])
    return counts


@pytest.mark.parametrize("read", ["cpu", "device"])
@pytest.mark.parametrize(("name", "options"), [
    ("aesam", {"lambda1": 100.0, "lambda2": 100.0}),  # every step ERM: the policy's ||g||^2
    ("aelooksam", {"lambda1": 100.0, "lambda2": 100.0}),
    ("looksam", {"k": 2}),  # SAM steps (||g_s||^2 for the direction) and reuse steps (||g|| for its scale)
    ("gsam", {}),  # ||g_s||^2 for the surrogate gap's combination
])
def test_the_gradient_check_reuses_a_norm_the_method_already_took(name, options, read, monkeypatch):
    """#9: where the method itself takes a norm of the gradients about to be applied (or of those the update is
    built from), the finite check uses it and takes none of its own: ``check_finite`` adds no ``_foreach_norm``.
    (SAM has no such norm: its check adds one per step, the control.)"""
    if read == "device":
        monkeypatch.setattr(_foreach, "host_read_is_free", lambda tensor: False)
    counts = {}
    for check in (False, True):
        model, x, y, opt = _setup(name, check_finite=check, total_steps=10, **options)
        counts[check] = _norms_per_step(opt, model, x, y, 4)
    assert counts[True] == counts[False], counts
    model, x, y, opt = _setup("sam", check_finite=True)
    checked = _norms_per_step(opt, model, x, y, 2)
    model, x, y, opt = _setup("sam", check_finite=False)
    assert [a - b for a, b in zip(checked, _norms_per_step(opt, model, x, y, 2))] == [1, 1]


def _salr_around_sam(check: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(3, (16,), generator=g)
    inner = sharpness.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, check_finite=check)
    return model, x, y, sharpness.SALR(inner, n_descent=1, n_ascent=1, gamma=0.01, every=1, check_finite=check)


def test_salr_around_a_wrapper_leaves_the_gradient_probe_to_it():
    """SALR(SAM): the inner SAM checks the gradients it applies, so SALR checks its losses only and the step
    takes one gradient probe, not two; a NaN gradient in the passes whose gradients are used (the training pass
    and SAM's perturbed pass; the walks' end passes count only by their losses) is still refused."""
    counts = {}
    for check in (False, True):
        model, x, y, opt = _salr_around_sam(check)
        counts[check] = _norms_per_step(opt, model, x, y, 2)
    assert [a - b for a, b in zip(counts[True], counts[False])] == [1, 1]
    for bad_pass in range(4):  # training pass, the ends of the two walks (n = 1 step each), SAM's second pass
        model, x, y, opt = _salr_around_sam(True)
        opt.step(_closure(opt, model, x, y, [0]))
        weights = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step(_closure(opt, model, x, y, [0], fault=(bad_pass, "nan-grad")))
        except FloatingPointError as error:
            assert re.search("non-finite (gradient|loss)", str(error)), error
            assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters())), bad_pass
        else:  # the last pass of a walk: only its loss is used
            assert bad_pass in (1, 2), bad_pass
            assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_verdict_reduced_over_ranks_takes_a_number_witness_or_the_losses_alone(monkeypatch):
    """Under DDP the verdict is one all-reduced tensor: AE-SAM's witness (a number the policy read) goes in as a
    tensor, and SALR around SAM (losses only) reduces its losses alone, once each per step. One process, the
    reduction patched to record what it gets."""
    from sharpness.optim import _finite

    reduced = []
    monkeypatch.setattr(_finite.FiniteLossCheck, "_reduces_over_ranks", lambda self: True)
    monkeypatch.setattr(_finite.dist, "all_reduce", lambda tensor: reduced.append(tensor.clone()))
    model, x, y, opt = _salr_around_sam(True)
    opt.step(_closure(opt, model, x, y, [0]))
    assert len(reduced) == 2 and all(torch.isfinite(t) for t in reduced)  # SALR's losses, then SAM's verdict
    model, x, y, opt = _setup("aesam", total_steps=10, lambda1=100.0, lambda2=100.0)
    reduced.clear()
    loss = F.cross_entropy(model(x), y).item()
    opt.step(_closure(opt, model, x, y, [0]))
    assert opt.sam_steps == 0 and len(reduced) == 1  # an ERM step: the loss plus ||g||^2, the policy's number
    assert float(reduced[0]) == pytest.approx(loss + opt.last_grad_sq_norm, rel=1e-12)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step(_closure(opt, model, x, y, [0], fault=(0, "nan-grad")))


@pytest.mark.parametrize("name", ["aesam", "aelooksam"])
def test_the_two_phase_api_checks_a_gradient_changed_after_first_step(name):
    """first_step's ERM decision read ||g||^2; with the two-phase API the caller may change the gradients before
    second_step, so that norm does not stand for them: a NaN written in between is still refused."""
    model, x, y, opt = _setup(name, total_steps=10, lambda1=100.0, lambda2=100.0)
    _closure(opt, model, x, y, [0])()
    assert opt.first_step() is False  # an ERM step
    before = _snapshot(model, opt)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.second_step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], _snapshot(model, opt)[0]))


def test_a_parameter_first_reached_by_the_perturbed_pass_is_checked():
    """LookSAM's ||g_s||^2 covers the parameters that had a gradient at first_step; a parameter whose first
    gradient comes from the perturbed pass is outside it, so the check takes its own norm and sees its NaN."""
    model, x, y, opt = _setup("looksam", k=2)
    extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if calls[0] == 1:  # the perturbed pass only
            loss = loss + (_NaNGradient.apply(extra) * 0.0).sum()
        calls[0] += 1
        loss.backward()
        return loss

    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters())) and torch.equal(extra, torch.zeros(3))


@pytest.mark.parametrize("name", ["sam", "asam", "gnr", "tracesam", "frobsam"])
def test_a_nan_first_pass_stops_before_the_climb_and_leaves_batchnorm_finite(name):
    """One corrupt label makes pass 1's loss NaN with finite activations. The optimizer has no ``model=`` so it
    cannot restore BatchNorm's statistics: before this check, the perturbed pass ran at ``w + rho * NaN`` and
    wrote NaN into them (the model gave NaN in eval mode for good) although the error said nothing changed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    opt = create_for_test(name, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(16, 4, dtype=torch.float64)
    target = torch.randn(16, 3, dtype=torch.float64)
    bad = target.clone()
    bad[3, 0] = float("nan")
    calls = [0]

    def closure(y=target):
        calls[0] += 1
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward(create_graph=bool(getattr(opt, "needs_graph", False)))
        return loss

    opt.step(closure)
    stats = [b.clone() for b in model[1].buffers()]
    calls[0] = 0
    with pytest.raises(FloatingPointError, match="non-finite loss in pass 1 of this step"):
        opt.step(lambda: closure(bad))
    assert calls[0] == 1  # no pass at the shifted weights
    assert all(torch.isfinite(b.double()).all() for b in model[1].buffers())
    # pass 1 itself updated the statistics once, with finite batch statistics, as plain SGD's pass would
    assert not torch.equal(stats[0], model[1].running_mean)
    assert torch.isfinite(model.eval()(x)).all()


def test_a_group_with_a_bad_rho_is_not_added():
    model = torch.nn.Linear(3, 2)
    extra = torch.nn.Parameter(torch.zeros(2))
    opt = sharpness.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    with pytest.raises(ValueError, match=r"Invalid rho value: -0.5 \(expected rho >= 0"):
        opt.add_param_group({"params": [extra], "rho": -0.5})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1  # it was kept and used before
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["rho"] == 0.05 and len(opt.param_groups) == 2


@pytest.mark.parametrize("name", ["sam", "looksam", "gnr", "entropysgd"])
def test_check_finite_false_lets_the_base_optimizer_see_it(name):
    """The guard is what keeps the weights finite: without it the perturbed pass's NaN reaches them."""
    model, x, y, opt = _setup(name, check_finite=False)
    opt.step(_closure(opt, model, x, y, [0], fault=(1, "nan")))
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", registered_names())
def test_an_exception_in_a_later_pass_restores_w_and_the_next_step_is_unaffected(name):
    """Pass 2 raises: the weights are w bit for bit, and the retried step equals an uninterrupted one."""
    if _passes_in_step(name, 0) < 2:
        pytest.skip(f"{name}: one pass per step with default options")
    model, x, y, opt = _setup(name)
    ref_model, _, _, ref_opt = _setup(name)
    before = _snapshot(model, opt)[0]
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(_closure(opt, model, x, y, [0], fault=(1, "raise")))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), f"{name}: weights displaced"
    opt.step(_closure(opt, model, x, y, [0]))
    ref_opt.step(_closure(ref_opt, ref_model, x, y, [0]))
    if name in ("sssam", "esam", "smoothout", "tracesam", "frobsam", "detsam", "entropysgd"):
        return  # their random streams advanced in the failed step: the retry draws other numbers
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_abort_step_in_the_two_phase_api():
    model, x, y, opt = _setup("sam")
    w = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    assert not all(torch.equal(a, b) for a, b in zip(w, model.parameters()))  # at w + e
    opt.abort_step()
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))
    opt.abort_step()  # a no-op between steps
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True)  # not "called twice"


class _Scripted(sharpness.policies.Policy):
    """SAM or ERM by a script, one decision per call (the retry of a failed step asks again)."""

    def __init__(self, decisions):
        self.decisions = list(decisions)

    def decide(self, step, grad_sq_norm):
        return self.decisions.pop(0)


@pytest.mark.parametrize("failure", ["nan", "raise", "abort"])
def test_a_failed_sam_step_leaves_no_stale_reuse_direction(failure):
    """LookSAM-style reuse with a policy that takes an ERM step right after a failed SAM step (AE-LookSAM can).
    The failed step's ``g`` had been copied over the stored ``g_v``, so the reuse step added it at the old
    ``||g_v||`` (0.27 off in the weights). Now the direction is dropped: the reuse step is the plain step, as
    before the first SAM step, and the next SAM step stores a new direction."""
    model, x, y, _ = _setup("sam")
    plain_model, _, _, _ = _setup("sam")
    make = lambda m, script: sharpness.SharpnessAwareOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.1), rule=sharpness.rules.SAMPerturbation(),
        policy=_Scripted(script), rho=0.05, reuse_alpha=0.7)
    opt = make(model, [True, True, False, True, False])
    opt.step(_closure(opt, model, x, y, [0]))  # a SAM step stores g_v
    assert opt._reuse_norm is not None
    if failure == "abort":
        F.cross_entropy(model(x), y).backward()
        assert opt.first_step(zero_grad=True)
        opt.abort_step()
    else:
        with pytest.raises(FloatingPointError if failure == "nan" else RuntimeError):
            opt.step(_closure(opt, model, x, y, [0], fault=(1, failure)))
    assert all("reuse_direction" not in opt.state.get(p, {}) for p in model.parameters())
    # the reuse step is now a plain SGD step from the same weights
    plain_model.load_state_dict(model.state_dict())
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    opt.step(_closure(opt, model, x, y, [0]))
    plain.zero_grad()
    F.cross_entropy(plain_model(x), y).backward()
    plain.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain_model.parameters()))
    opt.step(_closure(opt, model, x, y, [0]))  # SAM: a new direction
    assert all("reuse_direction" in opt.state[p] for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y, [0]))  # and it is used
    plain_model.load_state_dict({k: v for k, v in zip(["0.weight", "0.bias", "2.weight", "2.bias"], before)})
    plain.zero_grad()
    F.cross_entropy(plain_model(x), y).backward()
    plain.step()
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), plain_model.parameters()))


@pytest.mark.parametrize("cls, option", [(sharpness.SAM, "check_finite"), (sharpness.SAM, "sync_perturbation"),
                                         (sharpness.SmoothOut, "adaptive"), (sharpness.ASAM, "adaptive_1d")])
@pytest.mark.parametrize("value", ["False", None, float("nan"), 1])
def test_flags_must_be_bools(cls, option, value):
    params = torch.nn.Linear(2, 2).parameters()
    shown = re.escape(f"{type(value).__name__} {value!r}")  # the value is shown: --opt check_finite=False
    with pytest.raises(TypeError, match=rf"Invalid {option} type: {shown} \(expected bool\)"):
        cls(torch.optim.SGD(params, lr=0.1), **{option: value})


@pytest.mark.parametrize("source, target", [("sam", "aesam"), ("aesam", "aelooksam"), ("esam", "sam"),
                                            ("sam", "asam"), ("salr", "sam"), ("entropysgd", "sam"),
                                            ("sam", "entropysgd"), ("sam", "salr"), ("tracesam", "frobsam")])
def test_loading_another_optimizers_state_is_refused_before_anything_changes(source, target):
    model, x, y, src = _setup(source)
    for _ in range(2):
        src.step(_closure(src, model, x, y, [0]))
    saved = src.state_dict()
    _, _, _, dst = _setup(target)
    base = dst.base_optimizer if hasattr(dst, "base_optimizer") else dst.optimizer
    lr = base.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="saved by|not saved by|no SALR entry"):
        dst.load_state_dict(saved)
    assert dst.steps == 0 and not base.state and base.param_groups[0]["lr"] == lr  # untouched


@pytest.mark.parametrize("name", ["tracesam", "frobsam", "detsam"])
def test_a_direction_stream_from_another_device_type_is_refused_before_anything_changes(name):
    """A CUDA generator's state (16 bytes) does not fit a CPU generator: the load says so and changes nothing
    (it used to load the counters and base state, then fail inside ``Generator.set_state``)."""
    model, x, y, src = _setup(name)
    for _ in range(2):
        src.step(_closure(src, model, x, y, [0]))
    saved = native(src.state_dict())
    saved["sharpness"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator saves
    _, _, _, dst = _setup(name)
    generator_state = dst.generator.get_state()
    with pytest.raises(ValueError, match="another device type.*nothing was loaded"):
        dst.load_state_dict(saved)
    assert dst.steps == 0 and not dst.base_optimizer.state and torch.equal(dst.generator.get_state(), generator_state)
    good = src.state_dict()
    dst.load_state_dict(good)  # the same checkpoint with its own generator state loads
    assert dst.steps == 2 and torch.equal(dst.generator.get_state(), src.generator.get_state())


@pytest.mark.parametrize("name", [n for n in registered_names() if n != "smoothout"])
def test_sparse_gradients_are_refused_with_a_clear_message(name):
    """nn.Embedding(sparse=True): every method but SmoothOut (one pass at noisy weights, then the base step,
    which takes sparse gradients) refuses them by name before touching the weights (Entropy-SGD and SALR used to
    fail inside torch with 'copy_() between dense and sparse Tensors')."""
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 2)
    params = [*emb.parameters(), *lin.parameters()]
    opt = create_for_test(name, torch.optim.SGD(params, lr=0.1))
    x, y = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0])
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step(sharpness.make_closure(opt, lambda r: F.cross_entropy(lin(emb(x)), y, reduction=r)))
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("fisher", ["per_sample", "sketch"])
def test_ssamf_fisher_pass_refuses_sparse_gradients_by_name(fisher):
    """SSAM-F's own Fisher pass (its default closure) met sparse gradients before the engine's check and
    failed inside torch (``aten::addcmul_`` on SparseCPU)."""
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 2)
    params = [*emb.parameters(), *lin.parameters()]
    opt = sharpness.SSAMF(torch.optim.SGD(params, lr=0.1), fisher=fisher, update_freq=1, num_samples=3)
    x, y = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0])
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="SSAMF does not support sparse gradients"):
        opt.step(sharpness.make_closure(opt, lambda r: F.cross_entropy(lin(emb(x)), y, reduction=r)))
    assert all(torch.equal(p, q) for p, q in zip(params, before))
