"""Sweeps: expansion of a sweep file, clear errors, skipping finished runs, and crash safety under kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sharpness.harness import Store, TrainConfig, lr_factor, plan_sweep, run_sweep, run_sweep_parallel, train
from sharpness.harness._claims import claim, clear_claim
from sharpness.harness.sweep import expand_sweep, worker_devices

BASE = """
[base]
dataset = "digits"
model = "mlp"
model_options = { depth = 2 }
batch_size = 64
budget_steps = 40
"""


def _write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _strip_times(records):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def _stored_counts(db: Path) -> dict[str, int]:
    """Run key -> number of rows, read straight from SQLite (read-only; {} while the store is being created)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return dict(conn.execute("SELECT run_key, COUNT(*) FROM runs GROUP BY run_key").fetchall())
    except sqlite3.OperationalError:  # the schema is not there yet
        return {}


# ------------------------------------------------------------------------------------------------ expansion
def test_expansion_counts_and_overrides(tmp_path):
    path = _write(tmp_path, """
        db = "out/results.sqlite"
        seeds = [0, 1, 2]
        datasets = ["digits", "mnist1d"]
        [base]
        model = "mlp"
        lr = 1
        budget_grad_evals = 100
        model_options = { depth = 2 }
        optimizer_options = { rho = 0.05 }
        [[methods]]
        optimizer = "erm"
        optimizer_options = {}
        [[methods]]
        optimizer = "sam"
        lr = 0.05
        budget_steps = 30
        optimizer_options = { eps = 1e-10 }
        grid = { "optimizer_options.rho" = [0.1, 0.2] }
        [grid]
        momentum = [0.0, 0.9]
        """)
    plan = plan_sweep(path)
    # datasets x (erm: momentum 2) + (sam: momentum 2 x rho 2) x seeds 3
    assert len(plan) == 2 * (2 + 4) * 3 == len(set(plan.keys))
    assert plan.db == tmp_path / "out/results.sqlite" and plan.checkpoint_dir == tmp_path / "sweep-checkpoints"
    erm = [c for c in plan.configs if c.optimizer == "erm"]
    sam = [c for c in plan.configs if c.optimizer == "sam"]
    assert len(erm) == 12 and len(sam) == 24
    assert all(c.lr == 1.0 and isinstance(c.lr, float) for c in erm)  # int promoted: same key as from the CLI
    assert all(c.budget_grad_evals == 100 and c.budget_steps is None and c.epochs is None for c in erm)
    assert all(c.optimizer_options == {"rho": 0.05} for c in erm)  # options merge key by key
    assert all(c.lr == 0.05 and c.budget_steps == 30 and c.budget_grad_evals is None for c in sam)
    assert {c.optimizer_options["rho"] for c in sam} == {0.1, 0.2}
    assert all(c.optimizer_options["eps"] == 1e-10 and c.model_options == {"depth": 2} for c in sam)
    assert {c.dataset for c in plan.configs} == {"digits", "mnist1d"}
    assert {c.seed for c in plan.configs} == {0, 1, 2} and {c.momentum for c in plan.configs} == {0.0, 0.9}
    # order: datasets, then methods, then grid points, then seeds
    assert [c.seed for c in plan.configs[:3]] == [0, 1, 2] and plan.configs[0].dataset == "digits"
    # overrides from the caller (e.g. the CLI) win over the file
    other = plan_sweep(path, db=tmp_path / "x.sqlite", checkpoint_dir=tmp_path / "ck")
    assert other.db == tmp_path / "x.sqlite" and other.checkpoint_dir == tmp_path / "ck"


