"""Hessian measures, ours against PyHessian: time to the same accuracy, in one run.

For an MLP (784-128-128-10, ReLU, batch 256) and a small CNN (conv 1->16, pool, conv 16->32, pool, linear, on
1x28x28, batch 64), both float32 with random inputs and labels, it times

* the **top eigenvalue** at each tolerance of ``--tols``: our Lanczos (``hessian_eigenvalues``), our power
  iteration (``method="power"``) and PyHessian's power iteration (``hessian(...).eigenvalues(top_n=1, tol=...,
  maxIter=1000)``). The tolerances mean different things (our Lanczos: Ritz residual relative to the largest
  |Ritz value|; both power iterations: relative change between iterations), so each run's relative error against a
  reference (our Lanczos at tol 1e-10 on a float64 copy of the model) is recorded, and the **time to the
  same accuracy** per implementation is the smallest median time over the tolerances whose worst error over
  the repeats is at most each target of ``--targets``;
* the **trace** with the same number of Rademacher probes (``--trace-samples``): our ``hessian_trace`` and
  PyHessian's ``trace(maxIter=n, tol=-inf)`` (no early stop), with both estimates and standard errors.

Every call is timed whole, the Hessian-vector-product graph set-up included (PyHessian builds it in its
constructor, ours on the first product). All cases run once per repeat, in an order that rotates between
repeats and reverses on every other one, after ``--warmup`` untimed rounds; the garbage collector is off while timing. Repeat ``r`` seeds
our generator with ``seed + r`` and the global RNG (PyHessian's) with the same value. Reported: median and
IQR of the wall time (``perf_counter``) and the process CPU time, Hessian-vector products per call (ours from
``settings["matvecs"]``, PyHessian's counted by wrapping its ``hessian_vector_product``) and the errors.

Usage::

    python benchmarks/bench_hessian.py                                      # about 5 minutes, 1 CPU thread
    python benchmarks/bench_hessian.py --json benchmarks/results/hessian-cpu.json
    python benchmarks/bench_hessian.py --models mlp --repeats 9 --tols 1e-3 1e-4 1e-5
    python benchmarks/bench_hessian.py --device cuda --json benchmarks/results/hessian-cuda.json

On CUDA every call is bracketed by ``torch.cuda.synchronize`` and PyHessian runs with ``cuda=True``; its probes
then come from the CUDA generator, so the two trace estimates are no longer identical (only equal in
distribution).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from _shared import block_order, quartiles, write_json_atomically
from _shared import environment as shared_environment
from torch import Tensor, nn

from sharpness.measures import hessian as hessian_module
from sharpness.measures import hessian_eigenvalues, hessian_trace

try:
    import importlib

    # the module, not the class that pyhessian/__init__.py re-exports under the same name
    pyhessian = importlib.import_module("pyhessian.hessian")
except ImportError:  # its rows are skipped without it
    pyhessian = None

LOSS = nn.functional.cross_entropy
REFERENCE_TOL = 1e-10
POWER_MAX_ITER = 1000  # both power iterations (PyHessian's default is 100)


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every case first (default: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 0 keeps torch's default (default: 1)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--tols", nargs="+", type=float, default=[1e-2, 1e-3, 1e-4, 1e-5, 1e-6],
                        help="eigenvalue tolerances (default: 1e-2 1e-3 1e-4 1e-5 1e-6)")
    parser.add_argument("--targets", nargs="+", type=float, default=[1e-2, 1e-3, 1e-4],
                        help="relative-error targets for the time-to-accuracy summary (default: 1e-2 1e-3 1e-4)")
    parser.add_argument("--trace-samples", type=int, default=100, help="probes per trace (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.trace_samples < 2 or args.warmup < 0 or args.threads < 0:
        parser.error("--repeats must be >= 1, --trace-samples >= 2, --warmup and --threads >= 0")
    if any(not (0 < t < 1) for t in args.tols + args.targets):
        parser.error("--tols and --targets must be in (0, 1)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


# ---------------------------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    batch_size: int


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def build_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


MODELS = {
    "mlp": ModelSpec("MLP 784-128-128-10", build_mlp, batch_size=256),
    "cnn": ModelSpec("CNN conv16-conv32-linear, 1x28x28", build_cnn, batch_size=64),
}


def make_problem(spec: ModelSpec, seed: int, device: torch.device) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(seed)
    model = spec.build()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.batch_size, 1, 28, 28, generator=generator)
    y = torch.randint(10, (spec.batch_size,), generator=generator)
    return model.to(device), (x.to(device), y.to(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- the calls
@dataclass(frozen=True)
class Outcome:
    """One call: its estimate, standard error (trace) and Hessian-vector products."""

    value: float
    stderr: float | None
    hvps: int


@contextlib.contextmanager
def counting_pyhessian_hvps() -> Iterator[list[int]]:
    """Wraps ``pyhessian.hessian.hessian_vector_product`` (looked up at call time); yields ``[count]``."""
    original = pyhessian.hessian_vector_product
    count = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    pyhessian.hessian_vector_product = counted
    try:
        yield count
    finally:
        pyhessian.hessian_vector_product = original


def _release_grads(model: nn.Module) -> None:
    for p in model.parameters():  # PyHessian's constructor leaves create_graph gradients in .grad
        p.grad = None


def _pyhessian(model: nn.Module, data: tuple[Tensor, Tensor]) -> Any:
    _release_grads(model)  # else its backward(create_graph=True) accumulates onto an old gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its reference-cycle warning
        return pyhessian.hessian(model, LOSS, data=data, cuda=data[0].is_cuda)


def ours_eigenvalue(method: str, tol: float) -> Callable[[nn.Module, Any, int], Outcome]:
    def call(model: nn.Module, data: Any, seed: int) -> Outcome:
        result = hessian_eigenvalues(model, LOSS, data, method=method, tol=tol, seed=seed,
                                     max_iter=POWER_MAX_ITER if method == "power" else None)
        return Outcome(result.value, None, result.settings["matvecs"])

    return call


def pyhessian_eigenvalue(tol: float) -> Callable[[nn.Module, Any, int], Outcome]:
    def call(model: nn.Module, data: Any, seed: int) -> Outcome:
        torch.manual_seed(seed)
        with counting_pyhessian_hvps() as count:
            values, _ = _pyhessian(model, data).eigenvalues(top_n=1, tol=tol, maxIter=POWER_MAX_ITER)
        _release_grads(model)
        return Outcome(values[0], None, count[0])

    return call


def ours_trace(samples: int) -> Callable[[nn.Module, Any, int], Outcome]:
    def call(model: nn.Module, data: Any, seed: int) -> Outcome:
        result = hessian_trace(model, LOSS, data, samples=samples, seed=seed)
        return Outcome(result.value, result.stderr, result.settings["matvecs"])

    return call


def pyhessian_trace(samples: int) -> Callable[[nn.Module, Any, int], Outcome]:
    def call(model: nn.Module, data: Any, seed: int) -> Outcome:
        torch.manual_seed(seed)
        with counting_pyhessian_hvps() as count:
            values = _pyhessian(model, data).trace(maxIter=samples, tol=-math.inf)  # -inf: never stops early
        _release_grads(model)
        mean = statistics.fmean(values)
        return Outcome(mean, statistics.stdev(values) / math.sqrt(len(values)), count[0])

    return call


@dataclass(frozen=True)
class Case:
    task: str  # "top eigenvalue" or "trace"
    implementation: str
    setting: str
    tol: float | None
    call: Callable[[nn.Module, Any, int], Outcome]


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    for tol in args.tols:
        out.append(Case("top eigenvalue", "ours lanczos", f"tol={tol:g}", tol, ours_eigenvalue("lanczos", tol)))
        out.append(Case("top eigenvalue", "ours power", f"tol={tol:g}", tol, ours_eigenvalue("power", tol)))
        if pyhessian is not None:
            out.append(Case("top eigenvalue", "pyhessian power", f"tol={tol:g}", tol, pyhessian_eigenvalue(tol)))
    n = args.trace_samples
    out.append(Case("trace", "ours hutchinson", f"samples={n}", None, ours_trace(n)))
    if pyhessian is not None:
        out.append(Case("trace", "pyhessian hutchinson", f"samples={n}", None, pyhessian_trace(n)))
    return out


# ---------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float
    outcome: Outcome


def timed(case: Case, model: nn.Module, data: Any, seed: int) -> Sample:
    device = data[0].device
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = case.call(model, data, seed)
    synchronize(device)
    return Sample(time.perf_counter() - wall, time.process_time() - cpu, outcome)


def run_interleaved(all_cases: list[Case], model: nn.Module, data: Any,
                    args: argparse.Namespace) -> dict[int, list[Sample]]:
    samples: dict[int, list[Sample]] = {i: [] for i in range(len(all_cases))}
    for _ in range(args.warmup):
        for case in all_cases:
            case.call(model, data, args.seed)
    gc.collect()
    gc.disable()
    try:
        for repeat in range(args.repeats):
            for i in block_order(len(all_cases), repeat):
                samples[i].append(timed(all_cases[i], model, data, args.seed + repeat))
    finally:
        gc.enable()
    return samples


# ---------------------------------------------------------------------------------------------- statistics
def summarize_case(case: Case, samples: list[Sample], reference: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"task": case.task, "implementation": case.implementation, "setting": case.setting,
                           "tol": case.tol}
    for clock in ("wall", "cpu"):
        q1, median, q3 = quartiles([getattr(s, clock) for s in samples])
        row[clock] = {"median_s": median, "q1_s": q1, "q3_s": q3, "per_call_s": [getattr(s, clock) for s in samples]}
    row["hvps"] = [s.outcome.hvps for s in samples]
    row["median_hvps"] = statistics.median(row["hvps"])
    row["values"] = [s.outcome.value for s in samples]
    row["stderrs"] = [s.outcome.stderr for s in samples]
    if reference is not None:
        errors = [abs(v - reference) / abs(reference) for v in row["values"]]
        row["rel_errors"] = errors
        row["median_rel_error"] = statistics.median(errors)
        row["max_rel_error"] = max(errors)
    return row


def time_to_accuracy(rows: list[dict[str, Any]], targets: list[float], clock: str) -> list[dict[str, Any]]:
    """Per implementation and target: the cheapest tolerance (median time on ``clock``) whose worst relative
    error over the repeats meets the target; and our Lanczos's time over PyHessian's."""
    out = []
    implementations = sorted({r["implementation"] for r in rows if r["task"] == "top eigenvalue"})
    for target in targets:
        entry: dict[str, Any] = {"target": target, "clock": clock}
        for impl in implementations:
            ok = [r for r in rows if r["task"] == "top eigenvalue" and r["implementation"] == impl
                  and r["max_rel_error"] <= target]
            best = min(ok, key=lambda r: r[clock]["median_s"]) if ok else None
            entry[impl] = None if best is None else {
                "setting": best["setting"], "median_s": best[clock]["median_s"], "median_hvps": best["median_hvps"],
                "max_rel_error": best["max_rel_error"]}
        ours, theirs = entry.get("ours lanczos"), entry.get("pyhessian power")
        entry["ours_lanczos_over_pyhessian"] = (ours["median_s"] / theirs["median_s"]
                                                if ours and theirs else None)
        out.append(entry)
    return out


def reference_eigenvalue(model: nn.Module, data: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """The top eigenvalue of a float64 copy by our Lanczos at tol 1e-10 (the accuracy yardstick)."""
    double = copy.deepcopy(model).double()
    x, y = data
    result = hessian_eigenvalues(double, LOSS, (x.double(), y), tol=REFERENCE_TOL, max_iter=300)
    return {"value": result.value, "converged": result.converged, "iterations": result.iterations,
            "residual": result.settings["residuals"][0]}


def bench_model(key: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = MODELS[key]
    model, data = make_problem(spec, args.seed, torch.device(args.device))
    reference = reference_eigenvalue(model, data)
    all_cases = cases(args)
    print(f"{spec.name}: {sum(p.numel() for p in model.parameters()):,} parameters, timing {len(all_cases)} cases "
          f"x {args.repeats} repeats ...", flush=True)
    samples = run_interleaved(all_cases, model, data, args)
    rows = [summarize_case(case, samples[i], reference["value"] if case.task == "top eigenvalue" else None)
            for i, case in enumerate(all_cases)]
    traces = {r["implementation"]: r for r in rows if r["task"] == "trace"}
    trace_agreement = None
    if "pyhessian hutchinson" in traces:
        ours, theirs = traces["ours hutchinson"], traces["pyhessian hutchinson"]
        trace_agreement = [abs(a - b) / math.hypot(sa, sb) for a, b, sa, sb in
                           zip(ours["values"], theirs["values"], ours["stderrs"], theirs["stderrs"])]
    return {"model": spec.name, "key": key, "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": spec.batch_size, "reference_top_eigenvalue": reference, "cases": rows,
            "time_to_accuracy": {clock: time_to_accuracy(rows, args.targets, clock) for clock in ("wall", "cpu")},
            "trace_difference_in_combined_stderrs": trace_agreement}


# ---------------------------------------------------------------------------------------------- environment
def environment(args: argparse.Namespace) -> dict[str, Any]:
    return shared_environment(
        packages=["pyhessian"],
        extra={"load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        git_untracked=True,
        hashed_files={"sharpness/measures/hessian.py": hessian_module.__file__,
                      "benchmarks/bench_hessian.py": os.path.abspath(__file__)},
        options={"repeats": args.repeats, "warmup_rounds": args.warmup, "tols": args.tols,
                 "targets": args.targets, "trace_samples": args.trace_samples, "seed": args.seed,
                 "device": args.device,
                 "power_max_iter": POWER_MAX_ITER, "reference_tol": REFERENCE_TOL},
    )


# ---------------------------------------------------------------------------------------------- output
def format_table(result: dict[str, Any], device: str = "cpu") -> str:
    """The result as a table; the time to accuracy on the CPU clock, or on the wall clock on CUDA (the host's
    process time leaves out the GPU's work whenever the host blocks in a synchronisation instead of spinning)."""
    clock = "wall" if device.startswith("cuda") else "cpu"
    ref = result["reference_top_eigenvalue"]
    title = (f"\n{result['model']} ({result['parameters']:,} parameters, batch {result['batch_size']}); "
             f"reference top eigenvalue {ref['value']:.8g} (float64 Lanczos, tol {REFERENCE_TOL:g})")
    lines = [title]
    header = ["task", "implementation", "setting", "wall ms", "IQR ms", "cpu ms", "HVPs", "value", "rel err (med/max)"]
    rows = []
    for r in result["cases"]:
        if r["task"] == "trace":
            value = f"{statistics.median(r['values']):.5g} +- {statistics.median(r['stderrs']):.2g}"
            error = ""
        else:
            value = f"{statistics.median(r['values']):.8g}"
            error = f"{r['median_rel_error']:.1e} / {r['max_rel_error']:.1e}"
        wall = r["wall"]
        rows.append([r["task"], r["implementation"], r["setting"], f"{wall['median_s'] * 1e3:.1f}",
                     f"{(wall['q3_s'] - wall['q1_s']) * 1e3:.1f}", f"{r['cpu']['median_s'] * 1e3:.1f}",
                     f"{r['median_hvps']:g}", value, error])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*row) for row in rows]
    lines.append("time to the same accuracy (cheapest tolerance whose worst relative error meets the target; "
                 f"{clock} clock):")
    for entry in result["time_to_accuracy"][clock]:
        parts = []
        for impl in ("ours lanczos", "ours power", "pyhessian power"):
            if impl in entry:
                best = entry[impl]
                parts.append(f"{impl}: " + ("not reached" if best is None else
                                            f"{best['median_s'] * 1e3:.1f} ms ({best['setting']}, "
                                            f"{best['median_hvps']:g} HVPs)"))
        ratio = entry["ours_lanczos_over_pyhessian"]
        suffix = f"; ours lanczos / pyhessian = {ratio:.2f}" if ratio is not None else ""
        lines.append(f"  <= {entry['target']:g}: " + "; ".join(parts) + suffix)
    agreement = result["trace_difference_in_combined_stderrs"]
    if agreement is not None:
        lines.append("trace: |ours - pyhessian| / sqrt(se_ours^2 + se_pyhessian^2) per repeat: "
                     + ", ".join(f"{a:.2f}" for a in agreement))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if pyhessian is None:
        print("pyhessian is not installed: only our rows are timed", file=sys.stderr)
    env = environment(args)
    results = []
    for key in args.models:
        results.append(bench_model(key, args))
        print(format_table(results[-1], args.device), flush=True)
    if args.json:
        write_json_atomically(args.json, {"environment": env, "results": results})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
