"""Sweep throughput: ``sharpness sweep`` with one worker against ``--jobs N`` workers, whole commands, in one run.

A sweep of ``--runs`` short runs (ERM and SAM alternating over seeds, MNIST-1D and its 1-D CNN by default) is
trained from an empty store by two commands, in turn (A B, B A, A B ...), each in a fresh folder:

* one worker: ``sharpness sweep FILE -q --threads C`` (C = the CPUs this process may use);
* N workers: ``sharpness sweep FILE -q --jobs N`` (each worker gets C / N torch threads).

Both are timed as whole processes (``perf_counter`` around ``subprocess.run``: the interpreter, the imports,
the workers' start-up and the data loading included), after ``--warmup`` untimed pairs. Reported: the median
and the range of the wall time of each, the median of the pair-by-pair ratios ``N workers / one worker``, runs
per minute, and a check that both stores hold the same runs with the same final test accuracy.

Usage::

    python benchmarks/bench_sweep.py                               # 8 runs, --jobs 2 on 2 CPUs, ~4 minutes
    python benchmarks/bench_sweep.py --steps 150 --warmup 1        # short runs: start-up weighs more
    python benchmarks/bench_sweep.py --jobs 4 --runs 16 --json benchmarks/results/sweep.json
    python benchmarks/bench_sweep.py --device cuda --jobs 8        # on a machine with GPUs: one worker per GPU
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _shared import environment as shared_environment
from _shared import write_json_atomically

from sharpness.harness import Store
from sharpness.harness.sweep import available_cpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="workers of the parallel command (default: 2)")
    parser.add_argument("--runs", type=int, default=8, help="runs in the sweep (default: 8)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default: 600)")
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="--device of both commands (default: cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs (default: 3)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed pairs first (default: 0)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.jobs < 2 or args.runs < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--jobs must be >= 2, --runs, --steps and --repeats >= 1, --warmup >= 0")
    return args


def sweep_file(args: argparse.Namespace) -> str:
    seeds = list(range((args.runs + 1) // 2))
    return (f"seeds = {seeds}\n[base]\ndataset = {args.dataset!r}\nmodel = {args.model!r}\n"
            f"batch_size = {args.batch_size}\nbudget_steps = {args.steps}\n"
            '[[methods]]\noptimizer = "erm"\n[[methods]]\noptimizer = "sam"\n')


def stored(db: Path) -> dict[str, float]:
    """Run key -> final test accuracy, straight from the store."""
    with Store(db) as store:
        return {record.run_key: record.summary["test_acc"] for record in store.runs()}


def timed_sweep(text: str, extra: list[str], device: str) -> tuple[float, dict[str, float]]:
    """One ``sharpness sweep`` from an empty store in a fresh folder: wall seconds and what it stored."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.toml"
        path.write_text(text)
        command = [sys.executable, "-m", "sharpness", "sweep", str(path), "-q", "--device", device, *extra]
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
        return wall, stored(Path(folder) / "sweep.sqlite")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = available_cpus()
    text = sweep_file(args)
    runs = len(range((args.runs + 1) // 2)) * 2
    one = ["--threads", str(cpus)]
    many = ["--jobs", str(args.jobs)]
    walls: dict[str, list[float]] = {"one worker": [], f"{args.jobs} workers": []}
    results: dict[str, dict[str, float]] = {}
    sides = (("one worker", one), (f"{args.jobs} workers", many))
    for repeat in range(args.warmup + args.repeats):
        for name, extra in sides if repeat % 2 == 0 else sides[::-1]:  # A B, B A, ...: neither side always first
            wall, result = timed_sweep(text, extra, args.device)
            results[name] = result
            if repeat >= args.warmup:
                walls[name].append(wall)
    single, parallel = walls["one worker"], walls[f"{args.jobs} workers"]
    ratios = [p / s for p, s in zip(parallel, single)]
    same_runs = set(results["one worker"]) == set(results[f"{args.jobs} workers"])
    accuracy_gap = max(abs(results["one worker"][k] - results[f"{args.jobs} workers"][k])
                       for k in results["one worker"]) if same_runs else None
    summary: dict[str, Any] = {
        "runs": runs, "cpus": cpus, "jobs": args.jobs,
        "wall_s": {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
                   for name, v in walls.items()},
        "ratio_parallel_over_one": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "runs_per_minute": {name: 60 * runs / statistics.median(v) for name, v in walls.items()},
        "same_runs": same_runs, "max_test_acc_difference": accuracy_gap,
    }
    env = shared_environment(extra={"device": args.device, "cpus": cpus}, options=vars(args))
    if args.json:
        write_json_atomically(args.json, {"environment": env, "result": summary})
    print(f"{runs} runs ({args.dataset}/{args.model}, {args.steps} steps each, ERM and SAM), {cpus} CPUs, device "
          f"{args.device}, {args.repeats} timed pairs after {args.warmup} warm-up")
    for name, v in summary["wall_s"].items():
        print(f"  {name:<10} wall {v['median']:.1f} s [{v['min']:.1f}, {v['max']:.1f}]  "
              f"{summary['runs_per_minute'][name]:.1f} runs/min")
    r = summary["ratio_parallel_over_one"]
    print(f"  {args.jobs} workers / one worker, paired: {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
    print(f"  same runs stored: {same_runs}; largest test-accuracy difference: {accuracy_gap}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
