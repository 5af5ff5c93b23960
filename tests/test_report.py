"""Reports: mean ± std over seeds and paired differences equal hand-computed values; figures; HTML; clear errors."""

from __future__ import annotations

import math
import statistics

import pytest

from sharpness.harness import Store, TrainConfig, build_report, group_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Final test accuracy per seed; SAM has no seed 2 (a missing run the paired table must name).
ERM_ACC = {0: 0.90, 1: 0.92, 2: 0.95}
SAM_ACC = {0: 0.93, 1: 0.91}
ERM_TRAIN_LOSS = {0: 0.10, 1: 0.20, 2: 0.30}
SAM_TRAIN_LOSS = {0: 0.40, 1: 0.50}


def _config(optimizer: str, seed: int, **overrides) -> dict:
    options = {"rho": 0.05} if optimizer == "sam" else {}
    fields = {"optimizer": optimizer, "optimizer_options": options, "epochs": None, "budget_grad_evals": 300,
              "seed": seed, **overrides}
    return TrainConfig(**fields).to_dict()


def _epochs(final_acc: float, sam: bool, extra: dict | None = None) -> list[dict]:
    records = []
    for epoch in range(1, 4):
        steps = 50 * epoch if sam else 100 * epoch
        records.append({"epoch": epoch, "train_loss": 1.0 / epoch, "test_loss": 1.2 / epoch,
                        "test_acc": final_acc - 0.1 * (3 - epoch), "lr": 0.1 / epoch, "steps": steps,
                        "sam_steps": steps if sam else 0, "sam_fraction": 1.0 if sam else 0.0,
                        "grad_evals": 100 * epoch, "wall_time": 0.5 * epoch, **(extra or {})})
    return records


def _write(store: Store, optimizer: str, seed: int, acc: float, train_loss: float, *, extra: dict | None = None,
           **overrides) -> None:
    sam = optimizer == "sam"
    summary = {"test_acc": acc, "test_loss": 0.3, "train_loss": train_loss, "steps": 150 if sam else 300,
               "sam_steps": 150 if sam else 0, "sam_fraction": 1.0 if sam else 0.0, "grad_evals": 300,
               "wall_time": 1.5, "epochs": 3}
    store.write_run(_config(optimizer, seed, **overrides), summary, _epochs(acc, sam, extra),
                    {"torch": "2.9.0-test", "git_commit": "abc123", "python": "3.11"})


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "results.sqlite"
    with Store(path) as store:
        for seed, acc in ERM_ACC.items():
            _write(store, "erm", seed, acc, ERM_TRAIN_LOSS[seed])
        for seed, acc in SAM_ACC.items():
            _write(store, "sam", seed, acc, SAM_TRAIN_LOSS[seed])
    return path


