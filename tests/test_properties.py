"""The property suite every registered optimizer passes (driven by the registry, never by class names)."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sharpness
from helpers import (
    assert_nested_equal,
    checkpoint_round_trip,
    classification_data,
    make_closure,
    make_optimizer,
    mlp,
    native,
    params_equal,
    registered_names,
)

NAMES = registered_names()


def _train(opt, model, x, y, steps):
    losses = []
    for _ in range(steps):
        losses.append(opt.step(make_closure(opt, model, x, y)).item())
    return losses


def test_registry_lists_the_sam_family_with_descriptions_and_flags():
    infos = {info.name: info for info in sharpness.list_optimizers()}
    assert {"sam", "asam", "looksam", "sssam", "aesam", "aelooksam"} <= set(infos)
    for info in infos.values():
        assert info.description and len(info.description.splitlines()) == 1
        assert 1 <= info.min_grad_evals_per_step <= info.max_grad_evals_per_step
        assert info.needs_closure is True


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases(name):
    model = mlp(0)
    x, y = classification_data(0)
    opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), total_steps=60)
    losses = _train(opt, model, x, y, 60)
    assert losses[-1] < 0.6 * losses[0]
    info = sharpness.get_optimizer_info(name)
    assert info.min_grad_evals_per_step * opt.steps <= opt.grad_evals <= info.max_grad_evals_per_step * opt.steps
    if info.max_grad_evals_per_step <= 2:  # one pass per step plus one per SAM step
        assert opt.grad_evals == opt.steps + opt.sam_steps
    assert opt.sam_fraction == pytest.approx(opt.sam_steps / opt.steps)


@pytest.mark.parametrize("name", NAMES)
def test_group_with_zero_lr_does_not_move(name):
    model = mlp(0)
    x, y = classification_data(0)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=0.1, momentum=0.9
    )
    opt = make_optimizer(name, base)
    _train(opt, model, x, y, 10)
    assert params_equal(list(model[0].parameters()), frozen)
    assert not params_equal(list(model[2].parameters()), [p.detach() for p in mlp(0)[2].parameters()])


UNUSED_CASES = [(name, {}) for name in NAMES] + [("salr", {"normalization": "per_sample"}),
                                                  ("gnr", {"hvp": "finite_difference"})]


@pytest.mark.parametrize("name, options", UNUSED_CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" if o else n for n, o in UNUSED_CASES])
def test_a_parameter_the_loss_does_not_use_is_left_alone(name, options):
    """Its gradient stays None, as after a plain backward, so AdamW's weight decay does not move it. (SALR's
    per-sample estimate steps used to give it a zero gradient: decayed on those steps only.)"""
    model = mlp(0)
    unused = nn.Parameter(torch.ones(4, dtype=torch.float64))
    x, y = classification_data(0)
    opt = make_optimizer(name, torch.optim.AdamW([*model.parameters(), unused], lr=0.01, weight_decay=0.5),
                         **options)
    _train(opt, model, x, y, 4)
    assert unused.grad is None and torch.equal(unused.detach(), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("base_name", ["sgd", "adam"])
def test_neutral_options_equal_base_optimizer_exactly(name, base_name):
    """Under its ``neutral_options`` (SAM family: rho=0) every method is its base optimizer, bit for bit."""
    make_base = {
        "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    }[base_name]
    m_ours, m_base = mlp(0), mlp(0)
    x, y = classification_data(0)
    neutral = sharpness.get_optimizer_info(name).neutral_options
    assert neutral, f"{name} declares no neutral_options"
    ours = make_optimizer(name, make_base(m_ours.parameters()), **neutral)
    base = make_base(m_base.parameters())
    for _ in range(15):
        ours.step(make_closure(ours, m_ours, x, y))
        base.zero_grad()
        nn.functional.cross_entropy(m_base(x), y).backward()
        base.step()
    assert params_equal(m_ours, m_base)


@pytest.mark.parametrize("name", NAMES)
def test_schedulers_drive_the_shared_param_groups(name):
    model = mlp(0)
    x, y = classification_data(0)
    opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=20)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    for t in range(10):
        opt.step(make_closure(opt, model, x, y))
        sched.step()
    expected = 0.1 * (1 + math.cos(math.pi * 10 / 20)) / 2
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert sched.get_last_lr()[0] == pytest.approx(expected)
    step_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        opt.step(make_closure(opt, model, x, y))
        step_sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected * 0.25)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_lockstep(name):
    """Save mid-run, load into fresh objects through torch.save(weights_only=True): bit-identical continuation."""
    x, y = classification_data(3)
    model = mlp(0)
    opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=30)
    _train(opt, model, x[:32], y[:32], 7)

    saved = checkpoint_round_trip(model, opt)
    model2 = mlp(5)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    opt2 = make_optimizer(name, torch.optim.SGD(model2.parameters(), lr=0.5), total_steps=30)
    opt2.load_state_dict(saved["opt"])

    for t in range(12):
        xb, yb = x[(t % 2) * 32:(t % 2) * 32 + 32], y[(t % 2) * 32:(t % 2) * 32 + 32]
        opt.step(make_closure(opt, model, xb, yb))
        opt2.step(make_closure(opt2, model2, xb, yb))
    assert params_equal(model, model2)
    for key in ("steps", "sam_steps", "grad_evals"):
        assert getattr(opt, key) == getattr(opt2, key)
    s1, s2 = native(opt.state_dict()), native(opt2.state_dict())
    assert s1["param_groups"] == s2["param_groups"]
    assert_nested_equal(s1["state"], s2["state"])
    assert_nested_equal(s1["sharpness"], s2["sharpness"])


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_repr(name):
    model = mlp(0)
    x, y = classification_data(0)
    opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1))
    _train(opt, model, x, y, 3)
    clone = copy.deepcopy(opt)
    assert clone.steps == opt.steps and clone.grad_evals == opt.grad_evals
    assert clone.param_groups is clone.base_optimizer.param_groups
    assert clone.param_groups[0]["params"][0] is not opt.param_groups[0]["params"][0]
    text = repr(opt)
    assert type(opt).__name__ in text and "SGD" in text


@pytest.mark.parametrize("copier", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", NAMES)
def test_a_copy_with_its_lr_scheduler_trains_on_its_own(name, copier):
    """``(model, optimizer, scheduler)`` copied together mid-run (deepcopy, or torch.save/torch.load of the
    objects) continue as the original does, bit for bit, and stepping the copy leaves the original alone.

    An LR scheduler patches ``step`` onto the optimizer instance, a closure over a weak reference to it; the
    wrappers copied it, so the copy's ``step`` drove the original (and pickling failed). Hooks are dropped on
    copy, as torch.optim drops them."""
    model = mlp(0)
    x, y = classification_data(0)
    opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=8)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.register_step_pre_hook(lambda o, args, kwargs: None)

    def train(opt, scheduler, model, steps):
        for _ in range(steps):
            opt.step(make_closure(opt, model, x, y))
            scheduler.step()

    train(opt, scheduler, model, 2)
    if copier == "deepcopy":
        model2, opt2, scheduler2 = copy.deepcopy((model, opt, scheduler))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt, scheduler), buffer)
        buffer.seek(0)
        model2, opt2, scheduler2 = torch.load(buffer, weights_only=False)
    assert not opt2._optimizer_step_pre_hooks
    before = [p.detach().clone() for p in model.parameters()]
    counts = (opt.steps, opt.grad_evals)
    train(opt2, scheduler2, model2, 2)
    assert params_equal(list(model.parameters()), before) and (opt.steps, opt.grad_evals) == counts
    train(opt, scheduler, model, 2)
    assert params_equal(model, model2) and not params_equal(list(model.parameters()), before)
    assert (opt2.steps, opt2.grad_evals) == (opt.steps, opt.grad_evals)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.1 * 0.5 ** 4


@pytest.mark.parametrize("name", NAMES)
def test_an_optimizer_built_on_a_meta_model_trains_like_one_built_on_the_real_model(name):
    """Build the model on ``meta``, the optimizer on it, then ``to_empty`` + load the weights (deferred
    initialization): the steps, checkpoints and random streams equal those of an optimizer built on the real
    model. Universal SAM created its generator on the parameters' device at construction and failed on meta.

    ``to_empty`` keeps the parameter objects (which the optimizer holds) only when modules swap tensors on
    conversion, torch's future default (``torch.__future__``); without it even ``torch.optim.SGD`` would
    hold the meta tensors."""
    reference = mlp(0)
    x, y = classification_data(0)
    with torch.device("meta"):
        model = mlp(0)
    opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=6)
    early = opt.state_dict()  # a checkpoint of the fresh optimizer, taken on meta
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    assert opt.param_groups[0]["params"][0] is next(model.parameters())
    model.load_state_dict(reference.state_dict())
    expected_opt = make_optimizer(name, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9),
                                  total_steps=6)
    assert _train(opt, model, x, y, 3) == _train(expected_opt, reference, x, y, 3)
    assert params_equal(model, reference)
    assert_nested_equal(native(opt.state_dict())["sharpness"], native(expected_opt.state_dict())["sharpness"])
    opt.load_state_dict(early)  # back to the start of the streams
    expected_opt.load_state_dict(early)
    assert _train(opt, model, x, y, 2) == _train(expected_opt, reference, x, y, 2)


@pytest.mark.parametrize("measure", ["trace", "frobenius", "det", "worst"])
def test_universal_sam_pickles_with_every_measure(measure):
    model = mlp(0)
    opt = sharpness.UniversalSAM(torch.optim.SGD(model.parameters(), lr=0.1), measure=measure, rho=0.05,
                                 num_samples=2)
    clone = pickle.loads(pickle.dumps(opt))
    s = torch.tensor([2.0, 0.5], dtype=torch.float64)
    for name in ("phi", "psi", "psi_prime", "phi_grad"):
        f, g = getattr(opt.measure, name), getattr(clone.measure, name)
        if f is not None:
            assert torch.equal(f(s), g(s)), name
    if opt.measure.log_normalizer is not None:
        assert opt.measure.log_normalizer(3) == clone.measure.log_normalizer(3)


@pytest.mark.parametrize("name", NAMES)
def test_maximize_equals_minimizing_the_negated_loss_or_is_refused(name):
    """torch.optim's meaning of ``maximize=True`` on L: the run of ``maximize=False`` on -L. A method whose
    sharpness term climbs the loss it is given (SAM's ``+rho g/||g||``) would take the wrong side, so it refuses
    such a base optimizer and such a param group; the others must equal the negated-loss run."""
    x, y = classification_data(0)

    def run(maximize):
        model = mlp(0)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=maximize)
        opt = make_optimizer(name, base, total_steps=8)
        sign = -1.0 if maximize else 1.0  # L = -CE maximized, or -L = CE minimized
        for _ in range(4):
            def closure():
                opt.zero_grad()
                loss = sign * nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        return model

    cls = sharpness.get_optimizer_info(name).cls
    if not cls.supports_maximize:
        with pytest.raises(ValueError, match="Invalid maximize value: True"):
            run(True)
        model = mlp(0)
        opt = make_optimizer(name, torch.optim.SGD(model[0].parameters(), lr=0.1), total_steps=8)
        with pytest.raises(ValueError, match="Invalid maximize value: True"):
            opt.add_param_group({"params": model[2].parameters(), "maximize": True})
        assert len(opt.param_groups) == 1
        return
    maximized, minimized = run(True), run(False)
    for a, b in zip(maximized.parameters(), minimized.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not params_equal(maximized, mlp(0))


@pytest.mark.parametrize("name", NAMES)
def test_a_base_optimizer_whose_step_needs_a_closure_is_refused(name):
    """LBFGS evaluates the loss itself; the wrappers call the base's ``step()`` without a closure, so it used to
    fail after both passes, with the counters advanced. SALR passes its closure on and accepts it."""
    model = mlp(0)
    if name == "salr":
        opt = make_optimizer(name, torch.optim.LBFGS(model.parameters(), lr=0.1))
        x, y = classification_data(0)
        opt.step(make_closure(opt, model, x, y))
        assert not params_equal(model, mlp(0))
        return
    with pytest.raises(TypeError, match="cannot wrap LBFGS: its step\\(\\) requires a closure"):
        make_optimizer(name, torch.optim.LBFGS(model.parameters(), lr=0.1), total_steps=8)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_reaches_base_and_gets_the_wrapper_defaults(name):
    model = mlp(0)
    opt = make_optimizer(name, torch.optim.SGD(model[0].parameters(), lr=0.1))
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["momentum"] == 0 and opt.param_groups[1]["lr"] == 0.01
    for key, value in opt.defaults.items():  # the wrapper's own per-group options (rho, ...) reach new groups
        if key != "lr":
            assert opt.param_groups[1][key] == value, key


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_run_once_per_step_on_the_wrapper_and_its_base(name):
    """torch.optim's ``register_step_pre_hook`` / ``register_step_post_hook`` work on every wrapper: once per
    ``step`` however many passes it takes, and the base optimizer's own hooks once per base update.

    An engine instance is built first: torch.optim then wraps the engine class's own ``step`` with the hooks too,
    and ESAM's and SSAM-F's ``step`` called it, so their hooks ran twice after any direct use of the engine."""
    model = mlp(0)
    x, y = classification_data(0)
    sharpness.SharpnessAwareOptimizer(torch.optim.SGD(mlp(1).parameters(), lr=0.1),
                                      rule=sharpness.rules.SAMPerturbation(), policy=sharpness.policies.Always())
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = make_optimizer(name, base, total_steps=8)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    base.register_step_post_hook(lambda o, args, kwargs: calls.append(("base", o is base)))
    _train(opt, model, x, y, 3)
    assert calls == [("pre", True), ("base", True), ("post", True)] * 3


def _register_state_dict_hooks(opt, calls):
    """Hooks of all four kinds that log their calls; the save post-hook and the load pre-hook return new dicts
    (torch.optim's rule: a returned dict replaces the one being saved or loaded)."""

    def tag_saved(o, state):
        calls.append(("save-post", o is opt, "param_groups" in state))
        return {**state, "tag": 7}

    def set_lr_on_load(o, state):
        calls.append(("load-pre", o is opt, state.get("tag")))
        state = {k: v for k, v in state.items() if k != "tag"}
        state["param_groups"] = [{**group, "lr": 0.5} for group in state["param_groups"]]
        return state

    opt.register_state_dict_pre_hook(lambda o: calls.append(("save-pre", o is opt)))
    opt.register_state_dict_post_hook(tag_saved)
    opt.register_load_state_dict_pre_hook(set_lr_on_load)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", o is opt)))


def test_state_dict_hooks_on_plain_torch_sgd_are_the_reference():
    """The calls and return-value rules the wrappers must reproduce, read off torch.optim.SGD itself."""
    opt = torch.optim.SGD(mlp(0).parameters(), lr=0.1)
    calls = []
    _register_state_dict_hooks(opt, calls)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert state["tag"] == 7 and opt.param_groups[0]["lr"] == 0.5
    assert calls == [("save-pre", True), ("save-post", True, True), ("load-pre", True, 7), ("load-post", True)]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_run_once_on_every_wrapper(name):
    """State-dict hooks registered on a wrapper run once per ``state_dict``/``load_state_dict``, however many
    classes and mixins in its MRO override them, in torch.optim's order and with its return-value rules (the
    reference test above); the post-hook sees the whole state, the base optimizer's hooks run on the base."""
    model = mlp(0)
    x, y = classification_data(0)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = make_optimizer(name, base, total_steps=8)
    _train(opt, model, x, y, 2)
    calls = []
    _register_state_dict_hooks(opt, calls)
    base.register_state_dict_pre_hook(lambda o: calls.append(("base", o is base)))
    state = opt.state_dict()
    assert state["tag"] == 7 and "sharpness" in state["param_groups"][0]  # the post-hook saw the public layout
    opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == base.param_groups[0]["lr"] == 0.5
    assert calls == [("save-pre", True), ("base", True), ("save-post", True, True), ("load-pre", True, 7),
                     ("load-post", True)]
    calls.clear()
    _train(opt, model, x, y, 1)  # the flags that keep the hooks to the outermost call are cleared
    opt.state_dict()
    assert calls == [("save-pre", True), ("base", True), ("save-post", True, True)]


def test_state_dict_hooks_of_salr_and_of_its_inner_sam_run_on_each():
    """SALR around SAM: two optimizer instances, each running its own hooks once."""
    model = mlp(0)
    inner = sharpness.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    opt = sharpness.SALR(inner)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("salr"))
    inner.register_state_dict_pre_hook(lambda o: calls.append("sam"))
    inner.register_load_state_dict_post_hook(lambda o: calls.append("sam-load"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["salr", "sam", "sam-load"]


@pytest.mark.parametrize("name", ["sam", "aesam", "looksam"])
def test_step_hooks_run_once_per_two_phase_step_and_a_scheduler_does_not_warn(name):
    """The two-phase API (first_step / second_step) runs the hooks step(closure) runs, once per step, on SAM and
    on ERM branches; and an LR scheduler built on the wrapper sees the step taken (no false warning)."""
    model = mlp(0)
    x, y = classification_data(0)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = make_optimizer(name, base, total_steps=6)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls, branches = [], []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", args == (opt,), kwargs == {})))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", args == (opt,), kwargs == {})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected call of lr_scheduler.step() before optimizer.step()"
        for _ in range(6):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            perturbed = opt.first_step(zero_grad=True)
            branches.append(perturbed)
            if perturbed:
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            scheduler.step()
    assert calls == [("pre", True, True), ("post", True, True)] * 6
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    if name == "looksam":  # SAM steps every k and reuse steps between: both branches ran the hooks
        assert True in branches and False in branches, branches
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o,), {"closure": None}))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="a step pre-hook returned new arguments; the two-phase API takes none"):
        opt.first_step()


