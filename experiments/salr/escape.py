"""GD vs GD-SALR on a 1-D landscape with a narrow deep well on the path to a wide basin (docs/salr.md).

f(t) = 0.5 a (t - 4)^2 - h exp(-t^2 / (2 s^2)): a wide basin at t = 4 and a sharp well at t ~ 0 (curvature
about h / s^2). Both runs use the same lr_0, below 2 / curvature of the well, so GD is trapped there.
Run: python experiments/salr/escape.py [--out PNG] [--no-plot]  (writes docs/figures/salr_escape.png by default,
prints the outcomes)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import sharpness

A, H, S = 0.05, 0.5, 0.1  # wide basin curvature, well depth, well width (well curvature ~ 50)


def f(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * A * (t - 4) ** 2 - H * torch.exp(-t ** 2 / (2 * S ** 2))


def run(t0: float, lr: float, steps: int, salr: bool, **kwargs):
    param = nn.Parameter(torch.tensor([t0], dtype=torch.float64))
    base = torch.optim.SGD([param], lr=lr)
    opt = sharpness.SALR(base, **kwargs) if salr else base
    path = []

    def closure():
        opt.zero_grad()
        loss = f(param).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        path.append(float(param))
        opt.step(closure)
    path.append(float(param))
    return path, opt


FIGURE = Path(__file__).resolve().parents[2] / "docs" / "figures" / "salr_escape.png"


def main(plot: bool = True, out: Path = FIGURE) -> dict:
    lr, steps = 0.03, 600
    results = {}
    cases = (("start left of the well", -1.0, 0.02), ("start inside the well", 0.02, 0.02),
             ("walk wider than the well", -0.6, 0.05))
    for name, t0, gamma in cases:
        options = {"gamma": gamma, "n_descent": 5, "n_ascent": 5, "every": 1}
        gd, _ = run(t0, lr, steps, False)
        sal, opt = run(t0, lr, steps, True, **options)
        results[name] = {"gd_final": gd[-1], "salr_final": sal[-1], "salr": opt, "gd": gd, "path": sal}
        print(f"{name:26s} gamma {gamma}: GD ends at t = {gd[-1]:+.3f}   GD-SALR ends at t = {sal[-1]:+.3f}   "
              f"max factor {max(opt.factor_history):.2f}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        r = results["start left of the well"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        grid = torch.linspace(-2, 6, 800, dtype=torch.float64)
        axes[0].plot(grid, f(grid), color="0.3")
        axes[0].plot(r["gd"], [float(f(torch.tensor(t))) for t in r["gd"]], "o", ms=2, label="GD")
        axes[0].plot(r["path"], [float(f(torch.tensor(t))) for t in r["path"]], "x", ms=3, label="GD-SALR")
        axes[0].set(xlabel="t", ylabel="f(t)", title="iterates (same lr_0 = 0.03)")
        axes[0].legend()
        axes[1].plot(r["path"], label="GD-SALR t")
        axes[1].plot(r["gd"], label="GD t")
        axes[1].set(xlabel="step", title="position")
        axes[1].legend()
        opt = r["salr"]
        axes[2].semilogy(opt.lr_history, label="lr_k")
        axes[2].semilogy(opt.sharpness_history, label="S_hat_k")
        axes[2].set(xlabel="step", title="GD-SALR: lr and S_hat")
        axes[2].legend()
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURE, help=f"figure path (default: {FIGURE})")
    parser.add_argument("--no-plot", action="store_true", help="print the outcomes only")
    args = parser.parse_args()
    main(plot=not args.no_plot, out=args.out)
    print("curvature of the well ~", H / S ** 2 + A, " 2/curvature ~", round(2 / (H / S ** 2 + A), 4), file=sys.stderr)
