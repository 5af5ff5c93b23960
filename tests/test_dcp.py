"""``torch.distributed.checkpoint`` (DCP): ``get_optimizer_state_dict`` / ``dcp.save`` / ``dcp.load`` /
``set_optimizer_state_dict``, the checkpoint path of FSDP2 and torchtitan-style loops, in one process.

DCP keeps only an optimizer state dict's ``"state"`` (re-keyed by parameter name) and ``"param_groups"``, and
it builds a fresh optimizer's state by a ``step()`` without a closure before loading into it. Every wrapper
must survive both: a run resumed through DCP equals the run that never stopped, bit for bit. The sharded
(FSDP2) round trips run in ``test_fsdp.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import sharpness
from helpers import assert_nested_equal, classification_data, create_for_test, make_closure, mlp, native

dcp = pytest.importorskip("torch.distributed.checkpoint")
dcp_state = pytest.importorskip("torch.distributed.checkpoint.state_dict")

NAMES = [info.name for info in sharpness.list_optimizers()]
#: extra settings with more state to carry: LookSAM reusing its direction right after the resume, SSAM-F's
#: masks and a Fisher refresh under way, SALR around LookSAM (two wrappers' entries in one state dict)
VARIANTS = {
    "looksam-k3": ("looksam", {"k": 3}),
    "ssamf-sparse": ("ssamf", {"sparsity": 0.5, "num_samples": 48, "update_freq": 2}),
    "salr-looksam": ("salr", {"inner": "looksam", "k": 2}),
}
CASES = {**{name: (name, {}) for name in NAMES}, **VARIANTS}


def build(case: str, model: nn.Module):
    name, options = CASES[case]
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return create_for_test(name, base, rho=0.1, total_steps=12, **options)


def train(opt, model: nn.Module, steps: int) -> None:
    x, y = classification_data(0)
    for t in range(steps):
        half = slice((t % 2) * 32, (t % 2) * 32 + 32)
        opt.step(make_closure(opt, model, x[half], y[half]))


def counters(opt) -> dict:
    return {key: getattr(opt, key, None) for key in ("steps", "sam_steps", "grad_evals", "skipped_steps")}


def save(model: nn.Module, opt, path) -> None:
    dcp.save({"model": model.state_dict(), "optim": dcp_state.get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(path))


def load(case: str, path):
    """A fresh model (another init) and optimizer, everything loaded from the DCP checkpoint at ``path``."""
    model = mlp(5)
    opt = build(case, model)
    load_into(model, opt, path)
    return model, opt


def load_into(model: nn.Module, opt, path) -> None:
    target = {"model": model.state_dict(), "optim": dcp_state.get_optimizer_state_dict(model, opt)}
    dcp.load(target, checkpoint_id=str(path))
    model.load_state_dict(target["model"])
    dcp_state.set_optimizer_state_dict(model, opt, target["optim"])


def assert_same_runs(*runs) -> None:
    """4 more steps of each ``(model, opt)``: bit-equal weights and equal counters."""
    for model, opt in runs:
        train(opt, model, 4)
    (model, opt), (model2, opt2) = runs
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert counters(opt2) == counters(opt)


def structure(tree, path=()) -> dict:
    """Every leaf of a state dict by its path: a tensor as (shape, dtype), anything else as its type."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in structure(value, (*path, key)).items()}
    if isinstance(tree, list) and any(isinstance(v, (dict, list, torch.Tensor)) for v in tree):
        return {k: v for i, value in enumerate(tree) for k, v in structure(value, (*path, i)).items()}
    if isinstance(tree, torch.Tensor):
        return {path: (tuple(tree.shape), tree.dtype)}
    return {path: "value"}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_resumed_through_dcp_equals_the_run_that_never_stopped(case, tmp_path):
    model = mlp(0)
    opt = build(case, model)
    train(opt, model, 5)
    save(model, opt, tmp_path)
    model2, opt2 = load(case, tmp_path)
    assert counters(opt2) == counters(opt)
    assert_nested_equal(native(opt2.state_dict()), native(opt.state_dict()))
    assert_same_runs((model, opt), (model2, opt2))


