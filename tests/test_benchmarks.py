"""The benchmark scripts run end to end at toy sizes and write consistent JSON (speed itself is never asserted).

Each script runs in a subprocess exactly as documented (``python benchmarks/<script>.py ...``), with one
repeat of one step, so a crash in the report or the JSON (such as a CPU-only environment field) fails here
rather than at the end of an hour of timing.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run_script(name: str, *args: str, out: Path) -> dict:
    completed = subprocess.run([sys.executable, str(BENCHMARKS / name), "--json", str(out), *args],
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text())


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_bench_step_rows_and_pass_counts(tmp_path):
    data = run_script("bench_step.py", "--models", "mlp", "--methods", "LookSAM k=5", "SSAMF s=0.5 vmap",
                      "--repeats", "3", "--steps-per-repeat", "5", "--warmup", "0", out=tmp_path / "step.json")
    assert data["environment"]["device"] == "cpu" and data["environment"]["git"]["commit"]
    (result,) = data["results"]
    methods = result["methods"]
    assert set(methods) >= {"SGD", "SAM", "LookSAM k=5", "SSAMF s=0.5 vmap"}
    passes = {name: entry["passes_per_step"] for name, entry in methods.items()}
    assert passes["SGD"] == 1 and passes["SAM"] == 2 and passes["SSAMF s=0.5 vmap"] == 2
    assert passes["LookSAM k=5"] == pytest.approx(1 + 1 / 5)  # 5 steps: one perturbed pass
    for entry in methods.values():
        assert positive(entry["wall"]["median_s"]) and positive(entry["cpu"]["median_s"])
    sgd = methods["SGD"]["wall"]
    assert sgd["normalized"] == 1.0
    # the headline is the median of the per-repeat paired ratios (a drift common to a repeat cancels)
    paired = [s / (2 * g) for s, g in zip(methods["SAM"]["wall"]["per_block_s"], sgd["per_block_s"], strict=True)]
    ratio = result["ratios"]["wall"]["sam_over_2x_sgd"]
    assert len(paired) == 3 and ratio["value"] == pytest.approx(statistics.median(paired))
    assert ratio["ratio_of_medians"] == pytest.approx(methods["SAM"]["wall"]["median_s"] / (2 * sgd["median_s"]))
    # a step's allocator peak: SAM holds nothing at its peak beyond what SGD's step holds (its backup is state)
    peak = {name: entry["cpu_step_peak_bytes"] for name, entry in methods.items()}
    assert peak["SGD"] > 0 and abs(peak["SAM"] - peak["SGD"]) < 0.05 * result["param_bytes"]
    # the peer of each chosen method runs beside it; its passes are its closure calls: pytorch-optimizer's
    # LookSAM recomputes the gradient at the same weights on its reuse steps, so 2 passes on every step
    assert passes["LookSAM k=5 (pytorch-optimizer)"] == 2 and passes["SAM (pytorch-optimizer)"] == 2
    assert "ASAM (pytorch-optimizer)" not in methods and set(result["peers"]) == {"SAM", "LookSAM k=5"}
    peer = result["peers"]["LookSAM k=5"]
    assert peer["peer"] == "LookSAM k=5 (pytorch-optimizer)" and peer["passes_per_step"] == [1.2, 2.0]
    for clock in ("wall", "cpu"):
        ours, theirs = methods["LookSAM k=5"][clock], methods["LookSAM k=5 (pytorch-optimizer)"][clock]
        assert peer[clock]["value"] == pytest.approx(statistics.median(
            a / b for a, b in zip(ours["per_block_s"], theirs["per_block_s"], strict=True)))
        assert peer[clock]["update_only"] == pytest.approx(ours["update_only_median_s"] /
                                                           theirs["update_only_median_s"])


def test_bench_step_gsam_peer(tmp_path):
    """pytorch-optimizer's GSAM runs both of its passes inside ``step`` (no update-only timing); 2 passes."""
    data = run_script("bench_step.py", "--models", "tiny", "--methods", "GSAM", "--repeats", "1",
                      "--steps-per-repeat", "2", "--warmup", "0", out=tmp_path / "gsam.json")
    (result,) = data["results"]
    peer = result["methods"]["GSAM (pytorch-optimizer)"]
    assert peer["passes_per_step"] == 2 and peer["wall"]["update_only_median_s"] is None
    assert peer["kernels_per_step"] > result["methods"]["GSAM"]["kernels_per_step"] > 0
    assert result["peers"]["GSAM"]["wall"]["update_only"] is None


