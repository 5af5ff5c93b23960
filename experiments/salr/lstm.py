"""SALR paper's character-LSTM experiment (War and Peace, Table 5) on Tiny Shakespeare, CPU scale (issue #7).

Every run stops when the optimizer's gradient-evaluation counter reaches ``--budget`` (the paper's protocol:
the same number of gradient calls for every method), through the harness (``TrainConfig`` / ``train``). Test
perplexity = exp(test cross-entropy per character), the harness's ``test_loss``.

Data: ``tinyshakespeare`` (first 90 % train, last 10 % test, 65 characters), cut into NON-overlapping windows
of ``BLOCK`` = 32 characters (char-rnn style: every character is a target once per epoch; 31,370 training
windows; 3,485 test windows = the test text but its last 20 characters, 111,520 characters, each predicted
once with 0..31 characters of context). Model: ``char_lstm`` with embedding 32, one LSTM layer of 128, no dropout (93,409
weights). Batch 32 windows (1,024 characters). Gradient clipping ``max_grad_norm=1`` for every method.

Methods (the paper's settings where it gives them; the harness's "step" schedule over the budget, x0.1 at 50 %,
x0.01 at 75 %, for all): SGD (momentum 0.9, no weight decay, lr from ``--pilot``); SGD-SALR (the same lr; gamma
0.002, c = 2, n1 = n2 = 5, unbounded factor); SAM (rho 0.05); Entropy-SGD (L = 5, SGLD lr 0.1, noise 1e-4,
scope 0.03 x 1.001; outer lr from ``--pilot``); Adam (lr 2e-3, the char-LSTM rate of Entropy-SGD's paper);
Adam-SALR (the same lr). Extra rows, NOT in the paper: SALR with ``max_factor=2`` (fixed a priori).

``--pilot`` chooses the SGD lr and Entropy-SGD's outer lr on a validation split (the last 10 % of the training
text, seed 0), never on the test set. Final S-hat: harness measure ``salr`` (5 + 5 normalized steps of 0.01) on
the first 256 training windows (8,192 characters), eval mode. Single thread; results appended to the JSON
after every run (rerun = resume).

    python experiments/salr/lstm.py --pilot
    python experiments/salr/lstm.py --budget 1000 --seeds 0 1 2
    python experiments/salr/lstm.py --table
    python experiments/salr/lstm.py --factors                     # SALR's lr factor over training (seed 0)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path

import torch
from _runs import add_run, load_results, mean_sd, train_recorded
from torch.utils.data import Dataset, TensorDataset

from sharpness.data import load_dataset
from sharpness.harness.config import TrainConfig
from sharpness.harness.train import train

TEXT = "/work/shared/data/tinyshakespeare.txt"
BLOCK = 32
MODEL = {"embedding_dim": 32, "hidden_size": 128, "num_layers": 1, "dropout": 0.0}
CLIP = 1.0
SALR = {"gamma": 0.002, "every": 2, "n_descent": 5, "n_ascent": 5}
ENTROPY = {"langevin_steps": 5}  # class defaults = the paper's: SGLD lr 0.1, noise 1e-4, scope 0.03 x 1.001
SGD_LR = 3.0  # --pilot, validation perplexity 8.86 / 7.00 / 6.03 / 5.81 for lr 0.1 / 0.3 / 1 / 3
ENTROPY_LR = 10.0  # --pilot, validation perplexity 16.5 / 11.6 / 8.99 / 7.65 for lr 0.3 / 1 / 3 / 10
SGD = {"base": "sgd", "lr": SGD_LR, "momentum": 0.9, "weight_decay": 0.0}
ADAM = {"base": "adam", "lr": 2e-3, "momentum": 0.0, "weight_decay": 0.0}

METHODS: dict[str, dict] = {
    "SGD": {**SGD, "optimizer": "erm"},
    "SGD-SALR": {**SGD, "optimizer": "salr", "optimizer_options": SALR},
    "SAM": {**SGD, "optimizer": "sam", "optimizer_options": {"rho": 0.05}},
    "Entropy-SGD": {**SGD, "lr": ENTROPY_LR, "optimizer": "entropysgd", "optimizer_options": ENTROPY},
    "Adam": {**ADAM, "optimizer": "erm"},
    "Adam-SALR": {**ADAM, "optimizer": "salr", "optimizer_options": SALR},
    # Not in the paper: the factor clamped to <= 2 (fixed a priori, not tuned).
    "SGD-SALR (max 2)": {**SGD, "optimizer": "salr", "optimizer_options": {**SALR, "max_factor": 2.0}},
    "Adam-SALR (max 2)": {**ADAM, "optimizer": "salr", "optimizer_options": {**SALR, "max_factor": 2.0}},
}
MAIN = ["SGD", "SGD-SALR", "SAM", "Entropy-SGD", "Adam", "Adam-SALR"]
GUARDED = ["SGD-SALR (max 2)", "Adam-SALR (max 2)"]


def non_overlapping(windows: Dataset) -> TensorDataset:
    """Every ``BLOCK``-th window of the harness's overlapping windows, as in-memory tensors (B, T)."""
    items = [windows[i] for i in range(0, len(windows), BLOCK)]
    return TensorDataset(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


def load(validation: float = 0.0):
    data = load_dataset("tinyshakespeare", root=TEXT, block_size=BLOCK, validation=validation)
    held_out = None if data.validation is None else non_overlapping(data.validation)
    return dataclasses.replace(data, train=non_overlapping(data.train), test=non_overlapping(data.test),
                               validation=held_out)


def config(label: str, seed: int, budget: int, **extra) -> TrainConfig:
    fields = {**METHODS[label], **extra}
    return TrainConfig(dataset="tinyshakespeare", model="char_lstm", model_options=MODEL, batch_size=32,
                       epochs=None, budget_grad_evals=budget, schedule="step", max_grad_norm=CLIP, seed=seed,
                       **fields)


def pilot(budget: int) -> None:
    """SGD's lr and Entropy-SGD's outer lr on the validation split (seed 0)."""
    data = load(validation=0.1)
    for label, lrs in (("SGD", (0.1, 0.3, 1.0, 3.0)), ("Entropy-SGD", (0.3, 1.0, 3.0, 10.0))):
        for lr in lrs:
            c = config(label, 0, budget, lr=lr, validation=0.1)
            try:
                r = train(c, data=data, log=None)
                val = math.exp(r.epochs[-1]["val_loss"])
            except FloatingPointError:
                val = math.nan
            print(f"{label} lr {lr}: validation perplexity {val:.3f}", flush=True)


def factors(budget: int) -> None:
    """The SALR factor S_k / median(S_1..k) over training (seed 0), read from the harness's final checkpoint."""
    import tempfile

    data = load()
    for label in ("SGD-SALR", "Adam-SALR"):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "run.pt"
            r = train(config(label, 0, budget), data=data, checkpoint=path, log=None)
            state = torch.load(path, weights_only=True)["optimizer"]["param_groups"][0]["sharpness"]["salr"]
        f, s = state["factor_history"], state["sharpness_history"]
        quarters = [statistics.mean(f[i * len(f) // 4:(i + 1) * len(f) // 4]) for i in range(4)]
        print(f"{label}: test ppl {math.exp(r.summary['test_loss']):.3f}  factor min {min(f):.2f} "
              f"median {statistics.median(f):.2f} max {max(f):.2f}  mean by quarter "
              f"{' / '.join(f'{q:.2f}' for q in quarters)}  S-hat first {s[0]:.4f} last {s[-1]:.4f} "
              f"max {max(s):.4f}", flush=True)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = load_results(out, args.budget)
    done = {(r["method"], r["seed"]) for r in results["runs"]}
    data = load()
    for label in args.methods:
        for seed in args.seeds:
            if (label, seed) in done:
                continue
            c = config(label, seed, args.budget, measures=("salr",), measure_examples=256, measure_every=10_000)
            outcome = train_recorded(c, results, out, {"method": label, "seed": seed}, f"{label:18s} seed {seed}",
                                     data=data)
            if outcome is None:
                continue
            r, wall = outcome
            last, s = r.epochs[-1], r.summary
            row = {"method": label, "seed": seed, "test_loss": s["test_loss"], "test_ppl": math.exp(s["test_loss"]),
                   "test_acc": s["test_acc"], "train_loss": s["train_loss"], "s_hat": last["sharpness.salr"],
                   "grad_evals": s["grad_evals"], "steps": s["steps"], "train_time": s["wall_time"],
                   "wall_time": wall, "config": c.to_dict()}
            add_run(results, out, row)
            print(f"{label:18s} seed {seed}: test ppl {row['test_ppl']:.3f} (CE {s['test_loss']:.4f})  "
                  f"S-hat {row['s_hat']:.4f}  grad evals {s['grad_evals']}  steps {s['steps']}  {wall:.1f}s",
                  flush=True)
    print(table(results))


def table(results: dict) -> str:
    lines = [("| method | test perplexity | test CE (nats/char) | test acc (%) | S-hat (x1e-3) | grad evals | "
              "steps | train (s) | total (s) | seeds |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for label in METHODS:
        rows = [r for r in results["runs"] if r["method"] == label]
        diverged = sum("diverged" in r for r in rows)
        rows = [r for r in rows if "diverged" not in r]
        if diverged:
            lines.append(f"| {label} | diverged in {diverged} of {diverged + len(rows)} seeds |||||||||")
        if not rows:
            continue
        lines.append(f"| {label} | {mean_sd([r['test_ppl'] for r in rows], '.3f')} | "
                     f"{mean_sd([r['test_loss'] for r in rows], '.4f')} | "
                     f"{mean_sd([100 * r['test_acc'] for r in rows], '.2f')} | "
                     f"{mean_sd([1e3 * r['s_hat'] for r in rows], '.1f')} | "
                     f"{statistics.mean(r['grad_evals'] for r in rows):.0f} | "
                     f"{statistics.mean(r['steps'] for r in rows):.0f} | "
                     f"{mean_sd([r['train_time'] for r in rows], '.1f')} | "
                     f"{mean_sd([r['wall_time'] for r in rows], '.1f')} | {len(rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=1000, help="gradient evaluations per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=MAIN + GUARDED, choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--pilot", action="store_true", help="only choose the SGD / Entropy-SGD lr on validation")
    parser.add_argument("--factors", action="store_true", help="only print the SALR factor statistics (seed 0)")
    parser.add_argument("--table", action="store_true", help="only print the table of --out")
    parser.add_argument("--out", default="experiments/salr/lstm_results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
    elif args.pilot:
        pilot(args.budget)
    elif args.factors:
        factors(args.budget)
    else:
        run(args)


if __name__ == "__main__":
    main()