@pytest.mark.parametrize("case", list(CASES))
def test_a_dcp_checkpoint_of_a_fresh_optimizer_resumes_as_if_none_was_taken(case, tmp_path):
    """Saved before the first step (the state DCP initializes, the entries a fresh wrapper fills with zeros):
    loading it changes nothing about the run that follows."""
    model = mlp(0)
    reference = copy.deepcopy(model)
    save(model, build(case, model), tmp_path)
    model2, opt2 = load(case, tmp_path)
    assert_same_runs((reference, build(case, reference)), (model2, opt2))


@pytest.mark.parametrize("case", list(CASES))
def test_dcp_initialization_moves_nothing_and_gives_a_fresh_optimizer_the_trained_ones_entries(case):
    """DCP's ``step()`` at lr 0 over zero gradients allocates the base's state and moves no weight or
    counter; the fresh state dict then has every entry, with the same shapes and dtypes, that a trained one
    has (DCP loads only into entries the target has: one missing would silently not be restored)."""
    model = mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build(case, model)
    fresh = dcp_state.get_optimizer_state_dict(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert set(counters(opt).values()) <= {0, None}
    trained_model = mlp(0)
    trained = build(case, trained_model)
    train(trained, trained_model, 5)
    assert structure(fresh) == structure(dcp_state.get_optimizer_state_dict(trained_model, trained))


@pytest.mark.parametrize("name", NAMES)
def test_a_step_without_closure_is_refused_unless_it_is_dcps_initialization(name):
    """Zero gradients at a nonzero lr, or nonzero gradients at lr 0, is a forgotten closure, not DCP."""
    model = mlp(0)
    opt = build(name, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    for group in opt.param_groups:
        group["lr"] = 0.0
    next(model.parameters()).grad[0, 0] = 1.0
    with pytest.raises(TypeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("case", ["looksam-k3", "ssamf-sparse", "salr-looksam", "tracesam", "entropysgd", "aesam"])
def test_the_layout_dcp_keeps_holds_every_entry_and_the_earlier_layout_still_loads(case):
    """The public layout keeps the wrapper's state where DCP keeps it (per-parameter tensors beside the base's
    in ``state``, the rest in the first param group); the earlier layout (a top-level ``"sharpness"`` entry)
    loads into the same state."""
    model = mlp(0)
    opt = build(case, model)
    train(opt, model, 5)
    public = opt.state_dict()
    assert set(public) == {"state", "param_groups"} and "sharpness" in public["param_groups"][0]
    earlier = native(public)
    assert "sharpness" in earlier and earlier["sharpness"]["version"] == 1
    model2 = mlp(5)
    model2.load_state_dict(model.state_dict())
    opt2 = build(case, model2)
    opt2.load_state_dict(earlier)
    assert_nested_equal(opt2.state_dict(), public)


LEGACY = torch.load(Path(__file__).parent / "data" / "legacy_state_dicts.pt", weights_only=True)


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_a_state_dict_saved_by_the_earlier_version_resumes_its_run_exactly(case):
    """State dicts written by the package before this layout (``data/make_legacy_state_dicts.py``, run on
    commit e174c8a), loaded today: 4 more steps reach the weights that version reached."""
    saved = LEGACY[case]
    model = mlp(5)
    model.load_state_dict(saved["model"])
    opt = build(case, model)
    opt.load_state_dict(saved["opt"])
    train(opt, model, 4)
    for p, expected in zip(model.parameters(), saved["after"], strict=True):
        assert torch.equal(p, expected)


@pytest.mark.parametrize("name", ["looksam", "aesam", "tracesam"])
def test_dcp_resumes_an_optimizer_with_two_param_groups(name, tmp_path):
    """Weights and biases in two groups with their own lr and rho: DCP maps each saved group to the group
    holding the same parameter names, the wrapper's entry (in the first) included."""

    def build_groups(model):
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        base = torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 0.05, "rho": 0.02}], lr=0.1,
                               momentum=0.9)
        return create_for_test(name, base, rho=0.1, total_steps=12, **({"k": 2} if name == "looksam" else {}))

    model = mlp(0)
    opt = build_groups(model)
    train(opt, model, 5)
    save(model, opt, tmp_path)
    model2 = mlp(5)
    opt2 = build_groups(model2)
    load_into(model2, opt2, tmp_path)
    assert [g["rho"] for g in opt2.param_groups] == [0.1, 0.02]
    assert_same_runs((model, opt), (model2, opt2))
