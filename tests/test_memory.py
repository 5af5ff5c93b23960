"""Memory of every registered optimizer: parameter-sized state at rest, no parameter-sized allocation per step,
and a step's peak (closures included) against plain SGD's.

The budgets below are the issue's targets (SAM family: one buffer beyond the base optimizer, the weight backup)
and, for the methods whose update needs more, the count their docstrings state. A change that adds a buffer
fails here; one that removes a buffer must lower the budget (and the docs).
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers import create_for_test, make_closure, registered_names
from sharpness import _foreach
from sharpness._ops import OpCounter, cpu_peak_bytes

#: parameter-sized floating-point buffers the optimizer itself keeps between steps (the base optimizer's
#: momentum is not counted), with default options
BUFFERS_AT_REST = {
    "erm": 0,
    "sam": 1,  # the weight backup
    "asam": 1,  # |w| + eta is built in the backed-up parameters
    "sssam": 1,
    "aesam": 1,
    "esam": 1,  # the coordinate mask is drawn into the backed-up parameters
    "ssamf": 1,  # + the boolean Fisher mask; + the Fisher sum while a refresh collects samples (16 steps here)
    "smoothout": 1,  # the noise is drawn into the parameters
    "looksam": 2,  # backup + g_v (the clean gradient is kept in g_v's buffer during a SAM step)
    "aelooksam": 2,
    "gsam": 2,  # backup + the clean gradient, which the update combines with g_s
    "gnr": 2,  # backup + the oracle gradient
    "tracesam": 2,  # backup + g_0 (m = 1: the one perturbed gradient is used where it lies)
    "detsam": 2,
    "frobsam": 3,  # backup + g_0 + g_1 (m = 2)
    "salr": 2,  # backup and g(w): the walks move the weights themselves, along g scaled by gamma / ||g||
    "entropysgd": 3,  # anchor, running mean, noise (views of one flat buffer per bucket)
}

#: (name, options) whose budget depends on an option
BUFFERS_WITH_OPTIONS = [
    ("tracesam", {"num_samples": 4}, 3),  # m - 1 = 3 > n = 1: one running sum
    ("frobsam", {"num_samples": 5}, 4),  # m - 1 = 4 > n = 2: two running sums
    ("frobsam", {"num_samples": 3}, 4),  # m - 1 = 2 <= n = 2: the two earlier gradients
    ("salr", {"normalization": "per_sample"}, 4),  # + d(w) from the training pass and d(w + e) (per-sample means)
]


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, x, y


def _state_buffers(name: str, steps: int = 20, **options) -> tuple[float, float]:
    """(float, bool) bytes of the optimizer's own state after ``steps`` steps, in units of the parameter bytes."""
    model, x, y = _problem()
    opt = create_for_test(name, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                          standard_closure=False, **options)
    closure = make_closure(opt, model, x, y)
    for _ in range(steps):
        opt.step(closure)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floating = boolean = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                size = value.numel() * value.element_size()
                if value.dtype == torch.bool:
                    boolean += size
                else:
                    floating += size
    return floating / param_bytes, boolean / param_bytes


def test_every_registered_optimizer_has_a_budget():
    assert sorted(BUFFERS_AT_REST) == sorted(registered_names())


@pytest.mark.parametrize("name", registered_names())
def test_state_at_rest_is_the_methods_buffer_budget(name):
    floating, boolean = _state_buffers(name)
    assert floating == BUFFERS_AT_REST[name]
    assert boolean == (pytest.approx(1 / 8) if name == "ssamf" else 0)  # one byte per float64 weight


@pytest.mark.parametrize("name, options, budget", BUFFERS_WITH_OPTIONS)
def test_state_budget_follows_the_options(name, options, budget):
    assert _state_buffers(name, **options)[0] == budget