def test_variants_and_overrides(tmp_path):
    """Variants are a second axis of field tables; overrides set fields of the runs whose config matches, in file
    order (the universal-SAM paper's per-setting hyperparameters), checked against a by-hand list of the runs."""
    path = _write(tmp_path, """
        seeds = [0, 1]
        datasets = ["digits", "mnist1d"]
        [base]
        model = "mlp"
        budget_grad_evals = 100
        optimizer_options = { rho = 0.05 }
        [[variants]]
        [[variants]]
        subset = 0.5
        subset_strategy = "first"
        [[variants]]
        label_noise = 0.2
        [[methods]]
        optimizer = "erm"
        optimizer_options = {}
        [[methods]]
        optimizer = "sam"
        [[overrides]]
        match = { dataset = "mnist1d", optimizer = "sam" }
        optimizer_options = { rho = 0.1 }
        lr = 0.05
        [[overrides]]                       # matches the default subset strategy, which to_dict leaves out
        match = { dataset = "mnist1d", optimizer = "sam", subset_strategy = "stratified", label_noise = 0.2 }
        "optimizer_options.rho" = 0.2
        [[overrides]]                       # matches every run: data_options is left out of to_dict when empty
        match = { data_options = {}, world_size = 1 }
        momentum = 0.8
        [[overrides]]                       # a budget set here replaces the base's
        match = { "optimizer_options.rho" = 0.05, subset = 0.5 }
        epochs = 3
        """)
    plan = plan_sweep(path)
    assert len(plan) == 2 * 3 * 2 * 2 == len(set(plan.keys))
    expected = []
    for dataset in ("digits", "mnist1d"):
        for variant in ({}, {"subset": 0.5, "subset_strategy": "first"}, {"label_noise": 0.2}):
            for method in ("erm", "sam"):
                for seed in (0, 1):
                    options = {"rho": 0.05}  # ERM's empty table merges into the base's options
                    fields = {"lr": 0.1, "budget_grad_evals": 100, "epochs": None, "momentum": 0.8}
                    if dataset == "mnist1d" and method == "sam":
                        options, fields["lr"] = {"rho": 0.2 if "label_noise" in variant else 0.1}, 0.05
                    if "subset" in variant:  # matched before any override applies: rho is 0.05 in all of them
                        fields.update(epochs=3, budget_grad_evals=None)
                    expected.append(TrainConfig(dataset=dataset, model="mlp", optimizer=method, seed=seed,
                                                optimizer_options=options, **variant, **fields))
    assert list(plan.configs) == expected


@pytest.mark.parametrize("top, tables, match", [
    ("", '[[overrides]]\nmatch = { optimizer = "adam" }\nlr = 0.5\n',
     r"Override\(s\) \[0\] in sweep.toml match no run: match = \{'optimizer': 'adam'\}"),
    ("", "[[overrides]]\nmatch = { lrr = 0.1 }\nlr = 0.5\n", r"Unknown match key 'lrr' in sweep.toml overrides\[0\]"),
    ("", "[[overrides]]\nlr = 0.5\n", r"Invalid match in sweep.toml overrides\[0\]: None"),
    ("", "[[overrides]]\nmatch = { lr = 0.1 }\n", r"overrides\[0\]: it sets no field"),
    ("", "[[overrides]]\nmatch = { lr = 0.1 }\nrhoo = 1\n", r"Unknown key\(s\) \['rhoo'\] in sweep.toml overrides\[0\]"),
    ("", "[[overrides]]\nmatch = { lr = 0.1 }\nlr = -1.0\n", r"overrides \[0\]: Invalid lr value: -1.0"),
    ("seeds = [0]\n", "[[overrides]]\nmatch = { lr = 0.1 }\nseed = 3\n",
     r"Conflicting seed in sweep.toml overrides\[0\]"),
    ("", "[[variants]]\nlr = 0.2\n[[methods]]\nlr = 0.3\n",
     r"Conflicting lr in sweep.toml methods\[0\]: set by its variant"),
    ("", "[[variants]]\nepochs = 2\n[[methods]]\nbudget_steps = 3\n", r"Conflicting budget"),
    ("", '[[variants]]\noptimizer_options = { rho = 0.1 }\n[grid]\n"optimizer_options.rho" = [0.2]\n',
     r"Conflicting optimizer_options.rho"),
    ("variants = []\n", "", r"Invalid variants value in sweep.toml: \[\]"),
    ("", "[[variants]]\nlrr = 1\n", r"Unknown key\(s\) \['lrr'\] in sweep.toml variants\[0\]"),
    ("", "[[variants]]\nlr = 0.2\n[[variants]]\nlr = 0.2\n",
     r"Duplicate run in sweep.toml: sweep.toml variants\[1\] methods\[0\]"),
])
def test_bad_variants_and_overrides_give_clear_errors(tmp_path, top, tables, match):
    with pytest.raises(ValueError, match=match):
        plan_sweep(_write(tmp_path, top + BASE + tables))


def test_minimal_sweep_is_base_alone():
    configs = expand_sweep({"base": {"dataset": "digits", "model": "mlp"}})
    assert configs == [TrainConfig(dataset="digits", model="mlp")]


