"""``torch.compile``'d models: every optimizer trains through one on the eager trajectory, the measures take one,
the harness and the CLI compile on request, and what cannot go through a compiled graph fails with a clear error.

``aot_eager`` traces the model with dynamo and AOTAutograd (the parts that meet our in-place perturbations and our
backward calls) without generating code, so the float64 trajectory must match the eager one to rounding; one
test runs inductor's generated C++ as well.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import sharpness
import sharpness.measures as M
from helpers import classification_data, make_closure, make_optimizer, mlp, registered_names
from sharpness._compile import accepts_compiled, is_compiled_double_backward_error, uncompiled
from sharpness.cli import app
from sharpness.harness import TrainConfig, train
from sharpness.harness.measure import measure_model
from sharpness.harness.train import check_compile_backend

# GNR's default exact HVPs differentiate twice, which compiled graphs refuse (tested below)
NAMES = registered_names()
OPTIONS = {"gnr": {"hvp": "finite_difference"}}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: dynamo's cache is keyed by the forward's code, shared by every
    ``nn.Sequential``, so a graph compiled by another test would otherwise be reused here."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train_weights(name, compiled, backend="aot_eager", steps=5, **options):
    x, y = classification_data(0)
    model = mlp(0)
    opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=8,
                         **{**OPTIONS.get(name, {}), **options})
    forward = torch.compile(model, backend=backend) if compiled else model
    torch.manual_seed(0)
    for _ in range(steps):
        opt.step(make_closure(opt, forward, x, y))
    return _weights(model), opt


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_trains_a_compiled_model_on_the_eager_trajectory(name):
    eager, _ = _train_weights(name, compiled=False)
    compiled, opt = _train_weights(name, compiled=True)
    assert not torch.equal(eager, _weights(mlp(0)))  # the steps moved the weights
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)
    assert opt.grad_evals >= opt.steps == 5


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_model_trains_sam_to_rounding_of_eager():
    eager, _ = _train_weights("sam", compiled=False)
    compiled, _ = _train_weights("sam", compiled=True, backend="inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


def test_gnr_exact_hvp_through_a_compiled_model_says_to_use_finite_differences():
    model = mlp(0)
    before = _weights(model)
    opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    x, y = classification_data(0)
    with pytest.raises(RuntimeError, match="hvp='finite_difference'") as info:
        opt.step(make_closure(opt, torch.compile(model, backend="aot_eager"), x, y))
    assert is_compiled_double_backward_error(info.value.__cause__)
    assert torch.equal(_weights(model), before)  # nothing applied


def test_ssamf_per_example_fisher_on_a_reused_compiled_graph_says_what_to_use():
    """A compiled graph whose backward was first built for one plain backward (here by SAM) donates its buffers;
    SSAM-F's per-example passes then cannot retain it: the error names fisher='vmap' and the torch setting."""
    _train_weights("sam", compiled=True, steps=1)
    with pytest.raises(RuntimeError, match="fisher='vmap'.*donated_buffer") as info:
        _train_weights("ssamf", compiled=True, steps=1)
    assert is_compiled_double_backward_error(info.value.__cause__)


def test_ssamf_vmap_fisher_takes_the_compiled_model():
    weights = []
    for compiled in (False, True):
        x, y = classification_data(0)
        model = mlp(0)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        opt = sharpness.SSAMF(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, sparsity=0.5, num_samples=8,
                              update_freq=2, fisher="vmap")
        for _ in range(4):
            if opt.mask_due:
                opt.update_mask(forward, torch.nn.functional.cross_entropy, x, y)
            opt.step(make_closure(opt, forward, x, y))
        weights.append(_weights(model))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-12, atol=1e-14)


def test_uncompiled_unwraps_a_wrapper_and_passes_anything_else_through():
    model = mlp(0)
    wrapped = torch.compile(model, backend="aot_eager")
    assert uncompiled(wrapped) is model and uncompiled(model) is model
    assert uncompiled(3) == 3 and uncompiled(None) is None
    assert min(wrapped.state_dict()).startswith("_orig_mod.")  # what the measures would otherwise compare

    @accepts_compiled
    def names(m, other=None):
        return sorted(m.state_dict()), other

    assert names(wrapped, other=wrapped) == (sorted(model.state_dict()), model)


