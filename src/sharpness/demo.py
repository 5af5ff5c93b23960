"""The embedded default job: a small 1-D CNN on MNIST-1D, trained with a sharpness-aware optimizer.

Run it with ``python -m sharpness`` (or the ``sharpness-demo`` script)::

    python -m sharpness                          # AE-SAM with the defaults below
    python -m sharpness --optimizer sam --epochs 5
    python -m sharpness --optimizer sgd          # the plain base optimizer, for comparison

The data set is generated offline by the ``mnist1d`` package (4000 training and 1000 test signals of
length 40; nothing is downloaded or written to disk). The base optimizer is SGD with momentum 0.9 and
weight decay, on a cosine learning-rate schedule stepped once per optimizer step. Everything is seeded:
the same arguments (and thread count) give the same numbers.
"""

from __future__ import annotations

import argparse
import inspect
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from .registry import create, get_optimizer_info, list_optimizers

__all__ = ["DemoResult", "build_model", "load_mnist1d", "main", "run"]

PLAIN_SGD = "sgd"


@dataclass(frozen=True)
class DemoResult:
    """The summary of one run (the numbers of the last printed line), as returned by :func:`run`.

    ``steps``, ``sam_steps`` and ``grad_evals`` are the wrapper's own counters (for plain SGD: the
    training loop's); ``closure_calls`` is counted independently by the loop. ``train_time`` excludes
    ``data_time``, the generation of the data set.
    """

    name: str
    test_accuracy: float
    sam_fraction: float
    sam_steps: int
    steps: int
    grad_evals: int
    closure_calls: int
    data_time: float = field(compare=False)
    train_time: float = field(compare=False)
    optimizer: torch.optim.Optimizer = field(repr=False, compare=False)


def optimizer_names() -> list[str]:
    """The names ``--optimizer`` accepts: every registered optimizer plus plain ``"sgd"``."""
    return [info.name for info in list_optimizers()] + [PLAIN_SGD]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv=None`` reads ``sys.argv``)."""
    parser = argparse.ArgumentParser(
        prog="python -m sharpness",
        description="Train a small 1-D CNN on MNIST-1D with a sharpness-aware optimizer.",
    )
    parser.add_argument("--optimizer", default="aesam", choices=optimizer_names(),
                        help="wrapper around SGD (default: %(default)s); 'sgd' trains with the base alone")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the 4000 training signals (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (default: %(default)s)")
    parser.add_argument("--rho", type=float, default=None,
                        help="perturbation radius (default: the optimizer's own default, 0.05 for SAM)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: %(default)s; more only slows a model this small)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    return args


@lru_cache(maxsize=1)
def load_mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate MNIST-1D in memory: ``(x_train, y_train, x_test, y_test)``, 4000 / 1000 signals of length 40.

    ``mnist1d.data.make_dataset`` only computes (the package's ``get_dataset`` is the one that downloads and
    pickles); it reseeds Python's and NumPy's global generators, which are restored afterwards. The result
    is cached for the process (a few seconds to generate); treat the tensors as read-only.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)

    return (*as_tensors(data["x"], data["y"]), *as_tensors(data["x_test"], data["y_test"]))


def build_model(channels: int = 32, length: int = 40, classes: int = 10) -> nn.Module:
    """A small 1-D CNN: three strided convolutions (length 40 -> 20 -> 10 -> 5) and a linear classifier."""
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=2), nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * length // 8, classes),
    )


def build_optimizer(name: str, model: nn.Module, args: argparse.Namespace,
                    total_steps: int) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, weight decay 5e-4), wrapped by the registered optimizer ``name`` unless ``"sgd"``."""
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if name == PLAIN_SGD:
        return base
    info = get_optimizer_info(name)
    options = inspect.signature(info.cls).parameters
    kwargs = {} if args.rho is None else {"rho": args.rho}
    if "total_steps" in options:
        kwargs["total_steps"] = total_steps
    if "seed" in options:
        kwargs["seed"] = args.seed
    return create(name, base, **kwargs)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    model.eval()
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train()
    return correct / len(y)


def counters(optimizer: torch.optim.Optimizer, steps: int, closure_calls: int) -> tuple[int, int, int]:
    """``(steps, sam_steps, grad_evals)``: the wrapper's own counters, or the loop's for plain SGD."""
    if hasattr(optimizer, "sam_steps"):
        return optimizer.steps, optimizer.sam_steps, optimizer.grad_evals
    return steps, 0, closure_calls


def train(args: argparse.Namespace) -> DemoResult:
    """Train and evaluate once, printing one line per epoch; returns the summary."""
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_mnist1d()
    data_time = time.perf_counter() - start
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    order = torch.Generator().manual_seed(args.seed)
    model = build_model()
    batches_per_epoch = -(-len(y_train) // args.batch_size)
    total_steps = args.epochs * batches_per_epoch
    optimizer = build_optimizer(args.optimizer, model, args, total_steps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    loss_fn = nn.CrossEntropyLoss()
    steps = closure_calls = 0

    for epoch in range(1, args.epochs + 1):
        loss_sum = 0.0
        for index in torch.randperm(len(y_train), generator=order).split(args.batch_size):
            xb, yb = x_train[index], y_train[index]

            def closure() -> Tensor:
                nonlocal closure_calls
                closure_calls += 1
                optimizer.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            loss_sum += optimizer.step(closure).item() * len(yb)
            scheduler.step()
            steps += 1
        n_steps, sam_steps, grad_evals = counters(optimizer, steps, closure_calls)
        print(f"epoch {epoch:3d}/{args.epochs}  loss {loss_sum / len(y_train):.4f}  "
              f"train acc {accuracy(model, x_train, y_train):6.2%}  test acc {accuracy(model, x_test, y_test):6.2%}  "
              f"%SAM {100 * sam_steps / max(n_steps, 1):5.1f}  grad evals {grad_evals:5d}  "
              f"time {time.perf_counter() - start:5.1f}s", flush=True)

    n_steps, sam_steps, grad_evals = counters(optimizer, steps, closure_calls)
    return DemoResult(
        name=args.optimizer,
        test_accuracy=accuracy(model, x_test, y_test),
        sam_fraction=sam_steps / n_steps if n_steps else 0.0,
        sam_steps=sam_steps,
        steps=n_steps,
        grad_evals=grad_evals,
        closure_calls=closure_calls,
        data_time=data_time,
        train_time=time.perf_counter() - start,
        optimizer=optimizer,
    )


def format_summary(result: DemoResult) -> str:
    """The final summary line."""
    return (f"{result.name}: test accuracy {result.test_accuracy:.2%}  %SAM {100 * result.sam_fraction:.1f}  "
            f"gradient evaluations {result.grad_evals}  steps {result.steps}  "
            f"wall time {result.train_time:.1f}s (+ {result.data_time:.1f}s data)")


def run(argv: Sequence[str] | None = None) -> DemoResult:
    """Parse ``argv``, train, print the per-epoch lines and the summary, and return the summary.

    Torch's global random state and thread count are restored on return, so calling this from Python
    (e.g. a test) leaves the caller's settings alone.
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            result = train(args)
    finally:
        torch.set_num_threads(threads)
    print(format_summary(result), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m sharpness``, ``sharpness-demo``): :func:`run`, exit status 0."""
    run(argv)
    return 0
