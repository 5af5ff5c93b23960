"""The base optimizer's own settings in a run config: ``base_options`` (Nesterov, Adam's betas and eps, ...) and
``decay_biases_and_norms`` (no weight decay on parameters with at most one dimension), checked against the
update rules written out by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sharpness import make_closure
from sharpness.cli import app
from sharpness.harness import Store, TrainConfig
from sharpness.harness.store import run_key
from sharpness.harness.train import build_base_optimizer, build_optimizer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()


def _quadratic_steps(optimizer: torch.optim.Optimizer, model: nn.Module, steps: int) -> None:
    """``steps`` steps on L = 0.5 * sum_p ||p||^2 (grad p = p)."""
    for _ in range(steps):
        optimizer.zero_grad()
        sum(0.5 * p.pow(2).sum() for p in model.parameters()).backward()
        optimizer.step()


def test_nesterov_follows_the_update_rule_by_hand():
    model = _net()
    start = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.0, base_options={"nesterov": True})
    _quadratic_steps(build_base_optimizer(config, model), model, 3)
    for p, w in zip(model.parameters(), start):
        buf = torch.zeros_like(w)
        for _ in range(3):  # b <- mu b + g; w <- w - lr (g + mu b)   (Sutskever et al. as torch writes it)
            g = w
            buf = 0.9 * buf + g
            w = w - 0.1 * (g + 0.9 * buf)
        torch.testing.assert_close(p.detach(), w, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("base", ["adam", "adamw"])
def test_adam_betas_and_eps_follow_the_update_rule_by_hand(base):
    model = _net()
    start = [p.detach().clone() for p in model.parameters()]
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.8, 0.95), 1e-3
    config = TrainConfig(base=base, lr=lr, weight_decay=wd, base_options={"betas": [b1, b2], "eps": eps})
    _quadratic_steps(build_base_optimizer(config, model), model, 3)
    for p, w in zip(model.parameters(), start):
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        for t in (1, 2, 3):
            g = w if base == "adamw" else w + wd * w  # Adam: L2 in the gradient; AdamW: decoupled
            if base == "adamw":
                w = w * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["erm", "sam", "asam", "gnr", "looksam"])
def test_biases_and_norms_get_no_weight_decay(optimizer):
    """With a zero loss the only update is weight decay: w <- (1 - lr wd) w for matrices, unchanged for biases
    and the LayerNorm's scale and shift; every method's groups carry the split."""
    model = _net()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(optimizer=optimizer, lr=0.5, momentum=0.0, weight_decay=0.1, decay_biases_and_norms=False)
    opt = build_optimizer(config, model, total_steps=10)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    x = torch.randn(5, 3, dtype=torch.float64)

    opt.step(make_closure(opt, lambda reduction: 0.0 * model(x).sum(-1).mean() if reduction == "mean"
                          else 0.0 * model(x).sum(-1)))
    for name, p in model.named_parameters():
        expected = start[name] * (1 - 0.5 * 0.1) if p.ndim >= 2 else start[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=0.0, msg=name)


def test_every_parameter_decays_by_default():
    model = _net()
    (group,) = build_base_optimizer(TrainConfig(weight_decay=0.1), model).param_groups
    assert group["weight_decay"] == 0.1 and len(group["params"]) == 6


def test_a_network_without_one_dimensional_parameters_gets_one_group():
    model = nn.Linear(3, 2, bias=False)
    (group,) = build_base_optimizer(TrainConfig(decay_biases_and_norms=False), model).param_groups
    assert group["weight_decay"] == 5e-4


def test_defaults_leave_run_ids_unchanged_and_lists_equal_tuples():
    assert "base_options" not in TrainConfig().to_dict()
    assert "decay_biases_and_norms" not in TrainConfig().to_dict()
    a = TrainConfig(base="adam", base_options={"betas": [0.9, 0.95], "eps": 1})
    b = TrainConfig(base="adam", base_options={"betas": (0.9, 0.95), "eps": 1.0})
    assert a == b and run_key(a.to_dict()) == run_key(b.to_dict())
    again = TrainConfig.from_dict(json.loads(json.dumps(a.to_dict())))  # as the store reads it back
    assert again == a and run_key(again.to_dict()) == run_key(a.to_dict())
    assert run_key(TrainConfig(decay_biases_and_norms=False).to_dict()) != run_key(TrainConfig().to_dict())


@pytest.mark.parametrize("kwargs, error, message", [
    ({"base_options": {"betas": [0.9, 0.99]}}, ValueError,
     "Unknown base_options key(s) ['betas'] for base 'sgd' (valid keys: dampening, nesterov;"),
    ({"base": "adamw", "base_options": {"lr": 0.1}}, ValueError, "lr, momentum and weight_decay are config fields"),
    ({"base": "adam", "base_options": {"foreach": True}}, ValueError, "Unknown base_options key(s) ['foreach']"),
    ({"base_options": {"nesterov": "yes"}}, TypeError, "Invalid base_options.nesterov type: str (expected bool)"),
    ({"base_options": {"nesterov": True}, "momentum": 0.0}, ValueError,
     "Nesterov momentum requires a momentum and zero dampening"),
    ({"base": "adam", "base_options": {"betas": [0.9]}}, TypeError, "expected 2 numbers, e.g. [0.9, 0.999]"),
    ({"base": "adam", "base_options": {"betas": [0.9, 1.5]}}, ValueError, "Invalid beta parameter at index 1: 1.5"),
    ({"base": "adam", "base_options": {"eps": -1e-8}}, ValueError, "Invalid epsilon value: -1e-08"),
    ({"base": "adam", "base_options": {"eps": float("nan")}}, ValueError,
     "Invalid base_options.eps value: nan (expected a finite number)"),
    ({"base": "adam", "base_options": {"eps": "1e-8"}}, TypeError, "Invalid base_options.eps type: str"),
    ({"base_options": [("nesterov", True)]}, TypeError, "Invalid base_options type: list"),
    ({"decay_biases_and_norms": "false"}, TypeError, "Invalid decay_biases_and_norms type: str (expected bool)"),
])
def test_bad_base_settings_are_refused(kwargs, error, message):
    with pytest.raises(error) as info:
        TrainConfig(**kwargs)
    assert message in str(info.value)


def test_command_line_sets_and_stores_them(tmp_path):
    db = tmp_path / "results.sqlite"
    result = CliRunner().invoke(app, ["train", "--dataset", "digits", "--model", "mlp", "--batch-size", "128",
                                      "--budget-steps", "2", "-q", "--optimizer", "sam", "--base", "adamw",
                                      "--base-opt", "betas=[0.9,0.95]", "--base-opt", "eps=1e-6",
                                      "--no-decay-biases-and-norms", "--db", str(db)])
    assert result.exit_code == 0, result.output
    with Store(db) as store:
        (run,) = store.runs()
    assert run.config["base_options"] == {"betas": [0.9, 0.95], "eps": 1e-6}
    assert run.config["decay_biases_and_norms"] is False
    bad = CliRunner().invoke(app, ["train", "--base-opt", "nesterov=true", "--momentum", "0", "-q"])
    assert bad.exit_code == 2 and "Nesterov momentum requires a momentum" in " ".join(bad.output.split())


def test_weight_decay_groups_for_a_hand_built_optimizer():
    """The public helper behind ``decay_biases_and_norms = false``: matrices and kernels decay, the rest not."""
    import sharpness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))  # materialise the lazy layer
    model[0].bias.requires_grad_(False)
    groups = sharpness.weight_decay_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [id(p) for p in groups[0]["params"]] == [id(model[0].weight), id(model[3].weight)]
    assert [id(p) for p in groups[1]["params"]] == [id(model[1].weight), id(model[1].bias), id(model[3].bias)]
    assert sharpness.weight_decay_groups(list(model.parameters()), 0.05) == groups  # a list of parameters too
    opt = sharpness.SAM(torch.optim.AdamW(groups, lr=1e-3), rho=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert build_base_optimizer(TrainConfig(weight_decay=0.05, decay_biases_and_norms=False),
                                model).param_groups[1]["params"] == groups[1]["params"]
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="Invalid weight_decay value"):
            sharpness.weight_decay_groups(model, bad)


def test_sweep_files_merge_base_options_key_by_key_and_match_them(tmp_path):
    from sharpness.harness import plan_sweep

    path = tmp_path / "sweep.toml"
    path.write_text("""
seeds = [0]
[base]
dataset = "digits"
model = "mlp"
base = "adam"
budget_steps = 4
base_options = { betas = [0.9, 0.95] }
[[methods]]
optimizer = "erm"
"base_options.eps" = 1e-6
[[methods]]
optimizer = "sam"
decay_biases_and_norms = false
[[overrides]]
match = { optimizer = "sam", "base_options.betas" = [0.9, 0.95] }
"base_options.amsgrad" = true
""")
    erm, sam = plan_sweep(path).configs
    assert erm.base_options == {"betas": (0.9, 0.95), "eps": 1e-6}
    assert sam.base_options == {"betas": (0.9, 0.95), "amsgrad": True} and not sam.decay_biases_and_norms