def test_measures_run_a_module_compiled_in_place_eagerly():
    """``model.compile()`` keeps the module object: the measures switch compilation off while they run, and
    leave it on afterwards."""
    data = classification_data(0)
    model = mlp(0)
    model.compile(backend="aot_eager")
    trace = M.hessian_trace(model, _loss, data, samples=8, seed=0).value
    assert trace == M.hessian_trace(mlp(0), _loss, data, samples=8, seed=0).value
    outputs = model(data[0])
    with pytest.raises(RuntimeError, match="double backward"):  # compiled outside the measure, as before
        grads = torch.autograd.grad(_loss(outputs, data[1]), list(model.parameters()), create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in grads), list(model.parameters()))


def _loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets)


MEASURES = {
    "dense_hessian": lambda m, d: M.dense_hessian(m, _loss, d),
    "hessian_eigenvalues": lambda m, d: M.hessian_eigenvalues(m, _loss, d, 2).value,
    "hessian_trace": lambda m, d: M.hessian_trace(m, _loss, d, samples=8, seed=0).value,
    "hvp": lambda m, d: M.hvp(m, _loss, d, [torch.ones_like(p) for p in m.parameters()]),
    "sam_sharpness": lambda m, d: M.sam_sharpness(m, _loss, d, 0.05, seed=0).value,
    "universal_sharpness": lambda m, d: M.universal_sharpness(m, _loss, d, "trace", rho=0.01, seed=0).value,
    "interpolate": lambda m, d: M.interpolate(m, _loss, d, torch.compile(mlp(1), backend="aot_eager"),
                                              points=3).losses,
    "gradient_variance": lambda m, d: M.gradient_variance(m, _loss, d, per_sample=True).value,
    "measure_model": lambda m, d: [r["value"] for r in measure_model(m, _loss, d, ["lambda_max", "trace"],
                                                                      samples=8).values()],
}


def _as_tensor(value):
    if isinstance(value, (list, tuple)):
        return torch.cat([_as_tensor(v).flatten() for v in value])
    return torch.as_tensor(value, dtype=torch.float64)


@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_measures_of_a_compiled_model_are_those_of_the_eager_model(measure):
    """Second-order measures double-backward, which compiled graphs refuse: the measures run the module that
    ``torch.compile`` wraps (the same weights), so the numbers are the eager ones exactly."""
    data = classification_data(0)
    eager = _as_tensor(MEASURES[measure](mlp(0), data))
    compiled = _as_tensor(MEASURES[measure](torch.compile(mlp(0), backend="aot_eager"), data))
    assert torch.isfinite(eager).all() and eager.abs().sum() > 0
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def _config(**overrides):
    base = dict(dataset="digits", model="mlp", model_options={"depth": 3}, optimizer="sam", lr=0.1, batch_size=64,
                epochs=None, budget_steps=12, seed=0, measures=("lambda_max",))
    base.update(overrides)
    return TrainConfig(**base)


def test_harness_compiled_run_records_the_eager_run():
    from sharpness.data import load_dataset

    data = load_dataset("digits", seed=0)
    eager = train(_config(), data=data, log=None, device="cpu")
    compiled = train(_config(), data=data, log=None, device="cpu", compile_backend="aot_eager")
    assert compiled.summary.pop("compile_backend") == "aot_eager" and "compile_backend" not in eager.summary
    for key in ("train_loss", "test_loss", "test_acc", "steps", "sam_steps", "grad_evals"):
        assert compiled.summary[key] == pytest.approx(eager.summary[key], rel=1e-6, abs=1e-9), key
    assert [r["sharpness.lambda_max"] for r in compiled.epochs] == pytest.approx(
        [r["sharpness.lambda_max"] for r in eager.epochs], rel=1e-5)
    assert sorted(compiled.model.state_dict()) == sorted(eager.model.state_dict())  # no _orig_mod. prefix


def test_invalid_compile_backend_is_refused_by_train_and_the_cli():
    with pytest.raises(ValueError, match="Invalid compile_backend value: 'nope' \\(expected None or one of .*inductor"):
        train(_config(), log=None, device="cpu", compile_backend="nope")
    result = CliRunner().invoke(app, ["train", "--dataset", "digits", "--model", "mlp", "--budget-steps", "2",
                                      "--compile", "nope", "-q"])
    assert result.exit_code == 2 and "Invalid compile_backend value: 'nope'" in " ".join(result.output.split())
    assert "TESTING_ONLY" not in result.output and "minifier" not in result.output  # offered: usable backends
    assert check_compile_backend("aot_eager") == "aot_eager"  # debugging backends are still accepted


