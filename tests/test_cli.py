"""The ``sharpness`` command line: list, train into the store, skip finished runs, clear errors."""

from __future__ import annotations

import json
import re
import runpy
import sys

import pytest
from typer.testing import CliRunner

from sharpness.cli import app
from sharpness.harness import Store

runner = CliRunner()
TINY = ["--dataset", "digits", "--model", "mlp", "--batch-size", "128", "--budget-grad-evals", "24", "-q"]
SUMMARY = re.compile(r"test accuracy (?P<acc>[\d.]+)%  %SAM (?P<sam>[\d.]+)  gradient evaluations (?P<evals>\d+)  "
                     r"steps (?P<steps>\d+)")


def test_list_shows_every_registry():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("aesam", "erm", "mnist1d", "cifar10", "cnn1d", "resnet18", "lambda_max", "gnr"):
        assert re.search(rf"^\s+{name}\s+\S", result.output, re.MULTILINE), name
    bad = runner.invoke(app, ["list", "losses"])
    assert bad.exit_code == 2 and "optimizers, datasets, models, measures" in " ".join(bad.output.split())


@pytest.mark.parametrize("optimizer, steps", [("erm", 24), ("sam", 12)])
def test_train_reports_the_budgeted_counters(optimizer, steps):
    result = runner.invoke(app, ["train", *TINY, "--optimizer", optimizer])
    assert result.exit_code == 0, result.output
    match = SUMMARY.search(result.output)
    assert int(match["evals"]) == 24 and int(match["steps"]) == steps


def test_train_with_validation_prints_the_validation_accuracy_it_stores(tmp_path):
    db = tmp_path / "results.sqlite"
    result = runner.invoke(app, ["train", *TINY, "--optimizer", "erm", "--validation", "0.2", "--db", str(db)])
    assert result.exit_code == 0, result.output
    printed = re.search(r"validation accuracy (?P<acc>[\d.]+)%  test accuracy", result.output)
    with Store(db) as store:
        (run,) = store.runs()
    assert float(printed["acc"]) == pytest.approx(100 * run.summary["val_acc"], abs=0.005)


def test_python_spelled_literals_are_read_as_json_ones(tmp_path):
    db = tmp_path / "results.sqlite"
    result = runner.invoke(app, ["train", *TINY, "--optimizer", "asam", "--opt", "adaptive_1d=False",
                                 "--db", str(db)])
    assert result.exit_code == 0, result.output
    with Store(db) as store:
        (run,) = store.runs()
    assert run.config["optimizer_options"] == {"adaptive_1d": False}  # the bool, not the truthy string "False"


def test_multistep_schedule_from_the_command_line(tmp_path):
    db = tmp_path / "results.sqlite"
    args = ["train", *TINY, "--optimizer", "erm", "--schedule", "multistep", "--db", str(db)]
    result = runner.invoke(app, [*args, "--lr-milestones", "0.25,0.75", "--lr-gamma", "0.5", "--warmup", "0.1"])
    assert result.exit_code == 0, result.output
    with Store(db) as store:
        (run,) = store.runs()
    assert run.config["lr_milestones"] == [0.25, 0.75] and run.config["lr_gamma"] == 0.5
    assert run.config["warmup"] == 0.1
    assert run.epochs[-1]["lr"] == pytest.approx(0.1 * 0.5**2)  # both milestones passed by the last step
    for extra, message in ((["--lr-milestones", "0.5,x"], "expected comma-separated fractions"),
                           ([], "Invalid lr_milestones value: ()")):
        bad = runner.invoke(app, [*args, *extra])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output


def test_measure_examples_reaches_the_config_and_is_checked(tmp_path):
    db = tmp_path / "results.sqlite"
    args = ["train", *TINY, "--optimizer", "erm", "--measure", "lambda_max", "--db", str(db)]
    result = runner.invoke(app, [*args, "--measure-examples", "40"])
    assert result.exit_code == 0, result.output
    with Store(db) as store:
        (run,) = store.runs()
    assert run.config["measure_examples"] == 40 and run.epochs[-1]["sharpness.lambda_max"] > 0
    bad = runner.invoke(app, [*args, "--measure-examples", "0"])
    assert bad.exit_code == 2 and "Invalid measure_examples value: 0" in " ".join(bad.output.split())