@pytest.mark.parametrize("text, error, match", [
    ('seeds = []\n' + BASE, ValueError,
     r"Invalid seeds value: \[\] \(expected a non-empty list of integers >= 0\)"),
    ('seeds = [0, -1]\n' + BASE, ValueError, r"Invalid seeds value: \[0, -1\]"),
    ('seeds = [true]\n' + BASE, ValueError, r"Invalid seeds value"),
    ('seeds = [1, 1]\n' + BASE, ValueError, r"expected distinct seeds"),
    ('sedes = [0]\n' + BASE, ValueError, r"Unknown key\(s\) \['sedes'\].*seeds"),
    (BASE + 'lrr = 0.1\n', ValueError, r"Unknown key\(s\) \['lrr'\] in sweep.toml \[base\].*batch_size.*lr"),
    (BASE + '[[methods]]\noptimizer = "erm"\n[[methods]]\noptimizer = "sam"\nrhoo = 1\n', ValueError,
     r"Unknown key\(s\) \['rhoo'\] in sweep.toml methods\[1\] \(optimizer='sam'\).*TrainConfig fields"),
    (BASE + '[[methods]]\noptimizer = "erm"\n[[methods]]\noptimizer = "sam"\nlr = -1.0\n', ValueError,
     r"methods\[1\] \(optimizer='sam'\): Invalid lr value: -1.0"),
    (BASE + '[[methods]]\noptimizer = "samm"\n', ValueError,
     r"methods\[0\].*Unknown optimizer name: 'samm' \(expected one of .*sam"),
    (BASE.replace('"mlp"', '"nope"'), ValueError, r"Unknown model name: 'nope' \(expected one of .*mlp"),
    ('datasets = ["digits", "nope"]\n' + BASE.replace('dataset = "digits"\n', ''), ValueError,
     r"dataset 'nope': Unknown dataset name: 'nope' \(expected one of .*digits"),
    (BASE + '[grid]\nlr = [0.1, -0.5]\n', ValueError,
     r"grid point \{'lr': -0.5\}.*Invalid lr value: -0.5"),
    (BASE + '[grid]\nlearning_rate = [0.1]\n', ValueError, r"Unknown grid key 'learning_rate'.*optimizer_options.X"),
    (BASE + '[grid]\n"optimiser_options.rho" = [0.1]\n', ValueError, r"Unknown grid key 'optimiser_options.rho'"),
    ('grid = [1]\n' + BASE, TypeError, r"Invalid grid in sweep.toml \[grid\]: \[1\]"),
    (BASE + '[grid]\nlr = []\n', ValueError, r"Invalid grid values for 'lr'.*non-empty list"),
    (BASE + 'epochs = 2\n', ValueError, r"Invalid budget"),
    (BASE + '[[methods]]\noptimizer = "erm"\n[[methods]]\noptimizer = "erm"\n', ValueError,
     r"Duplicate run.*methods\[1\].*methods\[0\]"),
    # an integer where a float is taken is that float: rho = 1 and 1.0 are one run (they were two run ids)
    (BASE + '[[methods]]\noptimizer = "sam"\ngrid = { "optimizer_options.rho" = [1, 1.0] }\n', ValueError,
     r"Duplicate run.*rho"),
    (BASE + '[grid]\nlr = [1, 1.0]\n', ValueError, r"Duplicate run"),
    (BASE + '[grid]\nlr = [inf]\n', ValueError,
     r"Invalid lr value: inf \(expected 0.0 < lr < inf\)"),
    ('seeds = [0]\n' + BASE + 'seed = 3\n', ValueError, r"Conflicting seed.*base"),
    ('db = 3\n' + BASE, ValueError, r"Invalid db value"),
    ('methods = []\n' + BASE, ValueError, r"Invalid methods value"),
    (BASE + 'seeds = [0]\n', ValueError, r"Unknown key\(s\) \['seeds'\] in sweep.toml \[base\].*top-level keys"),
    ('base = 3\n', TypeError, r"Invalid base value"),
    (BASE + '[[methods]]\noptimizer_options = 3\n', TypeError,
     r"Invalid optimizer_options type in sweep.toml methods\[0\]: int"),
    (BASE + 'lr = "fast"\n', TypeError, r"sweep.toml methods\[0\]: Invalid lr type: str"),
    ('seeds = [0\n', ValueError, r"Invalid TOML in sweep file .*sweep.toml"),
    # the optimizer is built on a stand-in parameter in the plan: a typo fails before any run trains
    (BASE + '[[methods]]\noptimizer = "erm"\n[[methods]]\noptimizer = "sam"\noptimizer_options = { rhoo = 0.05 }\n',
     ValueError, (r"methods\[1\] \(optimizer='sam'\).*Unknown option\(s\) \['rhoo'\] for optimizer 'sam' \(valid "
                  r"options: check_finite, eps, foreach, rho, sync_perturbation\)")),
    (BASE + '[[methods]]\noptimizer = "looksam"\noptimizer_options = { k = 0 }\n', ValueError,
     r"Invalid k value: 0"),
    (BASE.replace("budget_steps = 40", "budget_grad_evals = 1") + '[[methods]]\noptimizer = "sam"\n', ValueError,
     r"Invalid budget_grad_evals value: 1 \(one sam step takes up to 2 gradient evaluations"),
])
def test_bad_sweep_files_give_clear_errors(tmp_path, text, error, match):
    with pytest.raises(error, match=match):
        plan_sweep(_write(tmp_path, text))