class _FreshLargeTensors(TorchDispatchMode):
    """Records every op whose output is a newly allocated tensor of at least ``threshold`` elements."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.paused = False
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and t.numel() >= self.threshold
                        and t.untyped_storage().data_ptr() not in inputs):
                    self.ops[str(func)] += 1
        return out


#: parameter-sized allocations a method makes per step that are not bookkeeping
ALLOWED_ALLOCATIONS: dict[str, dict[str, int]] = {}


@pytest.mark.parametrize("name", registered_names())
def test_no_parameter_sized_allocation_in_a_step(name, monkeypatch):
    """Outside the gradient passes themselves (the closure, and the backward calls an optimizer makes for
    per-sample losses or Hessian-vector products), a step allocates no tensor as large as the 32x64 weight."""
    model, x, y = _problem()
    opt = create_for_test(name, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), standard_closure=False)
    mode = _FreshLargeTensors(threshold=32 * 64)

    def paused(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            before, mode.paused = mode.paused, True
            try:
                return fn(*args, **kwargs)
            finally:
                mode.paused = before
        return wrapper

    monkeypatch.setattr(torch.autograd, "backward", paused(torch.autograd.backward))
    monkeypatch.setattr(torch.autograd, "grad", paused(torch.autograd.grad))
    closure = paused(make_closure(opt, model, x, y))
    for _ in range(3):  # scratch buffers are allocated on first use
        opt.step(closure)
    with mode:
        for _ in range(10):
            opt.step(closure)
    assert dict(mode.ops) == ALLOWED_ALLOCATIONS.get(name, {})


#: parameter-sized sets a step holds at its peak beyond plain SGD's (one gradient), with default options
PEAK_BEYOND_SGD = {
    "gnr": 1,  # g(w_adv) together with H g(w_adv) (the double backward's result, or the shifted pass's gradient)
    "ssamf": 1,  # the Fisher sum, allocated while a refresh collects samples (the profiled steps do)
}
PEAK_WITH_OPTIONS = [
    ("gnr", {"hvp": "finite_difference"}, 1),
    ("gnr", {"oracle": "sam"}, 2),  # f lives through the oracle's pass, whose create_graph backward clones
    ("frobsam", {"num_samples": 3}, 0),  # the kept gradients of passes 1..m-1 are state, not peak
    ("frobsam", {"num_samples": 5}, 0),  # running sums
    ("entropysgd", {"langevin_steps": 3}, 0),
]


def _steady_peak(name: str | None, options: dict) -> float:
    """A step's peak in parameter-sized sets (the largest of three profiled steps, see cpu_peak_bytes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3)).double()  # the 256x256 weight dominates
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 256, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name is None:
        def step():
            base.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            base.step()
    else:
        opt = create_for_test(name, base, standard_closure=False, **options)
        closure = make_closure(opt, model, x, y)

        def step():
            opt.step(closure)
    for _ in range(3):
        step()
    return cpu_peak_bytes(step) / sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("name, options, budget", [*((n, {}, PEAK_BEYOND_SGD.get(n, 0)) for n in registered_names()),
                                                   *PEAK_WITH_OPTIONS])
def test_peak_memory_of_a_step_is_sgds_plus_the_methods_own(name, options, budget):
    """The peak during a whole step (closures included) exceeds plain SGD's by the method's own budget of
    parameter-sized sets, measured, not derived. State kept between steps is not in the peak (it is there at
    the start); what is, is a set of gradient tensors a list in the step kept alive while the next closure
    ran (its ``zero_grad`` could not free them before the backward allocated new ones): Trace/Frob/Det-SAM,
    SALR, GNR and Entropy-SGD held one to three such sets."""
    excess = _steady_peak(name, options) - _steady_peak(None, {})
    assert excess == pytest.approx(budget, abs=0.2)


#: scalar reads per step a method needs (everything else must stay on the device); 10 steps below
SCALAR_READS_PER_10_STEPS = {
    "aesam": 10,  # ||g||^2 against the running normal model: the SAM-or-not decision, once per step
    "aelooksam": 10,
    "salr": 5,  # the sharpness estimate (every 2 steps) joins the host-side history whose median scales the LR
    "sssam": 10,  # the coin, from a private *CPU* generator: a host read, never a device synchronisation
}


