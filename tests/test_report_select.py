"""Reports at the best epoch (``select="best-val"`` / ``"best-test"``): every cell and paired difference equals
hand-computed means over the selected epochs' records; ties, non-finite accuracies, errors and the CLI option."""

from __future__ import annotations

import math
import re
import statistics

import pytest
from typer.testing import CliRunner

from sharpness.cli import app
from sharpness.harness import Store, build_report
from sharpness.harness.report import _selected_epoch, _value
from sharpness.harness.store import RunRecord
from test_report import _config, _pm, _table_rows

NAN, INF = float("nan"), float("inf")
# Per (optimizer, seed): validation and test accuracy at epochs 1-4. The final epoch (4), the best-validation
# epoch and the best-test epoch differ in every run; erm/0 ties its best val_acc (epochs 2 and 3: the earlier
# wins), erm/1 starts with NaN accuracies and sam/1 with an infinite test accuracy (never selected).
ACCURACIES = {
    ("erm", 0): ([0.50, 0.70, 0.70, 0.60], [0.55, 0.65, 0.80, 0.75]),
    ("erm", 1): ([NAN, 0.40, 0.65, 0.60], [NAN, 0.74, 0.72, 0.70]),
    ("sam", 0): ([0.60, 0.75, 0.72, 0.74], [0.70, 0.72, 0.85, 0.82]),
    ("sam", 1): ([0.55, 0.62, 0.80, 0.79], [INF, 0.88, 0.81, 0.83]),
}
BEST_VAL = {("erm", 0): 2, ("erm", 1): 3, ("sam", 0): 2, ("sam", 1): 3}
BEST_TEST = {("erm", 0): 3, ("erm", 1): 2, ("sam", 0): 3, ("sam", 1): 2}
FINAL = dict.fromkeys(ACCURACIES, 4)
MEASURED_EPOCHS = (2, 4)  # measure_every = 2: the other epochs carry no sharpness.lambda_max
LABELS = {"erm": "erm", "sam": "sam(rho=0.05)"}

runner = CliRunner()


def _records(optimizer: str, seed: int, validation: bool = True) -> list[dict]:
    """Four epoch records whose every field differs between epochs (so a cell shows which epoch it read)."""
    val, test = ACCURACIES[optimizer, seed]
    sam = optimizer == "sam"
    records = []
    for epoch in range(1, 5):
        steps = 10 * epoch + seed
        record = {"epoch": epoch, "train_loss": 1.0 / epoch + 0.01 * seed, "test_loss": 2.0 / epoch + 0.03 * seed,
                  "test_acc": test[epoch - 1], "lr": 0.1 / epoch, "steps": steps,
                  "sam_steps": steps if sam else epoch, "sam_fraction": 1.0 if sam else epoch / steps,
                  "grad_evals": (2 if sam else 1) * steps, "wall_time": 0.7 * epoch + 0.1 * seed}
        if validation:
            record.update(val_loss=1.5 / epoch, val_acc=val[epoch - 1])
        if epoch in MEASURED_EPOCHS:
            record["sharpness.lambda_max"] = 10.0 * epoch + seed + (5.0 if sam else 0.0)
        records.append(record)
    return records


def _write(store: Store, optimizer: str, seed: int, validation: bool = True) -> None:
    """A run stored as ``train`` stores it: the summary is the last epoch's record."""
    records = _records(optimizer, seed, validation)
    summary = {k: v for k, v in records[-1].items() if k not in ("epoch", "lr")}
    store.write_run(_config(optimizer, seed, measures=["lambda_max"], measure_every=2), summary, records,
                    {"torch": "x"})


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "results.sqlite"
    with Store(path) as store:
        for optimizer, seed in ACCURACIES:
            _write(store, optimizer, seed)
    return path