def test_unreadable_files_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="Sweep file not found: .*missing.toml"):
        plan_sweep(tmp_path / "missing.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ValueError, match="Cannot read sweep file .*dir.toml"):
        plan_sweep(tmp_path / "dir.toml")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="Cannot read sweep file .*binary.toml"):
        plan_sweep(tmp_path / "binary.toml")
    with pytest.raises(ValueError, match=r"Invalid sweep file type: 'sweep.json' \(expected a .toml, .yaml or .yml"):
        plan_sweep(_write(tmp_path, "{}", "sweep.json"))
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(RuntimeError, match=r"needs PyYAML \(pip install pyyaml\)"):
        plan_sweep(_write(tmp_path, "base: {}\n", "sweep.yaml"))


def test_yaml_sweep_file(tmp_path):
    pytest.importorskip("yaml")
    path = _write(tmp_path, """
        seeds: [0, 1]
        base: {dataset: digits, model: mlp, budget_steps: 40}
        methods: [{optimizer: erm}, {optimizer: sam, optimizer_options: {rho: 0.05}}]
        """, "sweep.yml")
    assert len(plan_sweep(path)) == 4
    with pytest.raises(TypeError, match="Invalid sweep file .*expected a table"):
        plan_sweep(_write(tmp_path, "- 1\n", "list.yaml"))


# ------------------------------------------------------------------------------------------------ running
def test_sweep_run_twice_trains_nothing_the_second_time(tmp_path):
    path = _write(tmp_path, 'seeds = [0, 1]\n' + BASE + '[grid]\nlr = [0.05, 0.1]\n')
    plan = plan_sweep(path)
    lines: list[str] = []
    first = run_sweep(plan, log=lines.append, progress=False)
    assert (first.total, first.done_before, first.trained) == (4, 0, 4)
    assert _stored_counts(plan.db) == {key: 1 for key in plan.keys}
    assert list(plan.checkpoint_dir.iterdir()) == []  # checkpoints are deleted once a run is stored
    assert "4 trained now" in lines[-1]
    second = run_sweep(plan, log=None, progress=False)
    assert (second.total, second.done_before, second.trained) == (4, 4, 0)
    with Store(plan.db) as store:
        records = {r.run_key: r for r in store.runs()}
    assert set(records) == set(plan.keys)
    assert all(r.summary["finished"] and r.summary["steps"] == 40 and r.environment["torch"] for r in records.values())


def test_partial_checkpoint_is_resumed_and_stale_checkpoint_removed(tmp_path):
    path = _write(tmp_path, 'seeds = [0, 1]\n' + BASE)
    plan = plan_sweep(path)
    plan.checkpoint_dir.mkdir()
    resumed_config, stored_config = plan.configs
    # Run 0 was killed after its first epoch: a partial checkpoint.
    partial = train(resumed_config, checkpoint=plan.checkpoint_dir / f"{plan.keys[0]}.pt", log=None,
                    stop_after_epochs=1)
    assert partial.summary == {"finished": False}
    # Run 1 was killed after write_run but before its checkpoint was deleted.
    stale = plan.checkpoint_dir / f"{plan.keys[1]}.pt"
    done = train(stored_config, checkpoint=stale, log=None)
    with Store(plan.db) as store:
        store.write_run(stored_config.to_dict(), done.summary, done.epochs, {})
    (plan.checkpoint_dir / f".{plan.keys[1]}.pt.tmp-12345").write_bytes(b"half a checkpoint")  # killed mid-save

    result = run_sweep(plan, log=None, progress=False)
    assert (result.done_before, result.trained) == (1, 1)
    assert list(plan.checkpoint_dir.iterdir()) == []
    assert _stored_counts(plan.db) == {key: 1 for key in plan.keys}
    full = train(resumed_config, log=None)
    with Store(plan.db) as store:
        record = {r.run_key: r for r in store.runs()}[plan.keys[0]]
    assert _strip_times([record.summary]) == _strip_times([full.summary])
    assert _strip_times(record.epochs) == _strip_times(full.epochs)