@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("name", registered_names())
def test_scalar_reads_per_step_are_the_methods_own(name, max_grad_norm, check_finite, monkeypatch):
    """No host synchronisation beyond the method's own decision (#9), counted at the dispatcher outside the
    closure over 10 steps, with and without clipping; the non-finite-loss check (default) adds exactly one.
    The CPU-only fast paths (a free read of a 0-d scale) are turned off: this counts what a GPU step reads."""
    monkeypatch.setattr(_foreach, "host_read_is_free", lambda tensor: False)
    model, x, y = _problem()
    opt = create_for_test(name, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), standard_closure=False,
                          max_grad_norm=max_grad_norm, check_finite=check_finite)
    mode = OpCounter()
    inner = make_closure(opt, model, x, y)

    def closure():
        with mode.pause():
            return inner()

    for _ in range(3):
        opt.step(closure)
    with mode:
        for _ in range(10):
            opt.step(closure)
    assert mode.reads == SCALAR_READS_PER_10_STEPS.get(name, 0) + (10 if check_finite else 0)


def test_the_scalar_read_probe_sees_an_item_call():
    mode = OpCounter()
    t = torch.ones(3)
    with mode:
        t.sum().item()
        bool(t.any())
    assert mode.reads == 2 and mode.kernels == 2  # sum, any; the reads are not kernels


def test_the_peak_probe_sees_two_live_temporaries():
    """The peak probe is not blind: two 2 MiB tensors alive together peak at 4 MiB, freed in turn at 2 MiB."""
    def together():
        a = torch.ones(1 << 18, dtype=torch.float64)
        b = a * 2
        del a, b

    def in_turn():
        a = torch.ones(1 << 18, dtype=torch.float64)
        del a
        b = torch.ones(1 << 18, dtype=torch.float64)
        del b

    assert cpu_peak_bytes(together) == pytest.approx(4 << 20, rel=0.01)
    assert cpu_peak_bytes(in_turn) == pytest.approx(2 << 20, rel=0.01)


def test_the_allocation_probe_sees_an_allocating_update():
    """The probe is not blind: an out-of-place update of the weight is one fresh parameter-sized tensor."""
    model, _, _ = _problem()
    weight = model[0].weight
    mode = _FreshLargeTensors(threshold=32 * 64)
    with torch.no_grad(), mode:
        weight.add_(weight * 0.5)
        weight.mul_(0.5)
    assert dict(mode.ops) == {"aten.mul.Tensor": 1}


def test_scratch_lists_are_reused_and_rebuilt_when_the_parameters_move():
    from sharpness.optim._state import ScratchLists

    params = [torch.zeros(3), torch.zeros(2, 2)]
    state: dict = {p: {} for p in params}
    cache = ScratchLists()
    first = cache.get(state, params, "k")
    assert cache.get(state, params, "k") is first  # validated once, then reused
    assert [b.shape for b in first] == [p.shape for p in params]
    params[1].data = torch.zeros(5, dtype=torch.float64)  # new storage, shape and dtype: rebuilt
    second = cache.get(state, params, "k")
    assert second is not first and second[1].shape == (5,) and second[1].dtype == torch.float64
    assert second[0] is first[0]  # the unchanged parameter keeps its buffer
    state[params[0]].clear()  # the state was replaced (e.g. by a load): rebuilt from the state
    third = cache.get(state, params, "k")
    assert third is not second and state[params[0]]["k"] is third[0]
    import copy
    import pickle
    assert copy.deepcopy(cache)._lists == {} and pickle.loads(pickle.dumps(cache))._lists == {}


