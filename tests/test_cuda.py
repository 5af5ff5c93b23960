"""The library on a CUDA device, checked against CPU references (skipped without a GPU).

* every registered optimizer: a few float64 steps on the device equal the same steps on CPU (weights, losses,
  counters, the whole optimizer state); methods with a random stream on the device get the *same* stream in the
  CPU reference (a generator on the device, which their "draw on the generator's device" branch supports);
* all optimizer state lives on the parameters' device, and checkpoints cross devices;
* host synchronisations per step, counted by ``torch.cuda.set_sync_debug_mode("warn")``, are the scalar reads
  ``test_memory.py`` budgets (that probe counts ``.item()`` calls at the dispatcher, on CPU);
* Hessian eigenvalues, trace and the dense Hessian on the device against a CPU ``torch.autograd`` Hessian;
* fp16 autocast with a ``GradScaler`` through SAM.

On a GPU machine: ``python -m pytest tests/test_cuda.py -q -rs``. To check the logic without a GPU,
``SHARPNESS_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py -q`` runs everything on CPU (CPU against CPU;
the synchronisation tests and the cross-device-type checkpoint test skip).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import sharpness
from helpers import classification_data, create_for_test, make_closure, mlp, registered_names
from sharpness.measures import dense_hessian, hessian_eigenvalues, hessian_trace
from test_amp import MIXED, scaled_closure
from test_hessian import _mlp as float64_mlp
from test_memory import SCALAR_READS_PER_10_STEPS, _problem

DEVICE = torch.device(os.environ.get("SHARPNESS_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")

CPU = torch.device("cpu")
# float64 on both devices: the only differences are the reduction orders of the kernels (rounding level)
RTOL, ATOL = 1e-9, 1e-11

#: methods drawing from a private generator on the parameters' device (where the draws happen)
DEVICE_STREAMS = {
    "esam": "coordinate masks (engine rule, `_rng`)",
    "smoothout": "the weight noise (`_rng`)",
    "entropysgd": "the SGLD noise (`_rng`)",
    "tracesam": "the Gaussian directions (`generator`)",
    "frobsam": "the Gaussian directions (`generator`)",
    "detsam": "the uniform directions (`generator`)",
}
# SS-SAM's coin comes from a private *CPU* generator (policies.Bernoulli): identical draws on every device, so it
# is compared like a deterministic method. SSAM-F draws only with fisher="sketch" (a variant below).

#: options for the cross-device comparison beyond MIXED (which makes the adaptive/periodic/coin methods take
#: both SAM and ERM steps within the run)
PARITY_OPTIONS = {
    # Entropy-SGD draws with `normal_` straight into device buffers (no branch for a generator on another
    # device), so the CPU reference cannot share its stream: its noise is switched off here and the stream is
    # checked by test_random_streams_live_on_the_device_and_are_reproducible instead.
    "entropysgd": {"noise": 0.0},
}

#: more device paths: (name, options)
VARIANTS = [
    ("esam", {"mask": "tensor"}),  # per-tensor coins, 0-d masks on the device
    ("ssamf", {"fisher": "sketch", "fisher_probes": 4, "num_samples": 32}),  # Rademacher signs on the device
    ("salr", {"normalization": "per_sample"}),  # vmapped per-sample gradients
    ("gnr", {"hvp": "finite_difference"}),
    ("smoothout", {"adaptive": True, "copies": 2}),
    ("looksam", {"k": 3, "max_grad_norm": 0.5}),  # reuse steps and clipping
]

CASES = [pytest.param(name, {}, id=name) for name in registered_names()]
CASES += [pytest.param(name, options, id=f"{name}-{'-'.join(map(str, options.values()))}")
          for name, options in VARIANTS]


@pytest.fixture
def device() -> torch.device:
    return DEVICE


# ---------------------------------------------------------------------------------------------- helpers
def _options(name: str, options: dict) -> dict:
    return {**MIXED.get(name, {}), **PARITY_OPTIONS.get(name, {}), **options}


def _build(name: str, device: torch.device, options: dict, *, stream_device: torch.device | None = None,
           seed: int = 0):
    """The tiny float64 MLP, data and optimizer (default closure conventions: per-sample losses where the method
    takes them) on ``device``; with ``stream_device``, random draws come from a generator there."""
    model = mlp(seed).to(device)
    x, y = (t.to(device) for t in classification_data(seed))
    options = dict(options)
    info = sharpness.get_optimizer_info(name)
    if stream_device is not None and issubclass(info.cls, sharpness.UniversalSAM):
        options["generator"] = torch.Generator(device=stream_device).manual_seed(options.get("seed", 0))
    opt = create_for_test(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                          standard_closure=False, **options)
    rng = getattr(opt, "_rng", None)
    if stream_device is not None and rng is not None:
        # the CPU reference draws from a generator on the device, seeded alike: the same numbers as the device run
        shared = torch.Generator(device=stream_device).manual_seed(rng.seed)
        rng.get = lambda _device: shared
    return model, x, y, opt


def _steps(opt, model, x, y, steps: int) -> list[torch.Tensor]:
    closure = make_closure(opt, model, x, y)
    return [opt.step(closure).detach() for _ in range(steps)]


def _base(opt) -> torch.optim.Optimizer:
    return opt.base_optimizer


def _counters(opt) -> tuple:
    return tuple(getattr(opt, key, None) for key in ("steps", "sam_steps", "grad_evals", "skipped_steps"))


def _tensors(value):
    """Every tensor in a nested dict / list / tuple."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _assert_close_on_cpu(actual, expected) -> None:
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.is_floating_point():
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    else:  # masks, counts
        assert torch.equal(actual, expected)


