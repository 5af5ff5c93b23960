"""SAM's overhead beyond its two passes, as the model grows from ~0.1M to ~20M parameters.

For MLPs 784-w-w-10 (batch 128) of increasing width it times, interleaved and after warm-up (the protocol of
``bench_step.py``, whose runners and statistics it reuses), plain SGD (momentum 0.9), our SAM and
pytorch-optimizer's SAM, and reports per size

* ``SAM / (2 x SGD)`` measured (median over repeats, with the quartiles of the paired per-repeat ratios) and
  predicted from the steadier update-only medians (two SGD passes + our update);
* ``SAM / pytorch-optimizer SAM`` (measured and predicted);
* the update-only time of each optimizer, and its share of the SGD step.

A flat ``SAM / (2 x SGD)`` across sizes means the bookkeeping scales like the passes (no hidden per-parameter
cost). Writes a table, optionally JSON, and a log-x plot of the ratios.

Usage::

    python benchmarks/bench_scaling.py --json benchmarks/results/scaling_cpu.json \\
        --plot docs/figures/bench_scaling_cpu.png          # CPU, 1 thread, about 5 minutes
    python benchmarks/bench_scaling.py --device cuda --widths 128 512 1024 2048 4096
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from _shared import write_json_atomically
from bench_step import (
    CLOCKS,
    OURS,
    REFERENCE,
    THEIRS,
    ModelSpec,
    environment,
    headline_ratios,
    make_batches,
    method_specs,
    summarize,
    time_methods,
    warn_without_peer,
)
from torch import nn

DEFAULT_WIDTHS = (112, 400, 1100, 1900, 4100)  # about 0.1M, 0.5M, 2M, 5M and 20M parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS),
                        help="hidden widths w of the 784-w-w-10 MLPs (default: about 0.1M to 20M parameters)")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per method and size (default: 7)")
    parser.add_argument("--steps-per-repeat", type=int, default=3, help="optimizer steps per block (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed blocks per method first (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--compile", metavar="BACKEND",
                        help="time the steps with the model torch.compile'd by BACKEND (inductor, aot_eager, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write the ratio-vs-size plot (PNG) to PATH")
    parser.add_argument("--from-json", metavar="PATH", help="no timing: print and plot the results saved in PATH")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps_per_repeat < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--repeats and --steps-per-repeat must be >= 1, --warmup and --threads >= 0")
    if any(w < 1 for w in args.widths):
        parser.error("--widths must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


def mlp_spec(width: int) -> ModelSpec:
    def build() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))

    return ModelSpec(f"MLP 784-{width}-{width}-10", build, (784,), batch_size=128)


def bench_size(width: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    spec = mlp_spec(width)
    torch.manual_seed(args.seed)
    model = spec.build().to(device)
    batches = make_batches(spec, device, count=4, seed=args.seed)
    methods = [m for m in method_specs() if m.name in (REFERENCE, OURS, THEIRS)]
    steps, updates, _ = time_methods(methods, model, batches, args, device)
    summary = summarize(steps, updates)
    return {"width": width, "model": spec.name, "parameters": sum(p.numel() for p in model.parameters()),
            "methods": summary, "ratios": headline_ratios(steps, summary)}


def format_table(results: list[dict[str, Any]], clock: str) -> str:
    header = ("params", "SGD step ms", "SAM/(2xSGD)", "[q1, q3]", "predicted", "SAM/peer", "predicted",
              "SAM upd ms", "peer upd ms")
    rows = [header]
    for r in results:
        ratios, methods = r["ratios"][clock], r["methods"]
        vs_peer = ratios.get("sam_over_pytorch_optimizer_sam", {})
        predicted = ratios["predicted_from_update_only"]
        peer = methods.get(THEIRS, {}).get(clock, {})
        rows.append((
            f"{r['parameters'] / 1e6:.2f}M", f"{methods[REFERENCE][clock]['median_s'] * 1e3:.2f}",
            f"{ratios['sam_over_2x_sgd']['value']:.3f}",
            f"[{ratios['sam_over_2x_sgd']['q1']:.3f}, {ratios['sam_over_2x_sgd']['q3']:.3f}]",
            f"{predicted['sam_over_2x_sgd']:.3f}",
            f"{vs_peer['value']:.3f}" if vs_peer else "-",
            f"{predicted['sam_over_pytorch_optimizer_sam']:.3f}" if vs_peer else "-",
            f"{methods[OURS][clock]['update_only_median_s'] * 1e3:.2f}",
            f"{peer['update_only_median_s'] * 1e3:.2f}" if peer else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def plot(results: list[dict[str, Any]], clock: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["parameters"] for r in results]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ratio = [r["ratios"][clock]["sam_over_2x_sgd"] for r in results]
    ax.plot(sizes, [x["value"] for x in ratio], marker="o", label="our SAM / (2 x SGD), measured")
    ax.fill_between(sizes, [x["q1"] for x in ratio], [x["q3"] for x in ratio], alpha=0.2,
                    label="IQR of the paired per-repeat ratios")
    ax.plot(sizes, [r["ratios"][clock]["predicted_from_update_only"]["sam_over_2x_sgd"] for r in results],
            marker="s", linestyle="--", label="our SAM / (2 x SGD), predicted from update-only")
    if all("sam_over_pytorch_optimizer_sam" in r["ratios"][clock] for r in results):
        ax.plot(sizes, [r["ratios"][clock]["sam_over_pytorch_optimizer_sam"]["value"] for r in results],
                marker="^", label="our SAM / pytorch-optimizer SAM, measured")
    ax.axhline(1.03, color="gray", linestyle=":", label="target 1.03")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("time ratio")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.from_json:  # redrawn with the clocks of the device it was measured on, not this command's --device
        with open(args.from_json) as f:
            saved = json.load(f)
        return report(saved["results"], saved["environment"],
                      torch.device(saved["environment"].get("device", "cpu")), args)
    warn_without_peer()
    results = []
    for width in args.widths:
        results.append(bench_size(width, args, device))
        print(f"done: {results[-1]['model']} ({results[-1]['parameters']:,} parameters)", file=sys.stderr)
    env = environment(args, device)
    if args.json:
        write_json_atomically(args.json, {"environment": env, "results": results})
    return report(results, env, device, args)


def report(results: list[dict[str, Any]], env: dict[str, Any], device: torch.device, args: argparse.Namespace) -> int:
    clocks = ("wall",) if device.type == "cuda" else CLOCKS
    for clock in clocks:
        print(f"\n[{clock} clock]\n{format_table(results, clock)}")
    if args.plot:
        clock = "wall" if device.type == "cuda" else "cpu"
        plot(results, clock, args.plot, f"SAM overhead vs size ({env.get('device', args.device)}, {clock} clock)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