def test_add_param_group_gets_the_given_rho():
    model = mlp(0)
    opt = sharpness.SAM(torch.optim.SGD(model[0].parameters(), lr=0.1), rho=0.07)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    assert opt.param_groups[1]["rho"] == 0.07


def test_per_group_rho_is_used():
    """A group with rho=0 is not perturbed: its SAM update equals the plain gradient step."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = sharpness.SAM(torch.optim.SGD([{"params": [a], "rho": 0.0}, {"params": [b]}], lr=0.1), rho=0.3)

    def loss_fn():
        return (a * b).sum() ** 2 + a.pow(4).sum()

    # Reference: e only on b, with the norm taken over both parameters' gradients.
    ga, gb = torch.autograd.grad(loss_fn(), [a, b])
    norm = torch.cat([ga, gb]).norm()
    eb = 0.3 * gb / norm
    b_pert = (b + eb).detach().requires_grad_()
    ga_s, gb_s = torch.autograd.grad((a * b_pert).sum() ** 2 + a.pow(4).sum(), [a, b_pert])
    expected_a, expected_b = a.detach() - 0.1 * ga_s, b.detach() - 0.1 * gb_s

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(a.detach(), expected_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.detach(), expected_b, rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    rho=st.floats(min_value=1e-3, max_value=10.0),
    eta=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_perturbation_lies_on_the_sphere(rho, eta, seed):
    """SAM: ||e|| = rho; ASAM: ||T^-1 e|| = rho (the constraint of each paper's inner maximization)."""
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(5, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)]
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in w]
    view = sharpness.rules.ParamGroupView({"rho": rho}, [t.clone() for t in w], [t.clone() for t in grads])
    sharpness.rules.SAMPerturbation().perturb_([view])
    e = torch.cat([(p - q).reshape(-1) for p, q in zip(view.params, w)])
    assert e.norm().item() == pytest.approx(rho, rel=1e-9)

    view = sharpness.rules.ParamGroupView({"rho": rho}, [t.clone() for t in w], [t.clone() for t in grads])
    sharpness.rules.ASAMPerturbation(eta=eta).perturb_([view])
    scaled = torch.cat([((p - q) / (q.abs() + eta)).reshape(-1) for p, q in zip(view.params, w)])
    assert scaled.norm().item() == pytest.approx(rho, rel=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_host_read_fast_paths_agree_with_the_device_paths(name, monkeypatch):
    """On the CPU a 0-d scale is read for free and the climb is one fused pass (``_foreach.host_read_is_free``);
    the device path (no read) gives the same trajectory up to float64 rounding."""
    x, y = classification_data(1)
    models = []
    for free in (True, False):
        monkeypatch.setattr(sharpness._foreach, "host_read_is_free", lambda tensor, free=free: free)
        model = mlp(0).double()
        opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=12)
        _train(opt, model, x.double(), y, 12)
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base", ["AdamW", "SGD"])
@pytest.mark.parametrize("name", NAMES)
def test_fused_and_single_tensor_base_optimizers_give_the_foreach_trajectory(name, base):
    """A base optimizer built with ``fused=True`` (torch's fused CPU/CUDA kernels) or ``foreach=False`` is
    wrapped as it is: the same weights as with ``foreach=True`` after 4 steps (float64, to rounding)."""
    x, y = classification_data(2)
    options = {"AdamW": {"lr": 1e-2, "weight_decay": 0.1}, "SGD": {"lr": 0.1, "momentum": 0.9}}[base]
    weights = {}
    for kind in ("foreach", "fused", "single"):
        model = mlp(0)
        flag = {"foreach": {"foreach": True}, "fused": {"fused": True}, "single": {"foreach": False}}[kind]
        opt = make_optimizer(name, getattr(torch.optim, base)(model.parameters(), **options, **flag), total_steps=8)
        torch.manual_seed(0)
        _train(opt, model, x, y, 4)
        weights[kind] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(weights["foreach"], torch.cat([p.detach().flatten() for p in mlp(0).parameters()]))
    for kind in ("fused", "single"):
        torch.testing.assert_close(weights[kind], weights["foreach"], rtol=1e-10, atol=1e-12)