def test_train_writes_the_store_once_and_skips_a_finished_run(tmp_path):
    db = tmp_path / "results.sqlite"
    args = ["train", *TINY, "--optimizer", "aesam", "--opt", "rho=0.1", "--db", str(db),
            "--checkpoint-dir", str(tmp_path / "ck")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already in" in again.output
    with Store(db) as store:
        (run,) = store.runs()
    assert run.config["optimizer_options"] == {"rho": 0.1}
    assert run.summary["grad_evals"] == run.summary["steps"] + run.summary["sam_steps"]
    assert run.environment["torch"] and len(run.epochs) >= 1
    assert list((tmp_path / "ck").glob("*.pt"))


@pytest.mark.parametrize("args, fragment", [
    (["--optimizer", "adamsam"], "Unknown optimizer name: 'adamsam' (expected one of"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--lr", "-0.1"], "Invalid lr value"),
    (["--opt", "rho"], "expected KEY=VALUE"),
    (["--opt", "rho=-1"], "Invalid rho value: -1.0"),
    (["--opt", "rho=abc"], "Invalid rho type: str 'abc' (expected a real number)"),
    (["--opt", "rho=NaN"], "Invalid value for --opt: 'rho=NaN' is not a finite number"),
    (["--opt", "rho=1e400"], "'rho=1e400' is not a finite number"),
    (["--optimizer", "sam", "--opt", "rhoo=0.1"],
     ("Unknown option(s) ['rhoo'] for optimizer 'sam' (valid options: check_finite, eps, foreach, rho, "
      "sync_perturbation)")),
    (["--optimizer", "entropysgd", "--opt", "L=3"],
     "Unknown option(s) ['L'] for optimizer 'entropysgd' (valid options: alpha,"),
    (["--budget-steps", "0"], "budget_steps"),
])
def test_bad_input_gives_a_clear_error(args, fragment):
    result = runner.invoke(app, ["train", *TINY, *args])
    assert result.exit_code == 2
    assert fragment in " ".join(result.output.split()), result.output


def test_a_budget_below_one_step_and_a_last_step_divergence_are_errors(tmp_path):
    """A gradient-evaluation budget smaller than one step trained nothing and crashed printing an empty summary (in
    a sweep after storing a run with no numbers); a run whose last update diverged was stored with a NaN test loss
    (no later pass checks it)."""
    db = tmp_path / "r.sqlite"
    small = runner.invoke(app, ["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "sam",
                                "--budget-grad-evals", "1", "--db", str(db)])
    assert small.exit_code == 2 and "Invalid budget_grad_evals value: 1 (one sam step takes up to 2 gradient " \
        "evaluations" in " ".join(small.output.split())
    diverged = runner.invoke(app, ["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "erm",
                                   "--budget-steps", "2", "--lr", "1e6", "--db", str(db)])
    assert diverged.exit_code == 2 and "Training diverged: test loss nan after step 2" in diverged.output
    with Store(db) as store:
        assert store.runs() == []


def test_a_failing_sweep_run_is_one_error_line(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text('db = "s.sqlite"\n[base]\ndataset = "digits"\nmodel = "mlp"\nbudget_steps = 5\n'
                     '[[methods]]\noptimizer = "sam"\nlr = 1e6\n')
    result = runner.invoke(app, ["sweep", str(sweep), "--device", "cpu", "-q"])
    assert result.exit_code == 2
    assert re.search(r"error: run [0-9a-f]{16}: Training diverged at step 2", result.output), result.output
    assert "rerun to resume" in result.output and "Traceback" not in result.output


def test_paths_that_cannot_be_used_are_one_error_line(tmp_path):
    """A file where a directory is needed, a directory where a file is, a file that is not a store: one error line
    naming the path and exit code 2 (these were tracebacks), and no advice to rerun a sweep that trained nothing."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "notdb.sqlite").write_text("not a database" * 100)
    sweep = tmp_path / "s.toml"
    sweep.write_text('[base]\ndataset = "digits"\nmodel = "mlp"\nbudget_steps = 2\n')
    afile = str(tmp_path / "afile")
    good_db = tmp_path / "good.sqlite"
    assert runner.invoke(app, ["train", *TINY, "--db", str(good_db)]).exit_code == 0
    cases = [
        (["train", *TINY, "--db", afile + "/x.sqlite"], f"Invalid value for --db: cannot use {afile}: File exists "
                                                        "(a file is where a directory is needed)"),
        (["train", *TINY, "--checkpoint-dir", afile], f"Invalid value for --checkpoint-dir: cannot use {afile}"),
        (["sweep", str(sweep), "-q", "--db", afile + "/x.sqlite"], f"error: cannot use {afile}: File exists"),
        (["sweep", str(sweep), "-q", "--checkpoint-dir", afile], f"error: cannot use {afile}: File exists"),
        (["sweep", str(sweep), "-q", "--db", str(tmp_path / "notdb.sqlite")], "error: Not a sharpness results store"),
        (["export", "--db", str(good_db), "--csv", str(tmp_path / "adir")],
         f"error: cannot use {tmp_path / 'adir'}"),
        (["report", "--db", str(good_db), "--out", afile], f"error: cannot use {afile}: File exists"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        text = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and message in text, (args, result.output)
        assert "Traceback" not in result.output and "rerun to resume" not in result.output, result.output


@pytest.mark.parametrize("error, printed", [(ValueError("bad value"), False), (FloatingPointError("nan"), False),
                                            (KeyboardInterrupt(), False), (RuntimeError("a bug"), True)])
def test_a_sweep_worker_prints_a_traceback_only_for_an_unexpected_error(error, printed, monkeypatch, capsys):
    """With --jobs, a worker's user-level error (and Ctrl-C) is reported by the parent in one line; only an
    unexpected one prints where in the worker it happened."""
    import os
    import queue

    from sharpness.harness import sweep

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(sweep, "run_sweep", fail)
    monkeypatch.setattr(sweep.torch, "set_num_threads", lambda n: None)  # (this process's threads stay)
    reports = queue.Queue()
    sweep._sweep_worker(0, None, "cpu", 1, False, False, None, False, reports, os.getppid())
    index, kind, payload = reports.get_nowait()
    assert (index, kind, type(payload)) == (0, "error", type(error))
    assert ("Traceback" in capsys.readouterr().err) is printed


def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sharpness", "list", "optimizers"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("sharpness", run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 0
    assert "aelooksam" in capsys.readouterr().out


def test_measure_a_trained_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    trained = runner.invoke(app, ["train", *TINY, "--optimizer", "sam", "--checkpoint-dir", str(ck)])
    assert trained.exit_code == 0, trained.output
    (path,) = ck.glob("*.pt")
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["measure", str(path), "--measures", "lambda_max,trace,sam", "--examples", "200",
                                 "--samples", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    measured = payload["measures"]
    assert measured["lambda_max"]["value"] > 0 and measured["trace"]["stderr"] > 0
    assert measured["sam"]["value"] >= 0 and payload["examples"] == 200
    pictures = runner.invoke(app, ["measure", str(path), "--examples", "100", "--landscape", "1d,2d", "--points", "5",
                                   "--landscape-dir", str(tmp_path / "land")])
    assert pictures.exit_code == 0, pictures.output
    for name in ("landscape_1d.png", "landscape_2d.png"):
        assert (tmp_path / "land" / f"{path.stem}_{name}").read_bytes()[:4] == b"\x89PNG"
    bad_kind = runner.invoke(app, ["measure", str(path), "--landscape", "3d", "--out", str(tmp_path / "no.json")])
    assert bad_kind.exit_code == 2 and "Invalid landscape kinds: ['3d']" in bad_kind.output
    assert not (tmp_path / "no.json").exists()  # refused before anything was measured or written
    from sharpness.harness import measure as measure_module  # the landscape follows --split (it drew on train)
    seen = []
    real = measure_module.load_for_measurement
    monkeypatch.setattr(measure_module, "load_for_measurement",
                        lambda *a, **k: seen.append(k.get("split")) or real(*a, **k))
    test_split = runner.invoke(app, ["measure", str(path), "--measures", "sam", "--examples", "50", "--split",
                                     "test", "--landscape", "1d", "--points", "3", "--landscape-dir",
                                     str(tmp_path / "land")])
    assert test_split.exit_code == 0, test_split.output
    assert seen == ["test", "test"]
    on_test = runner.invoke(app, ["measure", str(path), "--measures", "lambda_max", "--examples", "200",
                                  "--split", "test", "--out", str(tmp_path / "t.json")])
    assert on_test.exit_code == 0, on_test.output
    test_value = json.loads((tmp_path / "t.json").read_text())["measures"]["lambda_max"]["value"]
    assert test_value > 0 and test_value != measured["lambda_max"]["value"]
    bad_split = runner.invoke(app, ["measure", str(path), "--split", "val"])
    assert bad_split.exit_code == 2 and "Invalid split value" in bad_split.output
    bad = runner.invoke(app, ["measure", str(path), "--measures", "lambda_min"])
    assert bad.exit_code == 2 and "Unknown measure name" in bad.output
    missing = runner.invoke(app, ["measure", str(tmp_path / "none.pt")])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_report_command(tmp_path):
    db = tmp_path / "r.sqlite"
    for optimizer in ("erm", "sam"):
        for seed in ("0", "1"):
            result = runner.invoke(app, ["train", *TINY, "--optimizer", optimizer, "--seed", seed, "--db", str(db)])
            assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "| sam " in page and "| erm " in page and list((tmp_path / "rep").glob("*.png"))
    missing = runner.invoke(app, ["report", "--db", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 2
    # a misspelled --baseline is an error listing the choices (it wrote a page with a note and exited 0)
    typo = runner.invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "typo"), "--baseline", "sma"])
    assert typo.exit_code == 2 and "Unknown baseline 'sma'" in typo.output and "sam" in typo.output, typo.output
    assert not (tmp_path / "typo").exists()
    paired = runner.invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "rep2"), "--baseline", "sam"])
    assert paired.exit_code == 0 and "Paired against `sam`" in (tmp_path / "rep2" / "report.md").read_text()
    exported = runner.invoke(app, ["export", "--db", str(db), "--csv", str(tmp_path / "r.csv"),
                                   "--json", str(tmp_path / "r.json")])
    assert exported.exit_code == 0 and "exported 4 runs" in exported.output
    assert len(json.loads((tmp_path / "r.json").read_text())) == 4
    assert len((tmp_path / "r.csv").read_text().strip().splitlines()) == 5


def test_sweep_command_dry_run_then_run(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text("""
seeds = [0, 1]
[base]
dataset = "digits"
model = "mlp"
budget_steps = 6
batch_size = 64
[[methods]]
optimizer = "erm"
[[methods]]
optimizer = "sam"
""")
    dry = runner.invoke(app, ["sweep", str(config), "--dry-run"])
    assert dry.exit_code == 0 and "4 runs planned" in dry.output
    first = runner.invoke(app, ["sweep", str(config), "-q"])
    assert first.exit_code == 0 and "0 already done, 4 trained" in first.output, first.output
    again = runner.invoke(app, ["sweep", str(config), "-q"])
    assert "4 already done, 0 trained" in again.output
    with Store(tmp_path / "sweep.sqlite") as store:
        assert len(store) == 4
    bad = runner.invoke(app, ["sweep", str(tmp_path / "missing.toml")])
    assert bad.exit_code == 2


def test_sweep_command_with_jobs(tmp_path):
    """``--jobs 2``: two worker processes, every run once; bad --jobs / --device are usage errors."""
    config = tmp_path / "sweep.toml"
    config.write_text("""
seeds = [0, 1, 2]
[base]
dataset = "digits"
model = "mlp"
budget_steps = 6
batch_size = 64
""")
    done = runner.invoke(app, ["sweep", str(config), "-q", "--jobs", "2", "--threads", "1"])
    assert done.exit_code == 0 and "0 already done, 3 trained, 0 failed" in done.output, done.output
    with Store(tmp_path / "sweep.sqlite") as store:
        assert len(store) == 3
    assert list((tmp_path / "sweep-checkpoints").iterdir()) == []
    for args, hint in ((["--jobs", "0"], "--jobs"), (["--jobs", "2", "--device", "cpu,tpu"], "--device"),
                       (["--threads", "0"], "--threads")):
        bad = runner.invoke(app, ["sweep", str(config), *args])
        assert bad.exit_code == 2 and hint in bad.output, bad.output


def test_train_download_flag_fetches_a_missing_data_set(tmp_path, monkeypatch):
    """The error names --download, and --download fetches the file (urlopen faked) into $SHARPNESS_DATA."""
    import io

    from sharpness.data import tinyshakespeare as module

    text = "to be or not to be, that is the question. " * 40
    monkeypatch.setenv("SHARPNESS_DATA", str(tmp_path))
    args = ["train", "--dataset", "tinyshakespeare", "--model", "char_lstm", "--data-opt", "block_size=8",
            "--batch-size", "32", "--optimizer", "sam", "--budget-grad-evals", "4", "-q"]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 2 and "sharpness train --download" in " ".join(missing.output.split())
    monkeypatch.setattr(module, "urlopen", lambda url, timeout: io.BytesIO(text.encode()))
    fetched = runner.invoke(app, [*args, "--download"])
    assert fetched.exit_code == 0, fetched.output
    assert (tmp_path / "tinyshakespeare.txt").read_text() == text
    assert int(SUMMARY.search(fetched.output)["evals"]) == 4


def test_device_option(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("COLUMNS", "240")  # the error box would cut the message
    bad = runner.invoke(app, ["train", *TINY, "--device", "cuda"])
    assert bad.exit_code == 2 and "CUDA is not available on this machine" in " ".join(bad.output.split())
    db = tmp_path / "r.sqlite"
    ok = runner.invoke(app, ["train", *TINY, "--device", "cpu", "--db", str(db)])
    assert ok.exit_code == 0, ok.output
    with Store(db) as store:
        (run,) = store.runs()
    assert run.environment["device"] == "cpu" and run.summary["device"] == "cpu"
    sweep = tmp_path / "s.toml"
    sweep.write_text('db = "s.sqlite"\n[base]\ndataset = "digits"\n')
    bad_sweep = runner.invoke(app, ["sweep", str(sweep), "--device", "cuda:0"])
    assert bad_sweep.exit_code == 2 and "CUDA is not available" in " ".join(bad_sweep.output.split())


def test_sweep_dry_run_shows_the_settings_that_vary(tmp_path):
    """A grid over lr and rho listed identical-looking lines; each line now shows the settings that differ."""
    config = tmp_path / "grid.toml"
    config.write_text('[base]\ndataset = "digits"\nmodel = "mlp"\nepochs = 1\n[[methods]]\noptimizer = "sam"\n'
                      '[methods.grid]\nlr = [0.05, 0.1]\n"optimizer_options.rho" = [0.05, 0.1]\n')
    dry = runner.invoke(app, ["sweep", str(config), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    lines = [line.split("  ", 1)[1] for line in dry.output.splitlines() if "seed 0" in line]
    assert sorted(line.split("seed 0")[1].strip() for line in lines) == [
        "lr=0.05 optimizer_options.rho=0.05", "lr=0.05 optimizer_options.rho=0.1",
        "lr=0.1 optimizer_options.rho=0.05", "lr=0.1 optimizer_options.rho=0.1"]