def _table_rows(text: str, header_start: str) -> dict[str, dict[str, str]]:
    """The Markdown table whose header starts with ``header_start``, as {first cell: {column: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    headers = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(headers, cells))
    return rows


def _pm(values, digits: int, sign: bool = False) -> str:
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return f"{mean:+.{digits}f} ± {std:.{digits}f}" if sign else f"{mean:.{digits}f} ± {std:.{digits}f}"


def test_tables_equal_hand_computed_statistics(store_path, tmp_path):
    page = build_report(store_path, tmp_path / "out", figures=False)
    assert page == tmp_path / "out" / "report.md"
    text = page.read_text()

    rows = _table_rows(text, "Setting | n | Seeds")
    assert set(rows) == {"erm", "sam(rho=0.05)"}
    erm, sam = rows["erm"], rows["sam(rho=0.05)"]
    assert (erm["n"], erm["Seeds"], sam["n"], sam["Seeds"]) == ("3", "0, 1, 2", "2", "0, 1")
    assert erm["Test acc (%)"] == _pm([100 * a for a in ERM_ACC.values()], 2) == "92.33 ± 2.52"
    assert erm["Test error (%)"] == _pm([100 - 100 * a for a in ERM_ACC.values()], 2)
    assert sam["Test acc (%)"] == _pm([100 * a for a in SAM_ACC.values()], 2) == "92.00 ± 1.41"
    assert erm["Final train loss"] == _pm(list(ERM_TRAIN_LOSS.values()), 4) == "0.2000 ± 0.1000"
    assert sam["Final train loss"] == _pm(list(SAM_TRAIN_LOSS.values()), 4)
    assert (erm["%SAM"], sam["%SAM"]) == ("0.0 ± 0.0", "100.0 ± 0.0")
    assert (erm["Grad evals"], erm["Steps"], sam["Steps"]) == ("300 ± 0", "300 ± 0", "150 ± 0")
    assert erm["Wall time (s)"] == "1.5 ± 0.0"

    paired = _table_rows(text, "Setting | Baseline")
    assert set(paired) == {"sam(rho=0.05)"}
    diffs = [100 * (SAM_ACC[s] - ERM_ACC[s]) for s in (0, 1)]  # +3 pp and -1 pp
    row = paired["sam(rho=0.05)"]
    assert row["Baseline"] == "erm"
    assert row["Δ acc (pp), mean ± std"] == _pm(diffs, 2, sign=True) == "+1.00 ± 2.83"
    assert (row["Pairs"], row["Wins"]) == ("2", "1/2")
    assert row["Seeds missing"] == "2 (from sam(rho=0.05))"

    # The environment of the runs is on the page.
    assert "2.9.0-test" in text and "abc123" in text
    assert not list((tmp_path / "out").glob("*.tmp-*"))  # atomic writes leave no temporaries


def test_validation_and_final_sharpness_columns_equal_hand_computed_statistics(tmp_path):
    """With --validation and --measure, the table adds ``Val acc (%)`` and one ``Final <measure>`` column per
    measure: the summary's value, or (a run stored before the summary carried the measures) its last epoch's."""
    path = tmp_path / "r.sqlite"
    val = {("erm", 0): 0.81, ("erm", 1): 0.85, ("sam", 0): 0.9, ("sam", 1): 0.86}
    lam = {("erm", 0): 120.0, ("erm", 1): 80.0, ("sam", 0): 0.5, ("sam", 1): 0.25}
    with Store(path) as store:
        for (optimizer, seed), acc in val.items():
            sam = optimizer == "sam"
            epochs = _epochs(0.9, sam, {"sharpness.lambda_max": 1e6})  # earlier epochs: not the final value
            epochs[-1]["sharpness.lambda_max"] = lam[optimizer, seed]
            summary = {"test_acc": 0.9, "val_acc": acc, "steps": 300, "grad_evals": 300}
            if seed == 1:  # a new run: the summary carries the final measure
                summary["sharpness.lambda_max"] = lam[optimizer, seed]
                epochs[-1].pop("sharpness.lambda_max")
            store.write_run(_config(optimizer, seed), summary, epochs, {})
    rows = _table_rows(build_report(path, tmp_path / "out", figures=False).read_text(), "Setting | n | Seeds")
    erm, sam = rows["erm"], rows["sam(rho=0.05)"]
    assert erm["Val acc (%)"] == _pm([81.0, 85.0], 2) == "83.00 ± 2.83"
    assert sam["Val acc (%)"] == _pm([90.0, 86.0], 2)
    assert erm["Final lambda_max"] == "100 ± 28.28"  # mean 100, sample std 40/sqrt(2), 4 significant digits
    assert sam["Final lambda_max"] == f"{0.375:.4g} ± {statistics.stdev([0.5, 0.25]):.4g}" == "0.375 ± 0.1768"


def test_without_validation_or_measures_no_such_columns(store_path, tmp_path):
    text = build_report(store_path, tmp_path / "out", figures=False).read_text()
    headers = next(line for line in text.splitlines() if line.startswith("| Setting | n | Seeds"))
    assert "Val acc" not in headers and "Final " + "lambda" not in headers and "Final train loss" in headers


def test_figures_are_pngs_linked_from_the_page(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        for seed in range(2):
            for optimizer in ("erm", "sam"):
                _write(store, optimizer, seed, 0.9, 0.1, extra={"sharpness.lambda_max": 5.0 + seed})
    page = build_report(path, tmp_path / "out")
    text = page.read_text()
    names = ["test_error_vs_epoch.png", "test_error_vs_grad_evals.png", "lr_vs_grad_evals.png",
             "sam_percent_vs_grad_evals.png", "sharpness-lambda-max_vs_grad_evals.png"]
    for name in names:
        file = tmp_path / "out" / name
        assert file.read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in text
    assert "No sharpness curves" not in text


def test_without_sharpness_keys_no_sharpness_figure(store_path, tmp_path):
    page = build_report(store_path, tmp_path / "out")
    assert "No sharpness curves" in page.read_text()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "lr_vs_grad_evals.png", "sam_percent_vs_grad_evals.png", "test_error_vs_epoch.png",
        "test_error_vs_grad_evals.png"]


def test_html_page(store_path, tmp_path):
    page = build_report(store_path, tmp_path / "out", fmt="html")
    assert page.name == "report.html"
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<td>92.33 ± 2.52</td>" in text and "<td>+1.00 ± 2.83</td>" in text
    assert '<img src="test_error_vs_epoch.png"' in text
    assert "2.9.0-test" in text


def test_unknown_baseline_gives_a_note_not_a_table(store_path, tmp_path):
    text = build_report(store_path, tmp_path / "out", baseline="adam", figures=False).read_text()
    assert "baseline `adam` is absent" in text and "Available: erm, sam, sam(rho=0.05)" in text
    assert "| Setting | Baseline" not in text
    # A baseline named by its label works as well as by optimizer name.
    text = build_report(store_path, tmp_path / "out2", baseline="sam(rho=0.05)", figures=False).read_text()
    assert _table_rows(text, "Setting | Baseline")["erm"]["Δ acc (pp), mean ± std"] == "-1.00 ± 2.83"


def test_empty_and_missing_store_and_bad_arguments(tmp_path, store_path):
    Store(tmp_path / "empty.sqlite").close()
    with pytest.raises(ValueError, match="no finished runs"):
        build_report(tmp_path / "empty.sqlite", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="No results store"):
        build_report(tmp_path / "absent.sqlite", tmp_path / "out")
    assert not (tmp_path / "absent.sqlite").exists()  # never created by a report
    with pytest.raises(ValueError, match="expected one of markdown, html"):
        build_report(store_path, tmp_path / "out", fmt="pdf")
    with pytest.raises(ValueError, match=r"Unknown group_by keys: \['lr_typo'\]"):
        build_report(store_path, tmp_path / "out", group_by=["lr_typo"])
    with pytest.raises(TypeError, match="Invalid store type"):
        build_report(3, tmp_path / "out")


def test_labels_contexts_and_nonfinite_values(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        _write(store, "erm", 0, 0.9, 0.1)
        _write(store, "erm", 1, 0.8, 0.1)
        _write(store, "sam", 0, 0.95, 0.1)
        _write(store, "sam", 1, float("nan"), 0.1)  # a diverged run: left out of the mean, pair dropped
        _write(store, "sam", 0, 0.7, 0.1, optimizer_options={"rho": 0.1})
        _write(store, "erm", 0, 0.5, 0.1, budget_grad_evals=600)  # another context: never paired with 300
        runs = store.runs()
    labels = sorted((g.label, g.settings.get("budget_grad_evals")) for g in group_runs(runs))
    assert labels == [("erm", 300), ("erm", 600), ("sam(rho=0.05)", 300), ("sam(rho=0.1)", 300)]
    pooled = group_runs(runs, group_by=["optimizer"])  # rho pooled; contexts still apart
    assert sorted((g.label, len(g.runs)) for g in pooled) == [("erm", 1), ("erm", 2), ("sam", 3)]

    text = build_report(path, tmp_path / "out", figures=False).read_text()
    assert "## mnist1d / cnn1d / 300 gradient evaluations" in text
    assert "## mnist1d / cnn1d / 600 gradient evaluations" in text
    sam = _table_rows(text, "Setting | n | Seeds")["sam(rho=0.05)"]
    assert sam["n"] == "2" and sam["Test acc (%)"] == "95.00 ± — (n=1)"
    row = _table_rows(text, "Setting | Baseline")["sam(rho=0.05)"]
    assert (row["Δ acc (pp), mean ± std"], row["Pairs"]) == ("+5.00 ± —", "1")
    assert math.isclose(float(row["Δ acc (pp), mean ± std"].split()[0]), 100 * (0.95 - 0.9))


def test_configs_missing_newer_fields_group_with_defaults(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        _write(store, "erm", 0, 0.9, 0.1)
        old = _config("erm", 1)
        del old["measures"], old["measure_every"]  # written before these fields existed
        store.write_run(old, {"test_acc": 0.8}, [], {})
        runs = store.runs()
    (group,) = group_runs(runs)
    assert group.label == "erm" and group.seeds == (0, 1)


def test_a_seed_stored_twice_under_two_ids_is_counted_once(tmp_path):
    """``rho = 1`` and ``rho = 1.0`` were two run ids before the config read integers as floats: the same setting
    and seed stored twice. The report keeps the newest run of each seed instead of counting the seed twice."""
    summary = {"test_acc": 0.8, "test_loss": 0.3, "train_loss": 0.5, "steps": 150, "sam_steps": 150,
               "sam_fraction": 1.0, "grad_evals": 300, "wall_time": 1.5, "epochs": 3}
    with Store(tmp_path / "results.sqlite") as store:
        for seed, rho, acc in ((0, 1, 0.80), (0, 1.0, 0.90), (1, 1.0, 0.70)):
            config = _config("sam", seed)
            config["optimizer_options"] = {"rho": rho}  # as an older version stored it
            store.write_run(config, {**summary, "test_acc": acc}, _epochs(acc, True), {"torch": "x"})
        runs = store.runs()
    assert len(runs) == 3 and len({r.run_key for r in runs}) == 3
    with pytest.warns(RuntimeWarning, match=r"sam: 1 run\(s\) repeat a seed of the same setting"):
        (group,) = group_runs(runs)
    assert [(r.config["seed"], r.summary["test_acc"]) for r in group.runs] == [(0, 0.90), (1, 0.70)]
    # a pooled setting (group_by) keeps every run: several per seed are what pooling means
    (pooled,) = group_runs(runs, group_by=["optimizer"])
    assert len(pooled.runs) == 3


def test_several_baseline_settings_pair_each_setting_with_its_nearest(tmp_path):
    """ERM on SGD and on Adam, and SWA (optimizer erm too): SAM on Adam is compared with ERM on Adam only, SWA
    with ERM on SGD; the deltas are the by-hand paired means and sample stds over seeds."""
    acc = {("erm", "sgd"): [0.90, 0.91, 0.92], ("erm", "adam"): [0.80, 0.82, 0.84],
           ("sam", "sgd"): [0.93, 0.93, 0.95], ("sam", "adam"): [0.81, 0.85, 0.84], ("swa", "sgd"): [0.92, 0.90, 0.93]}
    path = tmp_path / "results.sqlite"
    with Store(path) as store:
        for (method, base), values in acc.items():
            for seed, value in enumerate(values):
                fields = {"base": base, **({"lr": 1e-3} if base == "adam" else {})}
                if method == "swa":
                    fields.update(swa_start=0.75, swa_lr=0.05, swa_lr_min=0.001)
                _write(store, "erm" if method == "swa" else method, seed, value, 0.1, **fields)
    text = build_report(path, tmp_path / "out", figures=False).read_text()
    rows = _table_rows(text, "Setting | Baseline")
    pairs = {(row["Setting"].split("(")[0] + ("/swa" if "swa_start=0.75" in row["Setting"] else "")
              + ("/adam" if "base=adam" in row["Setting"] else "/sgd"),
              row["Baseline"].split("(")[0] + ("/adam" if "base=adam" in row["Baseline"] else "/sgd")):
             row["Δ acc (pp), mean ± std"] for row in rows.values()}

    def delta(a, b):
        return _pm([100 * (x - y) for x, y in zip(acc[a], acc[b])], 2, sign=True)

    assert pairs == {
        ("sam/sgd", "erm/sgd"): delta(("sam", "sgd"), ("erm", "sgd")),
        ("sam/adam", "erm/adam"): delta(("sam", "adam"), ("erm", "adam")),
        ("erm/swa/sgd", "erm/sgd"): delta(("swa", "sgd"), ("erm", "sgd")),
        ("erm/sgd", "erm/adam"): delta(("erm", "sgd"), ("erm", "adam")),  # once, not also the other way round
    }
    assert "3 settings match the baseline `erm` here" in text
