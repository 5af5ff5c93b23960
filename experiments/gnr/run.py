"""GNR on MNIST-1D (cnn1d): SGD vs SGD+GNR vs SAM vs SAM+GNR vs GNR on every 10th step, equal epochs.

Test accuracy (mean +/- std over seeds), top Hessian eigenvalue and Hessian trace of the final weights (on the
first 1000 training examples), training wall time and gradient evaluations relative to SGD.

    python experiments/gnr/run.py [--epochs 40] [--seeds 0 1 2] [--out experiments/gnr/results.json]

Single thread; about 10 minutes of CPU on a laptop-class core for the defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import sharpness
from sharpness._io import write_text_atomically
from sharpness.data import load_dataset
from sharpness.harness.config import TrainConfig
from sharpness.harness.train import train

GNR = {"rho": 0.1, "alpha": 0.1}  # the paper's CIFAR setting
SAM_RHO = 0.05  # the repository's SAM default on MNIST-1D (docs/comparisons), not tuned
METHODS = {
    "SGD": ("erm", {}),
    "SGD+GNR": ("gnr", dict(GNR)),
    "SAM": ("sam", {"rho": SAM_RHO}),
    "SAM+GNR": ("gnr", {**GNR, "oracle": "sam", "oracle_rho": SAM_RHO}),
    "SGD+GNR 1/10": ("gnr", {**GNR, "every": 10}),
    "SGD+GNR 1/10, alpha x10": ("gnr", {**GNR, "alpha": 1.0, "every": 10}),
}


def run(epochs: int, seeds: list[int]) -> list[dict]:
    data = load_dataset("mnist1d")
    rows = []
    for seed in seeds:
        for label, (name, options) in METHODS.items():
            config = TrainConfig(dataset="mnist1d", model="cnn1d", optimizer=name, optimizer_options=options,
                                 epochs=epochs, seed=seed, measures=("lambda_max", "trace"),
                                 measure_every=epochs, measure_examples=1000)
            start = time.perf_counter()
            result = train(config, data=data, log=None)
            last = result.epochs[-1]
            row = {"method": label, "seed": seed, "test_acc": last["test_acc"], "train_loss": last["train_loss"],
                   "lambda_max": last["sharpness.lambda_max"], "trace": last["sharpness.trace"],
                   "train_time": last["wall_time"], "grad_evals": last["grad_evals"], "steps": last["steps"],
                   "gnr_steps": last["sam_steps"] if name == "gnr" else 0,
                   "total_time": time.perf_counter() - start}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def summarize(rows: list[dict]) -> str:
    def ms(values, scale=1.0, digits=2):
        mean = statistics.mean(values) * scale
        std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    base = {r["seed"]: r for r in rows if r["method"] == "SGD"}
    lines = ["| method | test acc (%) | λ_max | trace | train time / SGD | grad evals / SGD |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label in METHODS:
        rs = [r for r in rows if r["method"] == label]
        if not rs:
            continue
        time_ratio = statistics.mean(r["train_time"] / base[r["seed"]]["train_time"] for r in rs)
        eval_ratio = statistics.mean(r["grad_evals"] / base[r["seed"]]["grad_evals"] for r in rs)
        lines.append(f"| {label} | {ms([r['test_acc'] for r in rs], 100)} | {ms([r['lambda_max'] for r in rs], 1, 1)} "
                     f"| {ms([r['trace'] for r in rs], 1, 0)} | {time_ratio:.2f} | {eval_ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run(args.epochs, args.seeds)
    table = summarize(rows)
    print(table)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    write_text_atomically(args.out, json.dumps({
        "rows": rows, "table": table, "epochs": args.epochs, "seeds": args.seeds, "commit": commit,
        "torch": torch.__version__, "sharpness": sharpness.__version__, "python": platform.python_version(),
        "methods": {k: {"optimizer": v[0], "options": v[1]} for k, v in METHODS.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