def test_bench_step_host_bound_models(tmp_path):
    """The host-bound models (the GPU regime on a CPU): their sizes as documented, SAM's row present."""
    data = run_script("bench_step.py", "--models", "tiny", "deep", "--methods", "SAM", "--repeats", "1",
                      "--steps-per-repeat", "2", "--warmup", "0", out=tmp_path / "host.json")
    tiny, deep = data["results"]
    assert tiny["parameters"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert deep["parameters"] == 64 * 32 + 32 + 24 * (32 * 32 + 32 + 2 * 32) + 32 * 10 + 10
    assert "100 tensors" in deep["model"]
    for result, tensors in ((tiny, 6), (deep, 100)):
        assert result["methods"]["SAM"]["passes_per_step"] == 2
        assert positive(result["ratios"]["wall"]["sam_over_2x_sgd"]["value"])
        # the op counter, by hand: torch.optim.SGD's per-tensor momentum loop on the CPU is mul_, add_ (the
        # buffer) and add_ (the weight) per tensor, with no read; SAM adds a fixed number of fused kernels and
        # one read (the non-finite check of the losses)
        sgd, sam = result["methods"]["SGD"], result["methods"]["SAM"]
        assert sgd["kernels_per_step"] == 3 * tensors and sgd["reads_per_step"] == 0
        assert sam["reads_per_step"] == 1 and 3 * tensors < sam["kernels_per_step"] < 3 * tensors + 30
    assert (deep["methods"]["SAM"]["kernels_per_step"] - deep["methods"]["SGD"]["kernels_per_step"]
            == tiny["methods"]["SAM"]["kernels_per_step"] - tiny["methods"]["SGD"]["kernels_per_step"])


def test_bench_step_with_a_compiled_model(tmp_path):
    """``--compile``: steps through the compiled model (SSAM-F's per-example Fisher included); GNR's exact mode,
    which needs double backward, is left out with a message; the option is recorded."""
    out = tmp_path / "compiled.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_step.py"), "--json", str(out), "--models", "tiny", "--compile",
         "aot_eager", "--methods", "SSAMF s=0.5", "GNR exact", "GNR fd", "--repeats", "1", "--steps-per-repeat", "2",
         "--warmup", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "left out GNR exact" in completed.stderr and "torch.compile'd (backend aot_eager)" in completed.stdout
    data = json.loads(out.read_text())
    assert data["environment"]["options"]["compile"] == "aot_eager"
    (result,) = data["results"]
    assert set(result["methods"]) == {"SGD", "SAM", "SAM (pytorch-optimizer)", "SSAMF s=0.5", "GNR fd"}
    assert all(positive(entry["wall"]["median_s"]) for entry in result["methods"].values())


def test_bench_hessian_reaches_its_target(tmp_path):
    data = run_script("bench_hessian.py", "--models", "mlp", "--repeats", "1", "--warmup", "0", "--tols", "1e-3",
                      "--targets", "1e-2", "--trace-samples", "4", out=tmp_path / "hessian.json")
    (result,) = data["results"]
    reference = result["reference_top_eigenvalue"]
    assert reference["converged"] and positive(reference["value"])
    lanczos = [c for c in result["cases"] if c["implementation"] == "ours lanczos" and c["tol"] == 1e-3]
    assert lanczos and lanczos[0]["max_rel_error"] < 1e-2  # tolerance 1e-3 on the eigenvalue estimate