def test_sam_climb_on_the_cpu_with_eps_zero_and_a_zero_gradient_stays_put():
    w = [torch.randn(4), torch.randn(3)]
    view = sharpness.rules.ParamGroupView({"rho": 0.5}, [t.clone() for t in w], [torch.zeros(4), torch.zeros(3)])
    sharpness.rules.SAMPerturbation(eps=0.0).perturb_([view])
    assert all(torch.equal(p, q) for p, q in zip(view.params, w))


@pytest.mark.parametrize("free", [True, False])
def test_sam_climb_lets_a_nan_gradient_norm_through_on_both_read_paths(free, monkeypatch):
    """A NaN gradient is not silently dropped by the CPU climb: the weights become NaN, as on a device, where the
    non-finite check (not the climb) is what stops it."""
    monkeypatch.setattr(sharpness._foreach, "host_read_is_free", lambda tensor: free)
    view = sharpness.rules.ParamGroupView({"rho": 0.5}, [torch.randn(4), torch.randn(3)],
                                          [torch.tensor([1.0, float("nan"), 0.0, 2.0]), torch.ones(3)])
    sharpness.rules.SAMPerturbation().perturb_([view])
    assert all(torch.isnan(p).all() for p in view.params)


def test_composition_any_policy_with_any_rule():
    """The generic engine composes ASAM's rule with AE-SAM's policy and LookSAM's reuse."""
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.SharpnessAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
        rule=sharpness.rules.ASAMPerturbation(),
        policy=sharpness.policies.Adaptive(total_steps=40),
        rho=0.5,
        reuse_alpha=0.5,
    )
    losses = _train(opt, model, x, y, 40)
    assert losses[-1] < 0.6 * losses[0]
    assert 0 < opt.sam_steps < opt.steps


