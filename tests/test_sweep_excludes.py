"""Sweep files' ``[[excludes]]``: the runs they leave out (checked against by-hand lists), their clear errors, how
they interplay with ``[[overrides]]``, and the shipped example that uses them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sharpness.harness import TrainConfig, plan_sweep, run_key
from sharpness.harness.sweep import expand_sweep, load_sweep_file

HEAD = """
seeds = [0, 1]
datasets = ["digits", "mnist1d"]
[base]
model = "mlp"
model_options = { depth = 2 }
batch_size = 64
budget_steps = 40
"""

METHODS = """
[[variants]]
[[variants]]
label_noise = 0.2
[[methods]]
optimizer = "erm"
[[methods]]
optimizer = "sam"
optimizer_options = { rho = 0.05 }
[[methods]]
optimizer = "asam"
optimizer_options = { rho = 0.5 }
"""

EXCLUDES = """
[[excludes]]                          # one (dataset, method) pair
match = { dataset = "mnist1d", optimizer = "asam" }
[[excludes]]                          # one method under a variant, by a dotted option
match = { label_noise = 0.2, "optimizer_options.rho" = 0.05 }
[[excludes]]                          # defaults count: the clean variant sets neither field
match = { dataset = "digits", optimizer = "erm", label_noise = 0.0, subset_strategy = "stratified" }
"""

OPTIONS = {"erm": {}, "sam": {"rho": 0.05}, "asam": {"rho": 0.5}}


def _write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _left_out(dataset: str, noise: float, method: str) -> bool:
    """The runs EXCLUDES leave out, written out by hand."""
    return ((dataset, method) == ("mnist1d", "asam") or (noise, method) == (0.2, "sam")
            or (dataset, noise, method) == ("digits", 0.0, "erm"))


def test_excludes_leave_out_the_matching_runs(tmp_path):
    plan = plan_sweep(_write(tmp_path, HEAD + METHODS + EXCLUDES))
    expected = []
    for dataset in ("digits", "mnist1d"):
        for noise in (0.0, 0.2):
            for method in ("erm", "sam", "asam"):
                for seed in (0, 1):
                    if not _left_out(dataset, noise, method):
                        expected.append(TrainConfig(dataset=dataset, model="mlp", model_options={"depth": 2},
                                                    batch_size=64, budget_steps=40, epochs=None, optimizer=method,
                                                    optimizer_options=OPTIONS[method], label_noise=noise, seed=seed))
    assert len(expected) == 2 * 2 * 3 * 2 - 4 - 4 - 2
    assert list(plan.configs) == expected


def test_remaining_runs_keep_the_run_ids_they_have_without_excludes(tmp_path):
    """Excluding runs changes neither the order nor the ids of the others: a store filled before an exclude was
    added still holds them."""
    full = plan_sweep(_write(tmp_path, HEAD + METHODS, "full.toml"))
    kept = plan_sweep(_write(tmp_path, HEAD + METHODS + EXCLUDES, "kept.toml"))
    assert len(full) == 24 and len(kept) == 14
    expected = [key for key, c in zip(full.keys, full.configs) if not _left_out(c.dataset, c.label_noise, c.optimizer)]
    assert kept.keys == expected


def test_excludes_are_matched_before_overrides(tmp_path):
    """Excludes see the run as base, variant, method and grid define it, as overrides' match does: an exclude on a
    value an override sets matches nothing, and one on the value it replaces still leaves the run out."""
    overrides = """
        [[methods]]
        optimizer = "erm"
        [[methods]]
        optimizer = "sam"
        [[overrides]]                     # matches SAM on both data sets; only digits' runs remain to change
        match = { optimizer = "sam" }
        lr = 0.5
        """
    plan = plan_sweep(_write(tmp_path, HEAD + textwrap.dedent(overrides) + textwrap.dedent("""
        [[excludes]]                      # the lr before the override (TrainConfig's default 0.1)
        match = { optimizer = "sam", lr = 0.1, dataset = "mnist1d" }
        """)))
    assert [(c.dataset, c.optimizer, c.lr, c.seed) for c in plan.configs] == [
        ("digits", "erm", 0.1, 0), ("digits", "erm", 0.1, 1), ("digits", "sam", 0.5, 0), ("digits", "sam", 0.5, 1),
        ("mnist1d", "erm", 0.1, 0), ("mnist1d", "erm", 0.1, 1)]
    with pytest.raises(ValueError, match=r"Exclude\(s\) \[0\] in sweep.toml match no run: "
                                         r"match = \{'optimizer': 'sam', 'lr': 0.5\}"):
        plan_sweep(_write(tmp_path, HEAD + textwrap.dedent(overrides)
                          + '[[excludes]]\nmatch = { optimizer = "sam", lr = 0.5 }\n'))


def test_an_override_that_matches_only_excluded_runs_is_an_error(tmp_path):
    """It would change nothing, like an override that matches no run (a leftover from before the exclude)."""
    text = HEAD + METHODS + EXCLUDES + '[[overrides]]\nmatch = { dataset = "mnist1d", optimizer = "asam" }\nlr = 0.5\n'
    with pytest.raises(ValueError, match=r"Override\(s\) \[0\] in sweep.toml match no run: .*; override\(s\) \[0\] "
                                         r"match only runs that \[\[excludes\]\] leave out"):
        plan_sweep(_write(tmp_path, text))


def test_an_invalid_combination_can_be_excluded(tmp_path):
    """A run that does not build (here SAM's two gradient evaluations a step under a budget of one) is matched
    against its fields as given; left out, it is no error, and kept, its own error is raised."""
    text = HEAD + """
        [[variants]]
        [[variants]]
        budget_grad_evals = 1
        [[methods]]
        optimizer = "erm"
        [[methods]]
        optimizer = "sam"
        """
    exclude = '[[excludes]]\nmatch = { optimizer = "sam", budget_grad_evals = 1 }\n'
    plan = plan_sweep(_write(tmp_path, text + exclude))
    assert [(c.dataset, c.optimizer, c.budget_grad_evals) for c in plan.configs[::2]] == [
        ("digits", "erm", None), ("digits", "sam", None), ("digits", "erm", 1),
        ("mnist1d", "erm", None), ("mnist1d", "sam", None), ("mnist1d", "erm", 1)]
    for other in ("", '[[excludes]]\nmatch = { optimizer = "sam", dataset = "mnist1d" }\n'):
        with pytest.raises(ValueError, match=r"variants\[1\] methods\[1\].*dataset 'digits': Invalid "
                                             r"budget_grad_evals value: 1"):
            plan_sweep(_write(tmp_path, text + other))


@pytest.mark.parametrize("top, tables, match", [
    ("", '[[excludes]]\nmatch = { optimizer = "erm" }\nlr = 0.5\n',
     r"Unknown key\(s\) \['lr'\] in sweep.toml excludes\[0\] \(expected only match = .*use \[\[overrides\]\]"),
    ("", "[[excludes]]\nmatch = {}\n", r"Invalid match in sweep.toml excludes\[0\]: \{\} \(expected a non-empty"),
    ("", "[[excludes]]\n", r"Invalid match in sweep.toml excludes\[0\]: None"),
    ("", '[[excludes]]\nmatch = "erm"\n', r"Invalid match in sweep.toml excludes\[0\]: 'erm'"),
    ("", "[[excludes]]\nmatch = { lrr = 0.1 }\n", r"Unknown match key 'lrr' in sweep.toml excludes\[0\]"),
    ("", '[[excludes]]\nmatch = { "optimizer.rho" = 0.1 }\n',
     r"Unknown match key 'optimizer.rho' in sweep.toml excludes\[0\] \(expected a TrainConfig field or optim"),
    ("", '[[excludes]]\nmatch = { optimizer = "sam" }\n[[excludes]]\nmatch = { optimizer = "adam" }\n',
     r"Exclude\(s\) \[1\] in sweep.toml match no run: match = \{'optimizer': 'adam'\} \(check the field names"),
    ("", '[[excludes]]\nmatch = { "optimizer_options.rho" = 0.05 }\n', r"Exclude\(s\) \[0\] .* match no run"),
    ("excludes = 3\n", "", r"Invalid excludes value in sweep.toml: 3"),
    ("", '[[excludes]]\nmatch = { optimizer = "erm" }\n[[excludes]]\nmatch = { optimizer = "sam" }\n',
     r"Invalid excludes in sweep.toml: they leave out all 8 runs \(expected at least one run to remain\)"),
])
def test_bad_excludes_give_clear_errors(tmp_path, top, tables, match):
    methods = '[[methods]]\noptimizer = "erm"\n[[methods]]\noptimizer = "sam"\n'  # SAM's rho is its default
    with pytest.raises(ValueError, match=match):
        plan_sweep(_write(tmp_path, top + HEAD + methods + tables))


def test_cifar_salr_example_is_both_tables():
    """examples/cifar_salr.toml against the SALR paper's tables as its header transcribes them: Tables 1-2 on
    CIFAR-10 (four networks, six methods, SGD and Adam halves) and Table 3 on CIFAR-100 (five networks, no
    Entropy-SGD-SALR, no Adam half, batch 256 with the rates doubled, SAM's rho 0.1)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "cifar_salr.toml"
    configs = expand_sweep(load_sweep_file(path))

    def network(c):
        return f"{c.model}{c.model_options.get('depth', '')}"

    def method(c):
        return "swa" if c.swa_start is not None else c.optimizer_options.get("inner", c.optimizer)

    cifar10 = [c for c in configs if c.dataset == "cifar10"]
    cifar100 = [c for c in configs if c.dataset == "cifar100"]
    assert len(cifar10) == 4 * 6 * 2 * 3 and len(cifar100) == 5 * 5 * 3 and len(configs) == 219
    assert {network(c) for c in cifar10} == {"resnet50", "allcnn", "resnet101", "regnetx"}
    assert {network(c) for c in cifar100} == {"resnet18", "regnetx", "mobilenetv2", "wideresnet", "pyramidnet"}
    assert {method(c) for c in cifar10} == {"erm", "swa", "entropysgd", "sam", "salr"}
    assert sum(c.optimizer_options.get("inner") == "entropysgd" for c in cifar10) == 4 * 2 * 3
    assert not any("inner" in c.optimizer_options for c in cifar100)
    assert {c.base for c in cifar10} == {"sgd", "adam"} and {c.base for c in cifar100} == {"sgd"}
    for c in configs:
        entropy = c.optimizer == "entropysgd" or c.optimizer_options.get("inner") == "entropysgd"
        if c.dataset == "cifar10":
            assert (c.batch_size, c.budget_grad_evals) == (128, 78200)
            assert c.lr == (1e-3 if c.base == "adam" else 1.0 if entropy else 0.01)
            swa = (5e-4, 1e-5) if c.base == "adam" else (5e-3, 1e-4)
            rho = 0.05
        else:
            assert (c.batch_size, c.budget_grad_evals) == (256, 39200)
            assert c.lr == (1.0 if entropy else 0.02)
            swa, rho = (1e-2, 2e-4), 0.1
        if c.swa_start is not None:
            assert (c.swa_start, c.swa_lr, c.swa_lr_min) == (0.75, *swa)
        if c.optimizer == "sam":
            assert c.optimizer_options == {"rho": rho}
    assert len({run_key(c.to_dict()) for c in configs}) == 219