def test_bench_scaling_writes_json_and_plot(tmp_path):
    plot = tmp_path / "scaling.png"
    data = run_script("bench_scaling.py", "--widths", "16", "32", "--repeats", "1", "--steps-per-repeat", "1",
                      "--warmup", "0", "--plot", str(plot), out=tmp_path / "scaling.json")
    assert [r["width"] for r in data["results"]] == [16, 32]
    assert data["results"][0]["parameters"] < data["results"][1]["parameters"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # redrawn from the JSON, a run measured on CUDA gets the wall clock only (the device it was measured on,
    # not this command's default --device cpu); a CPU run gets both clocks
    for device, clocks in (("cpu", ["[wall clock]", "[cpu clock]"]), ("cuda", ["[wall clock]"])):
        saved = tmp_path / f"{device}.json"
        saved.write_text(json.dumps({**data, "environment": {**data["environment"], "device": device}}))
        shown = subprocess.run([sys.executable, str(BENCHMARKS / "bench_scaling.py"), "--from-json", str(saved)],
                               capture_output=True, text=True, timeout=120, check=True).stdout
        assert [line for line in shown.splitlines() if line.endswith("clock]")] == clocks


def test_bench_data_times_both_pipelines(tmp_path):
    data = run_script("bench_data.py", "--images", "300", "--batch-size", "64", "--repeats", "1", "--warmup", "0",
                      out=tmp_path / "data.json")
    rows = data["results"]
    assert set(rows) == {"torchvision, DataLoader workers=0", "resident (ours)"}
    assert rows["resident (ours)"]["ratio_to_ours"] == 1.0
    assert all(positive(row["median_s"]) and len(row["per_epoch_s"]) == 1 for row in rows.values())
    assert data["environment"]["options"]["images"] == 300 and data["environment"]["torchvision"]


def test_bench_loop_times_the_harness_against_a_bare_loop(tmp_path):
    data = run_script("bench_loop.py", "--optimizers", "erm", "sam", "--repeats", "1", "--warmup", "0",
                      out=tmp_path / "loop.json")
    rows = data["results"]
    assert set(rows) == {"erm", "sam"}
    for row in rows.values():
        assert positive(row["harness_us_per_step"]) and positive(row["bare_us_per_step"])
        assert row["ratio"] == row["harness_us_per_step"] / row["bare_us_per_step"]


def test_bench_sweep(tmp_path):
    """One worker against two on a 2-run sweep: both stores hold the same runs; the ratio is their times'."""
    data = run_script("bench_sweep.py", "--runs", "2", "--steps", "2", "--repeats", "1", "--dataset", "digits",
                      "--model", "mlp", "--batch-size", "64", out=tmp_path / "sweep.json")
    result = data["result"]
    assert result["runs"] == 2 and result["jobs"] == 2 and result["same_runs"]
    walls = result["wall_s"]
    assert positive(walls["one worker"]["median"]) and positive(walls["2 workers"]["median"])
    assert result["ratio_parallel_over_one"]["median"] == pytest.approx(
        walls["2 workers"]["median"] / walls["one worker"]["median"])


def _runbook_calls() -> list[tuple[str, list[str]]]:
    """``(script, flags)`` of each ``benchmarks/<script>.py`` call in ``gpu_runbook.sh`` (continuation lines
    joined)."""
    import re
    import shlex

    text = (BENCHMARKS / "gpu_runbook.sh").read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        match = re.search(r"benchmarks/(bench_\w+\.py)(.*?)(?:2>&1|$)", line)
        if match and not line.lstrip().startswith("#"):
            calls.append((match.group(1), [t for t in shlex.split(match.group(2)) if t.startswith("--")]))
    return calls


def test_the_gpu_runbook_calls_every_benchmark_with_flags_it_takes():
    """The runbook runs where nothing can be fixed cheaply (a lent GPU, minutes of device time): its shell is
    valid, every stage is known, and every flag it passes is one the script's ``--help`` lists."""
    script = BENCHMARKS / "gpu_runbook.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    calls = _runbook_calls()
    assert {name for name, _ in calls} == {"bench_step.py", "bench_hessian.py", "bench_scaling.py", "bench_data.py",
                                          "bench_sweep.py"}
    helps = {}
    for name, flags in calls:
        if name not in helps:
            helps[name] = subprocess.run([sys.executable, str(BENCHMARKS / name), "--help"], capture_output=True,
                                         text=True, timeout=120, check=True).stdout
        assert flags and all(flag in helps[name] for flag in flags), (name, flags)
    unknown = subprocess.run(["bash", str(script), "no-such-stage"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "OUT": "/tmp/sharpness-runbook-test",
                                  "PYTHON": sys.executable}, check=False)
    assert unknown.returncode == 2 and "unknown stage" in unknown.stderr
