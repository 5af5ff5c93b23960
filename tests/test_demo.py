"""The embedded default job (``python -m sharpness``) on a tiny budget: one epoch per run."""

from __future__ import annotations

import random
import re
import runpy
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")

from sharpness import list_optimizers  # noqa: E402
from sharpness.demo import load_mnist1d, main, run  # noqa: E402

TINY = ["--epochs", "1", "--batch-size", "128"]
STEPS_PER_EPOCH = 4000 // 128 + 1  # 31 full batches and one of 32

SUMMARY = re.compile(
    r"^(?P<name>\w+): test accuracy (?P<acc>[\d.]+)%  %SAM (?P<sam>[\d.]+)  "
    r"gradient evaluations (?P<evals>\d+)  steps (?P<steps>\d+)  wall time",
    re.MULTILINE,
)


def parse_summary(out: str) -> dict[str, float]:
    """The numbers of the printed summary line."""
    matches = list(SUMMARY.finditer(out))
    assert len(matches) == 1, out
    m = matches[0]
    return {"acc": float(m["acc"]) / 100, "sam": float(m["sam"]) / 100, "evals": int(m["evals"]),
            "steps": int(m["steps"]), "name": m["name"]}


@pytest.mark.parametrize("name", [info.name for info in list_optimizers()] + ["sgd"])
def test_summary_matches_optimizer_counters(name, capsys):
    result = run([*TINY, "--optimizer", name])
    out = capsys.readouterr().out
    printed = parse_summary(out)
    assert len(re.findall(r"^epoch +\d+/1 ", out, re.MULTILINE)) == 1

    opt = result.optimizer
    if name == "sgd":
        assert isinstance(opt, torch.optim.SGD)
        assert (result.steps, result.sam_steps, result.grad_evals) == (STEPS_PER_EPOCH, 0, STEPS_PER_EPOCH)
    else:
        assert (result.steps, result.sam_steps, result.grad_evals) == (opt.steps, opt.sam_steps, opt.grad_evals)
        assert opt.steps == STEPS_PER_EPOCH
        assert opt.grad_evals == opt.steps + opt.sam_steps
        assert result.sam_fraction == opt.sam_fraction
    assert result.closure_calls == result.grad_evals  # counted by the loop, independently of the wrapper
    assert printed == {"name": name, "acc": pytest.approx(result.test_accuracy, abs=1e-4),
                       "sam": pytest.approx(result.sam_fraction, abs=1e-3), "evals": result.grad_evals,
                       "steps": result.steps}
    assert 0.0 <= result.test_accuracy <= 1.0  # one epoch is too short to learn much; see the slow test


def test_fixed_fractions_of_fixed_policies():
    assert run([*TINY, "--optimizer", "sam"]).sam_steps == STEPS_PER_EPOCH
    assert run([*TINY, "--optimizer", "looksam"]).sam_steps == -(-STEPS_PER_EPOCH // 5)  # k = 5


def test_runs_are_deterministic_and_leave_global_state_alone():
    torch.manual_seed(1234)
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    first = run([*TINY, "--seed", "3"])
    second = run([*TINY, "--seed", "3"])
    other = run([*TINY, "--seed", "4"])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    assert first == second  # every field but the timings and the optimizer object
    assert first.optimizer.policy.state_dict() == second.optimizer.policy.state_dict()
    assert (other.test_accuracy, other.sam_steps) != (first.test_accuracy, first.sam_steps)


@pytest.fixture(scope="module", autouse=True)
def first_load(tmp_path_factory):
    """Generate the data once for this module (before any run), in an empty working directory."""
    load_mnist1d.cache_clear()
    workdir = tmp_path_factory.mktemp("cwd")
    random.seed(7)
    np.random.seed(7)
    py_state, np_state = random.getstate(), np.random.get_state()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        data = load_mnist1d()
    return {"data": data, "files": list(workdir.iterdir()), "py_state_kept": random.getstate() == py_state,
            "np_state_kept": np.array_equal(np.random.get_state()[1], np_state[1])}


def test_data_is_generated_in_memory(first_load):
    assert first_load["files"] == []  # nothing downloaded or pickled into the working directory
    assert first_load["py_state_kept"] and first_load["np_state_kept"]  # mnist1d reseeds them globally
    x, y, x_test, y_test = first_load["data"]
    assert (tuple(x.shape), tuple(x_test.shape), tuple(y.shape), tuple(y_test.shape)) == (
        (4000, 40), (1000, 40), (4000,), (1000,))
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert sorted(y.unique().tolist()) == list(range(10))
    assert sorted(y_test.unique().tolist()) == list(range(10))
    assert load_mnist1d() is first_load["data"]  # cached: later runs reuse it


def test_main_returns_exit_status_zero(capsys):
    assert main([*TINY, "--optimizer", "sgd"]) == 0
    assert parse_summary(capsys.readouterr().out)["steps"] == STEPS_PER_EPOCH


def test_python_dash_m_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m sharpness", *TINY, "--optimizer", "aelooksam"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("sharpness", run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 0
    assert parse_summary(capsys.readouterr().out)["name"] == "aelooksam"


@pytest.mark.parametrize("argv", [["--optimizer", "adam"], ["--epochs", "0"], ["--lr", "-1"]])
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_default_job_reaches_a_sensible_accuracy(capsys):
    result = run([])  # AE-SAM, 30 epochs: about 94% test accuracy in 15-25 s
    assert result.test_accuracy >= 0.9
    assert 0.3 <= result.sam_fraction <= 0.6
    assert result.grad_evals == result.steps + result.sam_steps