@pytest.mark.parametrize("name", NAMES)
def test_foreach_and_single_tensor_paths_agree(name):
    """``foreach=False`` runs the same algorithm one tensor at a time: identical weights and state."""
    x, y = classification_data(1)
    models, opts = [], []
    for foreach in (None, False):
        model = mlp(0)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
        opt = make_optimizer(name, base, total_steps=12, foreach=foreach)
        assert opt.foreach is foreach
        _train(opt, model, x, y, 12)
        models.append(model)
        opts.append(opt)
    assert params_equal(*models)
    assert_nested_equal(opts[0].state_dict(), opts[1].state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_are_optimized_as_their_real_view_or_refused(name):
    """torch.optim's convention: a complex parameter is optimized as ``torch.view_as_real`` of it. A class whose
    arithmetic is not written for complex tensors (norms cast to complex, ``<g, g_s>`` without conjugation,
    complex noise with half the variance per component) refuses them instead of failing or drifting."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, dtype=torch.complex128)
    target = torch.randn(16, 3, dtype=torch.complex128)
    start = torch.randn(4, 3, dtype=torch.complex128) * 0.5

    def run(as_complex):
        param = (start.clone() if as_complex else torch.view_as_real(start).clone()).requires_grad_()
        weight = (lambda: param) if as_complex else (lambda: torch.view_as_complex(param))
        options = {"update_freq": 1, "num_samples": 16} if name == "ssamf" else {}  # a mask from the first step
        opt = make_optimizer(name, torch.optim.SGD([param], lr=0.05, momentum=0.9), total_steps=8, **options)

        def per_sample(reduction):
            losses = (x @ weight() - target).abs().pow(2).mean(1)
            return losses if reduction == "none" else losses.mean()

        for _ in range(3):
            opt.step(sharpness.make_closure(opt, per_sample))
        return torch.view_as_real(weight().detach())

    if not sharpness.get_optimizer_info(name).cls.supports_complex:
        with pytest.raises(ValueError, match="Invalid parameter dtype: complex"):
            run(True)
        return
    real = run(False)
    torch.testing.assert_close(run(True), real, rtol=0, atol=1e-12)
    assert not torch.equal(real, torch.view_as_real(start))