def test_keep_going_records_failures(tmp_path):
    path = _write(tmp_path, BASE + '[grid]\nlr = [0.1, 1e6]\n')  # lr 1e6 diverges
    plan = plan_sweep(path)
    with pytest.raises(FloatingPointError, match="diverged"):
        run_sweep(plan, log=None, progress=False)
    result = run_sweep(plan, log=None, progress=False, keep_going=True)
    assert (result.done_before, result.trained) == (1, 0)
    assert [key for key, _ in result.failed] == [plan.keys[1]] and "diverged" in result.failed[0][1]


_KILL_SWEEP = """
seeds = [0, 1, 2]
[base]
dataset = "digits"
model = "mlp"
model_options = { depth = 2 }
batch_size = 64
budget_steps = 230
[grid]
lr = [0.05, 0.1]
"""


def test_kill_9_mid_sweep_then_rerun_stores_every_run_exactly_once(tmp_path):
    plan = plan_sweep(_write(tmp_path, _KILL_SWEEP))
    assert len(plan) == 6
    script = ("import torch; torch.set_num_threads(1)\n"
              "from sharpness.harness.sweep import plan_sweep, run_sweep\n"
              f"run_sweep(plan_sweep({str(plan.source)!r}), log=None, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        # Wait until one run is stored and the next one is mid-training (its checkpoint exists).
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before it could be killed (rc {proc.returncode}): "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if _stored_counts(plan.db) and any(plan.checkpoint_dir.glob("*.pt")):
                break
            if time.monotonic() > deadline:
                pytest.fail("no run was stored within 120 s")
            time.sleep(0.002)
        proc.kill()  # SIGKILL: no cleanup, no finally blocks
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -9
    stored = _stored_counts(plan.db)
    assert 1 <= len(stored) < len(plan) and set(stored) <= set(plan.keys)
    partial = [p.stem for p in plan.checkpoint_dir.glob("*.pt") if p.stem not in stored]

    result = run_sweep(plan, log=None, progress=False)
    assert result.done_before == len(stored) and result.trained == len(plan) - len(stored)
    counts = _stored_counts(plan.db)
    assert counts == {key: 1 for key in plan.keys}  # every planned run exactly once, nothing else
    assert list(plan.checkpoint_dir.glob("*.pt")) == []
    with sqlite3.connect(plan.db) as conn:  # and each run's epochs are complete (one transaction with its row)
        epochs = dict(conn.execute("SELECT run_key, COUNT(*) FROM epochs GROUP BY run_key").fetchall())
    assert epochs == {key: 10 for key in plan.keys}  # 230 steps / 23 steps per epoch

    # A run that was resumed from the killed process's checkpoint equals an uninterrupted run.
    if partial:
        key = partial[0]
        config = plan.configs[plan.keys.index(key)]
        full = train(config, log=None)
        with Store(plan.db) as store:
            record = {r.run_key: r for r in store.runs()}[key]
        assert _strip_times([record.summary]) == _strip_times([full.summary])
        assert _strip_times(record.epochs) == _strip_times(full.epochs)


# ------------------------------------------------------------------------------------------------ parallel
def _one_thread_sweep(plan, **kwargs):
    """``run_sweep_parallel(plan, 1, threads=1)`` with this process's thread count put back afterwards."""
    threads = torch.get_num_threads()
    try:
        return run_sweep_parallel(plan, 1, log=None, threads=1, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _records(db: Path) -> dict:
    with Store(db) as store:
        return {r.run_key: (_strip_times([r.summary]), _strip_times(r.epochs)) for r in store.runs()}


def test_claims_are_exclusive_released_and_never_stale(tmp_path):
    """A claim is an flock: a second claim (another open file, even in this process) is refused while it is
    held; releasing deletes the lock file; a claim held by a process killed with -9 is free again (the OS drops
    it), and its leftover file is cleared."""
    first = claim(tmp_path, "run")
    assert first is not None and (tmp_path / "run.lock").exists()
    assert claim(tmp_path, "run") is None
    assert claim(tmp_path, "other") is not None  # per run
    first.release()
    first.release()  # idempotent
    assert not (tmp_path / "run.lock").exists()
    with claim(tmp_path, "run") as again:
        assert again is not None and claim(tmp_path, "run") is None
    assert not (tmp_path / "run.lock").exists()

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom sharpness.harness._claims import claim\n"
        f"held = claim(Path({str(tmp_path)!r}), 'killed')\nprint(held is not None, flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert claim(tmp_path, "killed") is None
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (tmp_path / "killed.lock").exists()  # the file stays, the lock does not
    clear_claim(tmp_path, "killed")
    assert not (tmp_path / "killed.lock").exists()
    with claim(tmp_path, "held") as held:
        clear_claim(tmp_path, "held")  # a held claim is left alone
        assert held is not None and (tmp_path / "held.lock").exists()


def test_parallel_sweep_trains_each_run_once_and_equals_one_worker(tmp_path):
    """Two workers share the runs: every run stored once, nothing left in the checkpoint folder, and the
    records equal those of one worker (one torch thread each)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    parallel = plan_sweep(_write(tmp_path / "a", _KILL_SWEEP))
    lines: list[str] = []
    result = run_sweep_parallel(parallel, 2, log=lines.append, threads=1)
    assert (result.total, result.done_before, result.trained, result.failed, result.elsewhere) == (6, 0, 6, (), 0)
    assert "6 trained now by 2 workers" in lines[-1]
    assert _stored_counts(parallel.db) == {key: 1 for key in parallel.keys}
    assert list(parallel.checkpoint_dir.iterdir()) == []  # no checkpoint, no lock file
    again = run_sweep_parallel(parallel, 2, log=None)
    assert (again.done_before, again.trained) == (6, 0)

    single = plan_sweep(_write(tmp_path / "b", _KILL_SWEEP))
    assert _one_thread_sweep(single).trained == 6
    assert _records(parallel.db) == _records(single.db)


def test_parallel_sweep_errors(tmp_path):
    """A worker's error reaches the caller as itself (the other worker is stopped); with keep_going the
    failing run is reported once, whichever worker met it; bad arguments are refused before anything runs."""
    plan = plan_sweep(_write(tmp_path, BASE + '[grid]\nlr = [1e6, 0.1, 0.05]\n'))  # lr 1e6 diverges
    with pytest.raises(FloatingPointError, match="diverged"):
        run_sweep_parallel(plan, 2, log=None, threads=1)
    result = run_sweep_parallel(plan, 2, log=None, threads=1, keep_going=True)
    assert [key for key, _ in result.failed] == [plan.keys[0]] and "diverged" in result.failed[0][1]
    assert set(_stored_counts(plan.db)) == set(plan.keys[1:]) and result.elsewhere == 0
    assert result.done_before + result.trained == 2
    for jobs, error in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="Invalid jobs"):
            run_sweep_parallel(plan, jobs)
    with pytest.raises(ValueError, match="Invalid threads value: 0"):
        run_sweep_parallel(plan, 2, threads=0)
    with pytest.raises(ValueError, match="Invalid device value"):
        run_sweep_parallel(plan, 2, device="cpu,tpu")


def test_parallel_sweep_prepares_each_data_source_once_before_the_workers(tmp_path, monkeypatch):
    """Each data source is loaded once in the parent (one download, not one per worker); a missing file is
    reported there, before any worker starts or anything is stored."""
    from sharpness import data as data_module
    from sharpness.harness import sweep as sweep_module

    plan = plan_sweep(_write(tmp_path, 'seeds = [0, 1, 2]\n' + BASE + '[grid]\nlr = [0.05, 0.1]\n'))
    calls = []
    monkeypatch.setattr(data_module, "load_dataset", lambda name, **kwargs: calls.append((name, kwargs)))
    sweep_module._prepare_data(plan, True)
    assert calls == [("digits", {"download": True})]  # 6 runs, one source

    monkeypatch.undo()
    missing = tmp_path / "missing"
    missing.mkdir()
    monkeypatch.setenv("SHARPNESS_DATA", str(missing))  # an empty data folder
    (missing / "sweep.toml").write_text(textwrap.dedent("""
        seeds = [0, 1]
        [base]
        dataset = "tinyshakespeare"
        model = "char_lstm"
        budget_steps = 2
        """))
    plan = plan_sweep(missing / "sweep.toml")
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="Tiny Shakespeare"):
        run_sweep_parallel(plan, 2, log=None)
    assert time.monotonic() - started < 3  # no worker was spawned (each costs seconds of imports)
    assert _stored_counts(plan.db) == {}


def test_worker_devices(monkeypatch):
    assert worker_devices("cpu", 3) == [torch.device("cpu")] * 3
    assert worker_devices("cpu, cpu", 3) == [torch.device("cpu")] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = [torch.device("cuda", i) for i in (0, 1, 0)]
    assert worker_devices("cuda", 3) == cuda and worker_devices("auto", 3) == cuda
    assert worker_devices("cuda:1", 2) == [torch.device("cuda", 1)] * 2
    assert worker_devices("cuda:1,cuda:0,cpu", 4) == [torch.device("cuda", 1), torch.device("cuda", 0),
                                                      torch.device("cpu"), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="2 CUDA device"):
        worker_devices("cuda:0,cuda:2", 2)


def test_kill_9_of_a_parallel_sweep_then_rerun_stores_every_run_exactly_once(tmp_path):
    """The whole process group (the parent and its two workers) is killed with -9 while runs are mid-training;
    a rerun with one worker finishes the sweep: every run once, resumed runs equal uninterrupted ones."""
    plan = plan_sweep(_write(tmp_path, _KILL_SWEEP.replace("seeds = [0, 1, 2]", "seeds = [0, 1, 2, 3]")
                             .replace("budget_steps = 230", "budget_steps = 460")))
    script = ("from sharpness.harness.sweep import plan_sweep, run_sweep_parallel\n"
              f"run_sweep_parallel(plan_sweep({str(plan.source)!r}), 2, log=None, threads=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while True:  # one run stored and another mid-training (its checkpoint exists)
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before it could be killed (rc {proc.returncode}): "
                            f"{proc.stderr.read().decode()[-2000:]}")
            stored = _stored_counts(plan.db)
            if stored and any(p.stem not in stored for p in plan.checkpoint_dir.glob("*.pt")):
                break
            if time.monotonic() > deadline:
                pytest.fail("no run was stored within 180 s")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    time.sleep(0.2)  # the workers are gone too (same process group); let the OS reap their locks
    stored = _stored_counts(plan.db)
    assert 1 <= len(stored) < len(plan)
    partial = [p.stem for p in plan.checkpoint_dir.glob("*.pt") if p.stem not in stored]
    assert partial  # killed mid-run; their claims died with their workers

    result = _one_thread_sweep(plan)
    assert result.done_before == len(stored) and result.trained == len(plan) - len(stored)
    assert _stored_counts(plan.db) == {key: 1 for key in plan.keys}
    assert list(plan.checkpoint_dir.iterdir()) == []
    records = _records(plan.db)
    for key in partial[:1]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            full = train(plan.configs[plan.keys.index(key)], log=None)
        finally:
            torch.set_num_threads(threads)
        assert records[key] == (_strip_times([full.summary]), _strip_times(full.epochs))


def _live_members(group: int) -> list[int]:
    """The processes of process group ``group`` that are not zombies (from /proc)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    """``kill -9`` of the sweep's process alone: its workers (re-parented) used to train the whole sweep on; they
    now exit within about a second, as if killed with it (the kill test above shows that is safe)."""
    plan = plan_sweep(_write(tmp_path, _KILL_SWEEP.replace("budget_steps = 230", "budget_steps = 4600")))
    script = ("from sharpness.harness.sweep import plan_sweep, run_sweep_parallel\n"
              f"run_sweep_parallel(plan_sweep({str(plan.source)!r}), 2, log=None, threads=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_live_members(proc.pid)) < 3:  # the parent and both workers (and a spawn helper, maybe)
            assert proc.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # the workers are past their start
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while _live_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _live_members(proc.pid) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


EXAMPLES = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))
# (classes, input shape) of each data set the examples train on, as the loaders report them
EXAMPLE_DATA = {"mnist1d": (10, (40,)), "cifar10": (10, (3, 32, 32)), "cifar100": (100, (3, 32, 32)),
                "svhn": (10, (3, 32, 32))}


@pytest.mark.parametrize("name", EXAMPLES)
def test_shipped_example_sweeps_expand_and_build_every_optimizer_and_model(name):
    """Each example file parses and expands to the run count its header states, every optimizer in it can be
    constructed, and every model builds for its data set (the CIFAR files' full-size networks included)."""
    import re

    from sharpness.harness import run_key
    from sharpness.harness.sweep import load_sweep_file
    from sharpness.harness.train import build_optimizer
    from sharpness.models import create_model

    path = Path(__file__).resolve().parent.parent / "examples" / name
    configs = expand_sweep(load_sweep_file(path))
    stated = re.search(r"list the (\d+) runs", path.read_text())
    assert stated, "the header says how many runs --dry-run lists"
    assert len(configs) == int(stated.group(1))
    # every distinct method (name, base optimizer and options) builds, e.g. all of GNR's oracles and fractions
    methods = {(c.optimizer, c.base, json.dumps(c.optimizer_options, sort_keys=True)): c for c in configs}
    assert len(methods) >= 3 and len({c.seed for c in configs}) >= 3
    assert len({run_key(c.to_dict()) for c in configs}) == len(configs)
    for config in methods.values():
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10))
        opt = build_optimizer(config, model, total_steps=100)
        assert opt.param_groups[0]["lr"] == config.lr
    for model_name, dataset in sorted({(c.model, c.dataset) for c in configs}):
        classes, shape = EXAMPLE_DATA[dataset]
        options = next(c.model_options for c in configs if (c.model, c.dataset) == (model_name, dataset))
        with torch.device("meta"):  # the shapes only: WRN-28-10 and PyramidNet-110 hold 36M and 28M weights
            model = create_model(model_name, num_classes=classes, input_shape=shape, **options)
            assert model(torch.empty(2, *shape)).shape == (2, classes)


