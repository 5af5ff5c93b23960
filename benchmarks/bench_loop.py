"""What the harness's training loop costs per step beyond the optimizer: ``sharpness train`` against a bare loop.

Both sides train the same model (``digits``, an MLP of ``--depth`` layers of ``--width`` units, batch
``--batch-size``: a host-bound step, as a small model's step is on a GPU) with the same optimizer, on batches
served by the same resident set in the same seeded order:

* **harness**: ``sharpness.harness.train``'s epoch loop itself (``_Run.train_epoch``: budget check, learning-rate
  schedule, ``make_closure``, the step, the loss summed on the device and read once), without the per-epoch
  evaluation;
* **bare**: ``opt.step(closure)`` with a hand-written closure (``zero_grad``, forward, cross-entropy, backward).

After ``--warmup`` untimed epochs, each of ``--repeats`` rounds times one epoch of each side, the order alternating
between rounds; the garbage collector is off while timing. Reported per optimizer: the median microseconds per
step of both, their ratio, and the difference (the loop's own cost).

Usage::

    python benchmarks/bench_loop.py                                   # about 1 minute, 1 CPU thread
    python benchmarks/bench_loop.py --optimizers erm sam aesam --json benchmarks/results/loop-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any

import torch
from _shared import environment, paired_ratio, write_json_atomically
from torch import nn

from sharpness.data import load_dataset
from sharpness.harness import TrainConfig
from sharpness.harness.train import _Run, batches
from sharpness.models import create_model


def make_run(config: TrainConfig, data: Any) -> _Run:
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.num_classes, input_shape=data.input_shape,
                         **config.model_options)
    run = _Run(config, data, model, torch.device("cpu"))
    run.record = lambda train_loss: {"train_loss": train_loss}  # no evaluation of the test set per epoch
    return run


def harness_epoch(run: _Run) -> int:
    """``_Run.train_epoch`` itself, with its per-epoch record (the evaluation) left out; returns the steps taken."""
    before = run.optimizer.steps
    run.train_epoch()
    return run.optimizer.steps - before


def bare_epoch(run: _Run) -> int:
    opt, model = run.optimizer, run.model
    steps = 0
    for x, y in batches(run.train_set, run.config.batch_size, run.order):
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        steps += 1
    return steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=["erm", "sam"])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("digits", seed=0)
    results = {}
    print(f"digits, MLP depth {args.depth} width {args.width}, batch {args.batch_size}, {torch.get_num_threads()} "
          f"torch threads, {args.repeats} epochs each")
    print(f"{'optimizer':<12} {'harness us':>11} {'bare us':>9} {'ratio':>7} {'[q1, q3]':>16} {'extra us':>9}")
    for name in args.optimizers:
        # a schedule over far more steps than are timed, so the learning rate stays in a sane range
        config = TrainConfig(dataset="digits", model="mlp", model_options={"depth": args.depth, "width": args.width},
                             optimizer=name, lr=0.05, batch_size=args.batch_size, epochs=10_000, seed=0)
        sides = {"harness": (make_run(config, data), harness_epoch), "bare": (make_run(config, data), bare_epoch)}
        for _ in range(args.warmup):
            for run, epoch in sides.values():
                epoch(run)
        samples: dict[str, list[float]] = {side: [] for side in sides}
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for r in range(args.repeats):
                for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    run, epoch = sides[side]
                    start = time.perf_counter()
                    steps = epoch(run)
                    samples[side].append(1e6 * (time.perf_counter() - start) / steps)
        finally:
            if gc_was_enabled:
                gc.enable()
        harness, bare = statistics.median(samples["harness"]), statistics.median(samples["bare"])
        ratio = paired_ratio(samples["harness"], samples["bare"])  # median of the paired per-repeat ratios
        q1, q3 = ratio["q1"], ratio["q3"]
        results[name] = {"harness_us_per_step": harness, "bare_us_per_step": bare, "ratio": ratio["value"],
                         "ratio_of_medians": ratio["ratio_of_medians"], "paired_ratio_q1": q1,
                         "paired_ratio_q3": q3, "extra_us_per_step": harness - bare, "samples_us": samples}
        print(f"{name:<12} {harness:11.1f} {bare:9.1f} {ratio['value']:7.3f} {f'[{q1:.3f}, {q3:.3f}]':>16} "
              f"{harness - bare:9.1f}")
    payload = {"environment": environment(options=vars(args)), "results": results}
    if args.json:
        write_json_atomically(args.json, payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