#: SAM's update beyond its base optimizer's step, by hand: back up w; ||g|| as per-tensor norms, their stack and
#: the norm of the stack; then the climb, on a device ``+ eps``, ``g /= ...``, ``w += rho g`` (no read), on the
#: CPU one read of the norm and ``w += (rho / (||g|| + eps)) g``; restore w
_CLIMB = {"device": {"add": 1, "_foreach_div_": 1, "_foreach_add_": 1},
          "cpu": {"_local_scalar_dense": 1, "_foreach_add_": 1}}
_NORM = {"_foreach_norm": 1, "stack": 1, "linalg_vector_norm": 1}
#: the finite check before the base step (``check_finite``): the largest per-tensor norm of g_s (norms, their
#: stack, its max), read once (on a device the step's one host synchronisation; a closure's losses join it)
_FINITE = {"_foreach_norm": 1, "stack": 1, "max": 1, "_local_scalar_dense": 1}
#: ASAM adds: T_w = |w| + eta built in the parameters (abs, add), T g and T^2 g (two muls), w back from the
#: backup before the climb (a third copy)
UPDATE_OPS = {
    ("sam", read): dict(Counter({"_foreach_copy_": 2, **_NORM}) + Counter(_CLIMB[read]) + Counter(_FINITE))
    for read in _CLIMB
} | {
    ("asam", read): dict(Counter({"_foreach_copy_": 3, "_foreach_abs_": 1, "_foreach_add_": 1, "_foreach_mul_": 2,
                                  **_NORM}) + Counter(_CLIMB[read]) + Counter(_FINITE)) for read in _CLIMB
}


@pytest.mark.parametrize("read", ["device", "cpu"])
@pytest.mark.parametrize("name", ["sam", "asam"])
def test_the_update_dispatches_exactly_its_kernels(name, read, monkeypatch):
    """The bookkeeping of a SAM/ASAM update is the algorithm's own kernels and nothing else (#9: in a host-bound
    GPU step every extra dispatch costs a launch): counted at the dispatcher, minus one step of the same base
    optimizer alone."""
    if read == "device":
        monkeypatch.setattr(_foreach, "host_read_is_free", lambda tensor: False)
    model, x, y = _problem()
    opt = create_for_test(name, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), standard_closure=False)
    reference = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # the same base step, on its own
    closure = make_closure(opt, model, x, y)
    for _ in range(2):
        opt.step(closure)
    closure()
    reference.step()  # its momentum buffers exist before counting, as the wrapped base's do
    with OpCounter() as ours:
        opt.first_step()
        opt.second_step()
    with OpCounter() as base:
        reference.step()
    assert dict(ours.ops - base.ops) == UPDATE_OPS[name, read]
    assert not base.ops - ours.ops  # the base step itself runs unchanged inside second_step


def test_flat_scratch_views_share_one_buffer_per_bucket_and_are_rebuilt_when_the_parameters_change():
    from sharpness.optim._state import ScratchLists

    params = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(4, dtype=torch.float64), torch.zeros(5)]
    state: dict = {p: {} for p in params}
    cache = ScratchLists()
    flats, views = cache.get_flat(state, params, "k")
    assert sorted(f.numel() for f in flats) == [4, 12]  # float32 (3 + 4 + 5) and float64 (4)
    assert [v.shape for v in views] == [p.shape for p in params] and all(v.dtype == p.dtype for v, p in zip(views, params))
    assert all(state[p]["k"] is v for p, v in zip(params, views))
    for flat in flats:
        flat.fill_(7.0)
    assert all(bool((v == 7).all()) for v in views)  # the views are the flat buffers
    assert cache.get_flat(state, params, "k")[1] is views  # reused
    params[1].data = torch.zeros(6)  # a new shape: its bucket is rebuilt, the float64 one is kept
    flats2, views2 = cache.get_flat(state, params, "k")
    assert views2[1].shape == (6,) and views2[2] is views[2] and views2[0] is not views[0]
    assert sorted(f.numel() for f in flats2) == [4, 14]