def _cell(values, n: int, spec: str) -> str:
    """A table cell computed by hand: mean ± sample std of the finite values, ``(n=k)`` when some are missing."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return "—"
    std = f"{statistics.stdev(kept):{spec}}" if len(kept) > 1 else "—"
    return f"{statistics.fmean(kept):{spec}} ± {std}" + (f" (n={len(kept)})" if len(kept) < n else "")


def _chosen(optimizer: str, epochs: dict) -> list[dict]:
    return [_records(optimizer, seed)[epochs[optimizer, seed] - 1] for seed in (0, 1)]


@pytest.mark.parametrize(("select", "epochs"), [("best-val", BEST_VAL), ("best-test", BEST_TEST)])
def test_cells_and_paired_differences_come_from_the_selected_epochs(store_path, tmp_path, select, epochs):
    text = build_report(store_path, tmp_path / "out", select=select, figures=False).read_text()
    rows = _table_rows(text, "Setting | n | Seeds")
    headers = next(line for line in text.splitlines() if line.startswith("| Setting | n | Seeds"))
    assert "Final" not in headers and "### Final metrics" not in text and "### Metrics at the selected epoch" in text
    for optimizer in ("erm", "sam"):
        row, chosen = rows[LABELS[optimizer]], _chosen(optimizer, epochs)
        assert [r["epoch"] for r in chosen] == [epochs[optimizer, s] for s in (0, 1)]
        assert row["Epoch"] == _pm([r["epoch"] for r in chosen], 1)
        assert row["Test acc (%)"] == _pm([100 * r["test_acc"] for r in chosen], 2)
        assert row["Test error (%)"] == _pm([100 - 100 * r["test_acc"] for r in chosen], 2)
        assert row["Val acc (%)"] == _pm([100 * r["val_acc"] for r in chosen], 2)
        assert row["Test loss"] == _pm([r["test_loss"] for r in chosen], 4)
        assert row["Train loss"] == _pm([r["train_loss"] for r in chosen], 4)
        assert row["%SAM"] == _pm([100 * r["sam_fraction"] for r in chosen], 1)
        assert row["Grad evals"] == _pm([r["grad_evals"] for r in chosen], 0)
        assert row["Steps"] == _pm([r["steps"] for r in chosen], 0)
        assert row["Wall time (s)"] == _pm([r["wall_time"] for r in chosen], 1)
        # a measure not taken at the selected epoch (measure_every = 2) is left out of the cell
        assert row["lambda_max"] == _cell([r.get("sharpness.lambda_max") for r in chosen], 2, ".4g")
    diffs = [100 * (s["test_acc"] - e["test_acc"]) for s, e in zip(_chosen("sam", epochs), _chosen("erm", epochs))]
    paired = _table_rows(text, "Setting | Baseline")[LABELS["sam"]]
    assert paired["Δ acc (pp), mean ± std"] == _pm(diffs, 2, sign=True)
    assert paired["Wins"] == f"{sum(d > 0 for d in diffs)}/2"
    assert text.count("Selected per run:") == 1
    optimistic = "selection on the test set: an optimistic estimate, as in the GAM code"
    assert (optimistic in text) == (select == "best-test")


def test_best_val_cells_by_hand(store_path, tmp_path):
    """The same check with the numbers written out: erm picks epochs 2 and 3, sam epochs 2 and 3 (best val_acc)."""
    rows = _table_rows(build_report(store_path, tmp_path / "out", select="best-val", figures=False).read_text(),
                       "Setting | n | Seeds")
    assert rows["erm"]["Epoch"] == "2.5 ± 0.7"
    assert rows["erm"]["Test acc (%)"] == "68.50 ± 4.95"  # (0.65 + 0.72) / 2: epoch 2 of seed 0, 3 of seed 1
    assert rows["erm"]["Val acc (%)"] == "67.50 ± 3.54"  # (0.70 + 0.65) / 2: the tie at 0.70 went to epoch 2
    assert rows["sam(rho=0.05)"]["Test acc (%)"] == "76.50 ± 6.36"  # (0.72 + 0.81) / 2
    assert rows["erm"]["lambda_max"] == "20 ± — (n=1)"  # seed 0's epoch 2; seed 1's epoch 3 was not measured


def test_final_is_the_default_and_reads_the_last_record(store_path, tmp_path):
    default = build_report(store_path, tmp_path / "a", figures=False).read_text()
    final = build_report(store_path, tmp_path / "b", select="final", figures=False).read_text()
    assert default == final
    assert "### Final metrics" in final and "Selected per run" not in final
    rows = _table_rows(final, "Setting | n | Seeds")
    assert "Epoch" not in rows["erm"] and "Final train loss" in rows["erm"]
    assert rows["erm"]["Test acc (%)"] == _pm([100 * r["test_acc"] for r in _chosen("erm", FINAL)], 2)


def test_figures_do_not_depend_on_the_selection(store_path, tmp_path):
    build_report(store_path, tmp_path / "final")
    build_report(store_path, tmp_path / "best", select="best-test")
    pngs = sorted(p.name for p in (tmp_path / "final").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (tmp_path / "best").glob("*.png"))
    for name in pngs:
        assert (tmp_path / "final" / name).read_bytes() == (tmp_path / "best" / name).read_bytes(), name


def test_ties_go_to_the_earliest_epoch_and_nonfinite_accuracies_are_never_selected():
    def run(*accs):
        epochs = tuple({"epoch": i, "test_acc": a, "val_acc": a, "train_loss": float(i)} for i, a in enumerate(accs, 1))
        return RunRecord("r", {}, {"test_acc": accs[-1]}, {}, 0.0, epochs)

    assert _selected_epoch(run(0.5, 0.9, 0.9, 0.8), "best-test")["epoch"] == 2
    assert _selected_epoch(run(NAN, 0.3, INF, 0.2), "best-val")["epoch"] == 2
    assert _selected_epoch(run(-INF, 0.1), "best-test")["epoch"] == 2
    assert _selected_epoch(run(NAN, NAN), "best-test") is None  # no finite accuracy: the run leaves the cell
    assert _value(run(NAN, NAN), "test_acc", "best-test") is None
    assert _value(run(0.5, 0.9, 0.8), "train_loss", "best-val") == 2.0
    assert _value(run(0.5, 0.9, 0.8), "test_acc", "final") == 0.8


def test_best_val_without_validation_records_is_an_error(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        _write(store, "erm", 0)
        _write(store, "sam", 0, validation=False)
    with pytest.raises(ValueError, match=r"Cannot select best-val: 1 of the 2 runs .* have no per-epoch validation "
                                         r"accuracy .*train with validation > 0 \(--validation 0.1\)"):
        build_report(path, tmp_path / "out", select="best-val")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    build_report(path, tmp_path / "out", select="best-test", figures=False)  # test accuracy: every run has it


def test_best_test_without_epoch_records_is_an_error(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        store.write_run(_config("erm", 0), {"test_acc": 0.9}, [], {})
    with pytest.raises(ValueError, match=r"Cannot select best-test: 1 of the 1 runs .*use select='final'"):
        build_report(path, tmp_path / "out", select="best-test")


@pytest.mark.parametrize("select", ["x", "best", "BEST-VAL", "", None, 1])
def test_invalid_select(store_path, tmp_path, select):
    expected = f"Invalid select value: {select!r} (expected one of final, best-val, best-test)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_report(store_path, tmp_path / "out", select=select)
    assert not (tmp_path / "out").exists()


def test_cli_select(store_path, tmp_path):
    result = runner.invoke(app, ["report", "--db", str(store_path), "--out", str(tmp_path / "v"), "--select",
                                 "best-val", "--no-figures"])
    assert result.exit_code == 0, result.output
    row = _table_rows((tmp_path / "v" / "report.md").read_text(), "Setting | n | Seeds")["erm"]
    assert row["Test acc (%)"] == _pm([100 * r["test_acc"] for r in _chosen("erm", BEST_VAL)], 2)

    result = runner.invoke(app, ["report", "--db", str(store_path), "--out", str(tmp_path / "t"), "--select",
                                 "best-test", "--no-figures", "--html"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "t" / "report.html").read_text()
    assert "<p>Selected per run: the epoch with the highest test accuracy (selection on the test set" in page
    cell = _pm([100 * r["test_acc"] for r in _chosen("erm", BEST_TEST)], 2)
    assert f"<td>{cell}</td>" in page

    bad = runner.invoke(app, ["report", "--db", str(store_path), "--out", str(tmp_path / "b"), "--select", "best"])
    assert bad.exit_code == 2 and "Invalid select value: 'best'" in bad.output, bad.output

    plain = tmp_path / "plain.sqlite"
    with Store(plain) as store:
        _write(store, "erm", 0, validation=False)
    missing = runner.invoke(app, ["report", "--db", str(plain), "--out", str(tmp_path / "p"), "--select", "best-val"])
    assert missing.exit_code == 2 and "validation > 0" in missing.output, missing.output