def _assert_same_run(dev_model, dev_opt, cpu_model, cpu_opt) -> None:
    for p, q in zip(dev_model.parameters(), cpu_model.parameters(), strict=True):
        assert p.device.type == DEVICE.type
        _assert_close_on_cpu(p, q)
    for p, q in zip(dev_model.parameters(), cpu_model.parameters(), strict=True):
        for owner in (dev_opt, _base(dev_opt)):
            other = cpu_opt if owner is dev_opt else _base(cpu_opt)
            state, ref = owner.state.get(p, {}), other.state.get(q, {})
            assert state.keys() == ref.keys()
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    _assert_close_on_cpu(value, ref[key])
                else:
                    assert value == ref[key], key
    assert _counters(dev_opt) == _counters(cpu_opt)


# ---------------------------------------------------------------------------------------------- 1. parity
@pytest.mark.parametrize("name, options", CASES)
def test_steps_on_the_device_equal_steps_on_cpu(device, name, options):
    """4 steps from identical weights and data: weights, returned losses, counters and every state buffer."""
    options = _options(name, options)
    dev_model, x, y, dev_opt = _build(name, device, options)
    cpu_model, cx, cy, cpu_opt = _build(name, CPU, options, stream_device=device)
    dev_losses = _steps(dev_opt, dev_model, x, y, 4)
    cpu_losses = _steps(cpu_opt, cpu_model, cx, cy, 4)
    for a, b in zip(dev_losses, cpu_losses, strict=True):
        assert a.device.type == device.type
        _assert_close_on_cpu(a, b)
    _assert_same_run(dev_model, dev_opt, cpu_model, cpu_opt)
    initial = mlp(0)
    assert not all(torch.equal(p.cpu(), q) for p, q in zip(dev_model.parameters(), initial.parameters()))
    if name in MIXED:
        assert 0 < dev_opt.sam_steps < dev_opt.steps  # both branches were compared


def test_ssamf_masks_match_across_devices(device):
    """The Fisher top-k mask is built on the device (8 steps: refreshes at 0 and 4 from 64 samples)."""
    options = {"num_samples": 64, "update_freq": 4}
    dev_model, x, y, dev_opt = _build("ssamf", device, options)
    cpu_model, cx, cy, cpu_opt = _build("ssamf", CPU, options)
    _steps(dev_opt, dev_model, x, y, 8)
    _steps(cpu_opt, cpu_model, cx, cy, 8)
    assert dev_opt.mask_updates == cpu_opt.mask_updates == 2
    assert dev_opt.mask_density == pytest.approx(0.5, abs=0.01)
    _assert_same_run(dev_model, dev_opt, cpu_model, cpu_opt)