def test_universal_sam_example_has_the_papers_per_setting_hyperparameters():
    """examples/cifar_universal_sam.toml against the universal-SAM paper's Appendix I, transcribed here on its
    own: lambda per setting (Table 4), Frob-SAM's rho (Table 5), the baselines' radii per data set, CIFAR-100's
    weight decay, and the multistep schedule (lr 0.1, x0.1 every 50 of 200 epochs)."""
    from sharpness.harness.sweep import load_sweep_file

    path = Path(__file__).resolve().parent.parent / "examples" / "cifar_universal_sam.toml"
    configs = expand_sweep(load_sweep_file(path))
    settings = [(d, v) for v in ("", "-S", "-C") for d in ("cifar10", "cifar100", "svhn")]
    table4 = {"frobsam": [5e-3, 1e-4, 5e-3, 1e-4, 1e-4, 1e-3, 0.01, 0.01, 1e-3],
              "tracesam": [1, 0.1, 0.1, 0.01, 0.01, 1, 1, 0.1, 0.01],
              "detsam": [1, 0.1, 0.1, 0.01, 1, 1, 0.01, 0.1, 0.1]}
    table5 = [5e-3, 5e-3, 5e-3, 1e-2, 5e-3, 5e-3, 1e-2, 5e-3, 1e-2]
    radii = {"sam": (0.05, 0.1, 0.05), "asam": (0.5, 1.0, 0.5), "ssamf": (0.1, 0.2, 0.1)}
    for config in configs:
        variant = "-S" if config.subset == 0.1 else "-C" if config.label_noise == 0.2 else ""
        setting = settings.index((config.dataset, variant))
        options = config.optimizer_options
        if config.optimizer in table4:
            assert options["lam"] == table4[config.optimizer][setting]
            assert options["rho"] == {"frobsam": table5[setting], "tracesam": 0.01, "detsam": 1.0}[config.optimizer]
        elif config.optimizer in radii:
            assert options["rho"] == radii[config.optimizer][("cifar10", "cifar100", "svhn").index(config.dataset)]
        assert config.weight_decay == (1e-3 if config.dataset == "cifar100" else 5e-4)
        assert (config.subset_strategy == "first") == (variant == "-S")
        assert (config.lr, config.epochs, config.batch_size, config.model) == (0.1, 200, 128, "resnet18")
        assert lr_factor(config.schedule, 0.749, config.lr_milestones, config.lr_gamma) == pytest.approx(0.01)
        assert lr_factor(config.schedule, 0.75, config.lr_milestones, config.lr_gamma) == pytest.approx(0.001)
    assert len(configs) == 9 * 7 * 4