def test_cli_trains_with_compile():
    result = CliRunner().invoke(app, ["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "sam",
                                      "--batch-size", "128", "--budget-grad-evals", "8", "--compile", "aot_eager",
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "gradient evaluations 8" in result.output


def _train_step_run(name, how, steps=4):
    """``steps`` steps of ``name`` on an eager model; ``how``: ``eager``, ``compiled-step`` (``torch.compile(opt.step)``)
    or ``compiled-function`` (a compiled function that builds the closure and calls ``opt.step``)."""
    x, y = classification_data(0)
    model = mlp(0)
    opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=8)
    step = torch.compile(opt.step, backend="eager") if how == "compiled-step" else opt.step

    def train_step():
        return step(make_closure(opt, model, x, y))

    run = torch.compile(train_step, backend="eager") if how == "compiled-function" else train_step
    torch.manual_seed(0)
    losses = [float(run()) for _ in range(steps)]
    return _weights(model), losses, opt


def _counters(opt):
    return {key: getattr(opt, key) for key in ("grad_evals", "steps", "sam_steps") if hasattr(opt, key)}


@pytest.mark.parametrize("how", ["compiled-step", "compiled-function"])
@pytest.mark.parametrize("name", NAMES)
def test_a_compiled_optimizer_step_runs_eagerly_on_the_eager_trajectory(name, how):
    """Dynamo drops attribute writes on ``torch.optim.Optimizer`` subclasses (pytorch/pytorch#171590): a compiled
    ``SAM.step`` counted 3 gradient evaluations for 6 and left the weights 0.02 off. Every step-like method runs
    eagerly when compiled code reaches it (GNR's exact HVPs included), so the run is the eager one bit for bit."""
    eager, eager_losses, reference = _train_step_run(name, "eager")
    compiled, losses, opt = _train_step_run(name, how)
    assert not torch.equal(eager, _weights(mlp(0)))  # the steps moved the weights
    assert torch.equal(compiled, eager)
    assert losses == eager_losses
    assert _counters(opt) == _counters(reference) and _counters(opt)["steps"] == 4
    torch.testing.assert_close(opt.state_dict()["state"], reference.state_dict()["state"], rtol=0, atol=0)


def test_the_two_phase_api_in_a_compiled_function_runs_eagerly():
    def run(compiled):
        x, y = classification_data(0)
        model = mlp(0)
        opt = sharpness.LookSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2, rho=0.05)

        def loss():
            out = nn.functional.cross_entropy(model(x), y)
            out.backward()
            return out

        def train_step():
            first = loss()
            if opt.first_step(zero_grad=True):
                loss()
            opt.second_step(zero_grad=True)
            return first

        run_step = torch.compile(train_step, backend="eager") if compiled else train_step
        losses = [float(run_step()) for _ in range(5)]
        return _weights(model), losses, _counters(opt)

    eager, compiled = run(False), run(True)
    assert torch.equal(compiled[0], eager[0])
    assert compiled[1:] == eager[1:]
    assert eager[2] == {"grad_evals": 8, "steps": 5, "sam_steps": 3}  # SAM on steps 1, 3, 5 (k=2)


def test_a_users_subclass_step_runs_eagerly_under_compile_too():
    class CountingSAM(sharpness.SAM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = 0

        def step(self, closure=None):
            self.calls += 1  # an attribute write dynamo would drop
            return super().step(closure)

    x, y = classification_data(0)
    model = mlp(0)
    opt = CountingSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    step = torch.compile(opt.step, backend="eager")
    for _ in range(3):
        step(make_closure(opt, model, x, y))
    assert (opt.calls, opt.steps, opt.grad_evals) == (3, 3, 6)


def test_fullgraph_compile_of_a_step_names_the_method_that_runs_eagerly():
    x, y = classification_data(0)
    model = mlp(0)
    opt = sharpness.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    before = _weights(model)
    with pytest.raises(Exception, match=r"SharpnessAwareOptimizer\.step.*should not be traced"):
        torch.compile(opt.step, backend="eager", fullgraph=True)(make_closure(opt, model, x, y))
    assert torch.equal(_weights(model), before) and opt.steps == 0