@pytest.mark.parametrize("name", sorted(DEVICE_STREAMS))
def test_random_streams_live_on_the_device_and_are_reproducible(device, name):
    """Default options (Entropy-SGD with its noise): the generator is on the device, the same seed gives the same
    run bit for bit, another seed another run (the stream is used), and the cost is the method's fixed count."""
    runs = []
    for seed in (0, 0, 1):
        model, x, y, opt = _build(name, device, {"seed": seed})
        losses = _steps(opt, model, x, y, 3)
        runs.append(([p.detach().clone() for p in model.parameters()], opt))
        generators = [g for g in (getattr(opt, "generator", None), getattr(getattr(opt, "_rng", None), "_generator",
                                                                          None)) if g is not None]
        assert generators and all(g.device.type == device.type for g in generators)
        assert all(math.isfinite(float(loss)) for loss in losses)
        assert opt.min_grad_evals_per_step == opt.max_grad_evals_per_step
        assert opt.grad_evals == 3 * opt.max_grad_evals_per_step
    (first, opt), (again, _), (other, _) = runs
    initial = mlp(0)
    assert all(torch.isfinite(p).all() for p in first)
    assert not all(torch.equal(p.cpu(), q) for p, q in zip(first, initial.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not all(torch.equal(p, q) for p, q in zip(first, other))
    for t in _tensors(list(opt.state.values())):
        assert t.device.type == device.type


# ---------------------------------------------------------------------------------------------- 2. state and checkpoints
@pytest.mark.parametrize("name, options", CASES)
def test_all_optimizer_state_lives_on_the_parameters_device(device, name, options):
    model, x, y, opt = _build(name, device, options)
    _steps(opt, model, x, y, 3)
    live = list(_tensors([dict(s) for s in opt.state.values()])) + list(
        _tensors([dict(s) for s in _base(opt).state.values()]))
    live += [v for v in vars(opt).values() if isinstance(v, torch.Tensor)]  # e.g. LookSAM's ||g_v||
    assert live, "no state at all?"
    for t in live:
        assert t.device.type == device.type, (t.shape, t.dtype)
    # in the state_dict only generator states (uint8, always on CPU in torch) may be elsewhere
    saved = opt.state_dict()
    for t in _tensors(saved):
        if t.dtype != torch.uint8:
            assert t.device.type == device.type, (t.shape, t.dtype)


def _reload(state: dict, via: str, map_location) -> dict:
    if via == "direct":  # the live dict (device tensors): the optimizer must move them itself
        return copy.deepcopy(state)  # (torch optimizers alias same-device tensors on load; keep runs apart)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=map_location, weights_only=True)


def _fresh_copy(name: str, options: dict, model: nn.Module, target: torch.device):
    copy_model, _, _, copy_opt = _build(name, target, options)
    copy_model.load_state_dict({k: v.to(target) for k, v in model.state_dict().items()})
    return copy_model, copy_opt


DETERMINISTIC = [c for c in CASES if c.values[0] not in DEVICE_STREAMS and c.values[1].get("fisher") != "sketch"]


@pytest.mark.parametrize("via", ["map_location", "direct"])
@pytest.mark.parametrize("name, options", DETERMINISTIC)
def test_a_device_checkpoint_resumes_on_cpu(device, name, options, via):
    """2 steps on the device, save, load into a fresh CPU optimizer; 3 more steps on each equal each other."""
    options = _options(name, options)
    model, x, y, opt = _build(name, device, options)
    _steps(opt, model, x, y, 2)
    state = _reload(opt.state_dict(), via, "cpu")
    cpu_model, cpu_opt = _fresh_copy(name, options, model, CPU)
    cpu_opt.load_state_dict(state)
    _steps(opt, model, x, y, 3)
    _steps(cpu_opt, cpu_model, x.cpu(), y.cpu(), 3)
    _assert_same_run(model, opt, cpu_model, cpu_opt)


@pytest.mark.parametrize("name, options", [c for c in CASES if c not in DETERMINISTIC])
def test_a_device_checkpoint_resumes_the_random_stream_on_the_device(device, name, options):
    """Save after 2 steps, load into a fresh optimizer on the device: 3 more steps equal the uninterrupted run bit
    for bit (the generator state came back)."""
    model, x, y, opt = _build(name, device, options)
    _steps(opt, model, x, y, 2)
    state = _reload(opt.state_dict(), "map_location", None)
    resumed_model, resumed = _fresh_copy(name, options, model, device)
    resumed.load_state_dict(state)
    _steps(opt, model, x, y, 3)
    _steps(resumed, resumed_model, x, y, 3)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert _counters(resumed) == _counters(opt)


@pytest.mark.parametrize("name", sorted(DEVICE_STREAMS))
def test_a_device_random_stream_loaded_on_cpu_is_refused_with_a_clear_message(device, name):
    """A generator state cannot move between device types (documented). Loading such a checkpoint into a CPU
    optimizer must say so (the message names the device), either at load, with nothing loaded, or at the first
    step, with the weights unchanged."""
    if device.type == "cpu":
        pytest.skip("needs a device of another type than CPU")
    model, x, y, opt = _build(name, device, {})
    _steps(opt, model, x, y, 2)
    state = _reload(opt.state_dict(), "map_location", "cpu")
    cpu_model, cpu_opt = _fresh_copy(name, {}, model, CPU)
    try:
        cpu_opt.load_state_dict(state)
    except (RuntimeError, ValueError) as error:
        assert "device" in str(error), f"unclear message: {error}"
        assert cpu_opt.steps == 0 and not _base(cpu_opt).state, "a refused load changed the optimizer"
        return
    before = [p.detach().clone() for p in cpu_model.parameters()]
    with pytest.raises(RuntimeError, match="device"):
        _steps(cpu_opt, cpu_model, x.cpu(), y.cpu(), 1)
    assert all(torch.equal(p, q) for p, q in zip(cpu_model.parameters(), before))


# ---------------------------------------------------------------------------------------------- 3. host syncs
#: scalar reads test_memory.py counts that are host-side on any device (no synchronisation)
HOST_READS_PER_10_STEPS = {"sssam": 10}  # the coin from a CPU generator


def _sync_warnings(caught) -> int:
    # torch's text for each synchronisation (set_sync_debug_mode itself also warns: it is a prototype feature)
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@contextlib.contextmanager
def _sync_debug():
    """``set_sync_debug_mode("warn")`` with the warnings recorded; checks the probe sees a deliberate ``.item()``."""
    if DEVICE.type != "cuda":
        pytest.skip("set_sync_debug_mode needs a CUDA device")
    t = torch.ones(3, device=DEVICE)  # the CUDA context exists before the mode is on
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            (t * 2).add_(1)
            assert _sync_warnings(caught) == 0, "a device-only op was reported as a synchronisation"
            t.sum().item()  # the positive control
            seen = _sync_warnings(caught)
            if seen == 0:
                pytest.fail(f"torch {torch.__version__}: set_sync_debug_mode('warn') did not report a deliberate "
                            ".item(); the synchronisation counts would pass vacuously")
            if seen != 1:
                pytest.fail(f"torch {torch.__version__}: one .item() gave {seen} warnings; the counts below assume "
                            "one per synchronisation")
            caught.clear()
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_the_sync_probe_sees_item_bool_and_a_host_copy(device):
    with _sync_debug() as caught:
        t = torch.ones(3, device=device)
        bool(t.any())
        t.cpu()
        assert _sync_warnings(caught) == 2
    assert torch.cuda.get_sync_debug_mode() == 0


@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("name", registered_names())
def test_host_syncs_per_step_are_the_methods_own(device, name, max_grad_norm, check_finite):
    """test_memory's setup; 10 steps after 3 warm-up steps, the closure excluded (it runs with the mode off)."""
    with _sync_debug() as caught:
        torch.cuda.set_sync_debug_mode(0)  # construction and warm-up are not counted
        model, x, y = _problem()
        model, x, y = model.to(device), x.to(device), y.to(device)
        opt = create_for_test(name, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                              standard_closure=False, max_grad_norm=max_grad_norm, check_finite=check_finite)
        inner = make_closure(opt, model, x, y)

        def closure():
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return inner()
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        for _ in range(3):
            opt.step(closure)
        torch.cuda.synchronize()
        caught.clear()
        torch.cuda.set_sync_debug_mode("warn")
        for _ in range(10):
            opt.step(closure)
        torch.cuda.set_sync_debug_mode(0)
        syncs = _sync_warnings(caught)
        where = sorted({f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)})
    expected = SCALAR_READS_PER_10_STEPS.get(name, 0) - HOST_READS_PER_10_STEPS.get(name, 0)
    assert syncs == expected + (10 if check_finite else 0), where


# ---------------------------------------------------------------------------------------------- 4. measures


def _reference_hessian(model, x, y) -> torch.Tensor:
    """On CPU, by ``torch.autograd.functional.hessian`` of the loss of the flattened parameters."""
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    flat = torch.cat([p.reshape(-1) for _, p in named])

    def loss_of(w):
        pieces, i = {}, 0
        for n, p in named:
            pieces[n] = w[i:i + p.numel()].view_as(p)
            i += p.numel()
        return nn.functional.cross_entropy(functional_call(model, pieces, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat)


@pytest.fixture(scope="module")
def hessian_problem():
    model, x, y = float64_mlp()  # test_hessian's float64 MLP, P = 93
    reference = _reference_hessian(model, x, y)
    return model, x, y, reference


@pytest.mark.parametrize("method, hvp_method, rtol", [("lanczos", "double_backward", 1e-8),
                                                     ("lanczos", "func", 1e-8),
                                                     ("power", "double_backward", 1e-4)])
def test_top_eigenvalues_on_the_device_equal_the_dense_cpu_hessian(device, hessian_problem, method, hvp_method, rtol):
    model, x, y, reference = hessian_problem
    expected = torch.linalg.eigvalsh(reference).flip(0)[:3]
    dev_model = copy.deepcopy(model).to(device)
    weights = [p.detach().clone() for p in dev_model.parameters()]
    result = hessian_eigenvalues(dev_model, nn.functional.cross_entropy, (x.to(device), y.to(device)), 3,
                                 method=method, tol=1e-10, max_iter=5000 if method == "power" else None,
                                 hvp_method=hvp_method)
    assert result.converged
    torch.testing.assert_close(torch.tensor(result.value, dtype=torch.float64), expected, rtol=rtol, atol=0)
    assert all(torch.equal(p, q) for p, q in zip(dev_model.parameters(), weights))  # the weights are left alone


def test_hessian_trace_on_the_device(device, hessian_problem):
    """Within 4 standard errors of the dense trace, and equal to the CPU estimate with the same seed (the probes
    are drawn on CPU: documented as reproducible across devices)."""
    model, x, y, reference = hessian_problem
    dev_model = copy.deepcopy(model).to(device)
    on_device = hessian_trace(dev_model, nn.functional.cross_entropy, (x.to(device), y.to(device)), samples=128,
                              seed=3)
    on_cpu = hessian_trace(model, nn.functional.cross_entropy, (x, y), samples=128, seed=3)
    assert abs(on_device.value - float(reference.trace())) <= 4 * on_device.stderr
    assert on_device.value == pytest.approx(on_cpu.value, rel=1e-10)
    assert on_device.stderr == pytest.approx(on_cpu.stderr, rel=1e-8)


def test_dense_hessian_on_the_device(device, hessian_problem):
    model, x, y, reference = hessian_problem
    dense = dense_hessian(copy.deepcopy(model).to(device), nn.functional.cross_entropy, (x.to(device), y.to(device)))
    assert dense.dtype == torch.float64
    torch.testing.assert_close(dense.cpu(), reference, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- 5. mixed precision
AMP_DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16  # CPU autocast: bf16 (the logic check)


def _amp_setup(device, *, scaler: bool, autocast: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
    grad_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if scaler else None
    opt = sharpness.SAM(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), rho=0.05,
                        grad_scaler=grad_scaler)
    calls = [0]
    x, y = x.to(device), y.to(device)

    def closure(poison_call=None):
        return scaled_closure(opt, model, x, y, grad_scaler, poison_call=poison_call, calls=calls,
                              autocast_dtype=AMP_DTYPE if autocast else None)

    return model, opt, grad_scaler, closure, calls


def test_scaled_float32_steps_equal_unscaled_steps_on_the_device(device):
    """The scaler's unscale path on the device: powers of two, so equal to the unscaled run up to rounding."""
    ref_model, ref_opt, _, ref_closure, _ = _amp_setup(device, scaler=False, autocast=False)
    amp_model, amp_opt, scaler, amp_closure, _ = _amp_setup(device, scaler=True, autocast=False)
    for _ in range(6):
        ref_opt.step(ref_closure())
        amp_opt.step(amp_closure())
        scaler.update()
    for p, q in zip(amp_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert (amp_opt.steps, amp_opt.sam_steps, amp_opt.skipped_steps) == (6, 6, 0)


@pytest.mark.parametrize("poison_call", [0, 1], ids=["first-pass", "perturbed-pass"])
def test_autocast_with_a_grad_scaler_through_sam(device, poison_call):
    """fp16 autocast (bf16 on CPU) trains with finite weights; an inf in either pass skips the step: weights and
    momentum unchanged bit for bit, the scale halves."""
    model, opt, scaler, closure, calls = _amp_setup(device, scaler=True, autocast=True)
    losses = []
    for _ in range(20):
        losses.append(float(opt.step(closure()).detach()))
        scaler.update()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0], losses
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    weights = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    counters, scale = _counters(opt), scaler.get_scale()
    calls[0] = 0
    opt.step(closure(poison_call))
    assert calls[0] == poison_call + 1  # an overflow in the first pass skips the perturbed pass
    scaler.update()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m)
               for p, m in zip(model.parameters(), momentum))
    assert (opt.steps, opt.sam_steps, opt.skipped_steps) == (counters[0], counters[1], counters[3] + 1)
    assert scaler.get_scale() == scale * 0.5
    opt.step(closure())  # and it goes on
    scaler.update()
    assert opt.steps == counters[0] + 1 and all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- 6. the harness
def _harness_config(**overrides):
    from sharpness.harness import TrainConfig

    options = dict(dataset="digits", model="mlp", model_options={"depth": 3}, optimizer="sam", lr=0.1,
                   batch_size=64, epochs=2, seed=0)
    return TrainConfig(**{**options, **overrides})


def test_harness_trains_on_the_device_like_on_cpu(device, tmp_path):
    """``train(device=...)``: the same run on the device and on CPU (float32; matmuls without TF32 by torch's
    default) gives the same records at rounding level; a device checkpoint resumes on CPU."""
    from sharpness.data import load_dataset
    from sharpness.harness import train

    data = load_dataset("digits", seed=0)
    config = _harness_config()
    on_device = train(config, data=data, log=None, device=device)
    on_cpu = train(config, data=data, log=None, device="cpu")
    assert on_device.summary["device"] == device.type
    assert next(on_device.model.parameters()).device.type == device.type
    for a, b in zip(on_device.epochs, on_cpu.epochs, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
        assert abs(a["test_acc"] - b["test_acc"]) <= 2 / len(data.test)  # an argmax tie may flip
        assert (a["steps"], a["sam_steps"], a["grad_evals"]) == (b["steps"], b["sam_steps"], b["grad_evals"])
    path = tmp_path / "run.pt"
    train(config, data=data, log=None, device=device, checkpoint=path, stop_after_epochs=1)
    resumed = train(config, data=data, log=None, device="cpu", checkpoint=path)
    assert resumed.epochs[-1]["test_loss"] == pytest.approx(on_cpu.epochs[-1]["test_loss"], rel=1e-4)
    assert resumed.summary["device"] == "cpu"


def test_a_harness_run_with_dropout_resumes_bit_identically_on_the_device(device, tmp_path):
    """Dropout masks are drawn from the device's generator: the checkpoint carries its state, so a resumed run
    draws the masks an uninterrupted one draws (before, it replayed them from the seed)."""
    from sharpness.data import load_dataset
    from sharpness.harness import train

    data = load_dataset("digits", seed=0)
    config = _harness_config(epochs=3, model_options={"depth": 3, "dropout": 0.3})
    whole = train(config, data=data, log=None, device=device)
    path = tmp_path / "run.pt"
    train(config, data=data, log=None, device=device, checkpoint=path, stop_after_epochs=1)
    resumed = train(config, data=data, log=None, device=device, checkpoint=path)
    for a, b in zip(whole.epochs, resumed.epochs, strict=True):
        assert (a["train_loss"], a["test_loss"]) == (b["train_loss"], b["test_loss"])


def test_resident_batches_on_the_device_equal_those_on_cpu(device):
    """Images held on the device: the same seeded epoch (order, crops, flips drawn on the CPU) gives the CPU's
    batches bit for bit (uint8 gathers, then the same float32 normalisation)."""
    from sharpness.data.images import ImageTensors
    from sharpness.data.resident import as_resident, resident_batches
    from sharpness.data.tinyshakespeare import CharWindows

    images = torch.randint(0, 256, (37, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    on_cpu = ImageTensors(images, torch.arange(37) % 10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
                          padding=4, flip=True)
    on_device = as_resident(on_cpu, device)
    assert on_device.images.device.type == device.type and on_device.targets.device.type == device.type
    ours = list(resident_batches(on_device, 8, order=torch.Generator().manual_seed(1),
                                 augment=torch.Generator().manual_seed(2)))
    reference = list(resident_batches(on_cpu, 8, order=torch.Generator().manual_seed(1),
                                      augment=torch.Generator().manual_seed(2)))
    assert len(ours) == len(reference) == 5
    for (x, y), (x_cpu, y_cpu) in zip(ours, reference):
        assert x.device.type == device.type and torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)
    windows = CharWindows(torch.arange(50) % 11, 6)
    x, y = as_resident(windows, device).batch(torch.tensor([3, 0, 43], device=device))
    x_cpu, y_cpu = windows.batch(torch.tensor([3, 0, 43]))
    assert torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)
