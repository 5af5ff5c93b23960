"""Baselines on MNIST-1D / cnn1d through the harness: SGD, SAM, AE-SAM, ESAM, GSAM, SSAM-F, SmoothOut.

Equal epochs (not equal compute): every method sees the same data and the same cosine schedule; the cost
differences show up in grad_evals and wall time. Single thread, CPU. Usage:

    python experiments/baselines/run.py --epochs 15 --seeds 0 1 2 --out experiments/baselines/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sharpness._io import write_text_atomically
from sharpness.harness.config import TrainConfig
from sharpness.harness.train import train

RHO = 0.05
METHODS = {  # label: (registered name, options)
    "SGD (erm)": ("erm", {}),
    "SAM": ("sam", {"rho": RHO}),
    "AE-SAM": ("aesam", {"rho": RHO}),  # total_steps is filled in by the harness
    "ESAM (beta 0.6, gamma 0.5)": ("esam", {"rho": RHO, "beta": 0.6, "gamma": 0.5}),
    "GSAM (alpha 0.1, rho_min 0.005)": ("gsam", {"rho": RHO, "alpha": 0.1, "rho_min": 0.005}),
    "SSAM-F (s 0.5, 64 samples/epoch)": ("ssamf", {"rho": RHO, "sparsity": 0.5, "num_samples": 64,
                                                   "update_freq": 63}),
    "SmoothOut (a 0.01)": ("smoothout", {"a": 0.01}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="experiments/baselines/results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for label, (name, options) in METHODS.items():
        for seed in args.seeds:
            config = TrainConfig(dataset="mnist1d", model="cnn1d", optimizer=name, optimizer_options=options,
                                 epochs=args.epochs, seed=seed)
            start = time.perf_counter()
            result = train(config, log=None)
            wall = time.perf_counter() - start
            s = result.summary
            runs.append({"method": label, "name": name, "seed": seed, "test_acc": s["test_acc"],
                         "grad_evals": s["grad_evals"], "steps": s["steps"], "wall_time": wall,
                         "options": options})
            print(f"{label:36s} seed {seed}: test acc {100 * s['test_acc']:.2f}%  grad evals {s['grad_evals']}  "
                  f"{wall:.1f}s", flush=True)
    write_text_atomically(args.out, json.dumps({"epochs": args.epochs, "runs": runs}, indent=1))
    print()
    print("| Method | Test acc (%) | Grad evals | Wall time (s) |")
    print("|---|---|---|---|")
    for label in METHODS:
        rows = [r for r in runs if r["method"] == label]
        acc = [100 * r["test_acc"] for r in rows]
        wall = [r["wall_time"] for r in rows]
        evals = [r["grad_evals"] for r in rows]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {label} | {statistics.mean(acc):.2f} ± {sd:.2f} | {statistics.mean(evals):.0f} | "
              f"{statistics.mean(wall):.1f} ± {statistics.stdev(wall) if len(wall) > 1 else 0.0:.1f} |")


if __name__ == "__main__":
    main()
