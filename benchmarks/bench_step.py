"""Step time and memory of the sharpness-aware optimizers, against plain SGD and pytorch-optimizer's versions.

For an MLP (784-512-512-10, batch 128) and a small CNN (two conv layers + linear on 1x28x28, batch 64) it
times one full training step (closure: zero_grad, forward, backward; plus the update); ``--models tiny deep``
adds two host-bound models (an MLP 64-32-32-10 and a 24-block residual MLP with 100 tensors, batch 16), whose
kernels take microseconds, so that their steps cost what a GPU step of a small model costs: dispatch and Python.
The methods timed are

* plain SGD (momentum 0.9), the reference;
* our SAM and pytorch-optimizer's SAM (both wrapping the same SGD);
* every other optimizer of the package: ASAM, LookSAM (k=5), SSSAM (p=0.5), AESAM, AELookSAM, GSAM, ESAM,
  SSAM-F (three Fisher modes), SmoothOut, GNR, Trace/Frob/Det-SAM, SALR and Entropy-SGD;
* pytorch-optimizer's ASAM (its SAM with ``adaptive=True``), LookSAM and GSAM, each at our method's settings and
  driven as its documentation says (see :func:`peer_specs`), for a per-method "ours / peer" ratio.

Methods are interleaved: every repeat runs one block of ``--steps-per-repeat`` steps of each method (the order
rotates between repeats and is reversed on every other one), so slow drifts of the machine hit all methods alike
and no method always follows the same one. Warm-up blocks are not timed.
Two clocks are read around each block: wall time (``perf_counter``, with ``torch.cuda.synchronize`` on CUDA)
and, on CPU, process CPU time (``process_time``), which does not count the time the process waits while other
jobs hold the cores. Reported per method and clock:

* median and interquartile range over the repeats of the time per step;
* gradient passes per step (the optimizer's ``grad_evals / steps`` counter where it has one; for SGD and the
  peers, the closure calls per step) and the normalized cost ``time per step / (passes per step x SGD step)``
  (1.0 = no cost beyond the passes themselves), the median over repeats of the paired ratios to that repeat's
  SGD block. The counter equals the closure calls for the whole SAM family; two methods count otherwise:
  GNR's exact mode counts each Hessian-vector product (a double backward, about 1.4 passes) as a pass, and
  SALR leaves out its forward-only endpoint losses (``loss_evals``), so their normalized cost also carries
  those differences;
* the median time of the update alone (``first_step(); second_step()`` or ``step()`` on fixed gradients,
  timed the same way with fresh copies), which isolates the optimizer's own bookkeeping. The weights and the
  gradients are put back before every update, outside the timed region (the rules may overwrite the gradients,
  and with no second pass in between, ASAM's ``T^2 g`` compounded over repeated updates reached non-finite
  weights on the deep model); each update is timed on its own;
* the optimizer state beyond the base SGD's (tensor bytes, between steps and the largest seen at a closure
  call), and the allocator's peak: on CUDA ``torch.cuda.max_memory_allocated`` over a short training run, on
  CPU a step's peak above its start (``sharpness._ops.cpu_peak_bytes``: passes and temporaries included,
  so SGD's row is its gradients and activations and any row above it is what the method holds beyond);
* kernels and scalar reads per step outside the closure (untimed, counted at the dispatcher on the code path
  a GPU runs, the base update included; views are not kernels): on a GPU each kernel costs the host a launch,
  so this is what a host-bound GPU step pays beyond its passes. torch.optim.SGD runs its per-tensor loop on
  the CPU (3 kernels per tensor here) and a fused foreach path on CUDA.

Headline ratios: our SAM / (2 x SGD) (target <= 1.03) and our SAM / pytorch-optimizer SAM (target <= 0.95),
with the quartiles of the per-repeat paired ratios; the same "ours / peer" step ratio (and update-only ratio)
for every method with a peer.

Usage::

    python benchmarks/bench_step.py                              # CPU, 1 thread, defaults (about 4 minutes)
    python benchmarks/bench_step.py --device cuda --json benchmarks/results/cuda.json
    python benchmarks/bench_step.py --repeats 30 --steps-per-repeat 20 --threads 4
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from _shared import block_order, paired_ratio, quartiles, write_json_atomically
from _shared import environment as shared_environment
from torch import Tensor, nn

import sharpness
from sharpness._ops import OpCounter, cpu_peak_bytes, device_read_path

try:
    import pytorch_optimizer
except ImportError:  # the comparison row is skipped without it
    pytorch_optimizer = None

SGD_OPTIONS = {"lr": 0.01, "momentum": 0.9}
SAM_TARGET = 1.03  # our SAM / (2 x SGD)
VS_PYTORCH_OPTIMIZER_TARGET = 0.95  # our SAM / pytorch-optimizer SAM
REFERENCE = "SGD"
OURS = "SAM"
THEIRS = "SAM (pytorch-optimizer)"


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per method (default: 15)")
    parser.add_argument("--steps-per-repeat", type=int, default=10,
                        help="optimizer steps per timed block (default: 10, a multiple of LookSAM's k=5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks per method first (default: 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 0 keeps torch's default "
                             "(default: 1, the steadiest timings on a shared machine)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"],
                        help="models to run (default: mlp cnn; tiny and deep are host-bound, the regime of a "
                             "GPU step, on any device)")
    parser.add_argument("--methods", nargs="+", metavar="NAME",
                        help="only these methods (names as in the table; SGD, SAM and the peer library's version "
                             "of each chosen method always run); default: all")
    parser.add_argument("--compile", metavar="BACKEND",
                        help="time every method's steps with the model torch.compile'd by BACKEND (inductor, "
                             "aot_eager, ...); memory, kernel counts and update-only times stay eager")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    for name in ("repeats", "steps_per_repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.threads < 0:
        parser.error("--warmup and --threads must be >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


# ---------------------------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int
    num_classes: int = 10


def build_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def build_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    )


def build_tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def build_deep() -> nn.Module:
    """24 residual blocks of LayerNorm + Linear 32x32 (100 tensors): the per-tensor cost of a deep network."""
    return nn.Sequential(nn.Linear(64, 32), *(Residual(32) for _ in range(24)), nn.Linear(32, 10))


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.relu(self.linear(self.norm(x)))


MODELS = {
    "mlp": ModelSpec("MLP 784-512-512-10", build_mlp, (784,), batch_size=128),
    "cnn": ModelSpec("CNN 2xconv+linear, 1x28x28", build_cnn, (1, 28, 28), batch_size=64),
    # Host-bound: each kernel takes microseconds, so the step is dispatch and Python, as a GPU step of a model
    # this size is (the host issues kernels more slowly than the GPU runs them): the GPU regime, on a CPU.
    "tiny": ModelSpec("host-bound MLP 64-32-32-10", build_tiny, (64,), batch_size=16),
    "deep": ModelSpec("host-bound residual MLP, 24 blocks (100 tensors)", build_deep, (64,), batch_size=16),
}


def make_batches(spec: ModelSpec, device: torch.device, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """A small pool of random batches, on the device up front (no data loading in the timed region).

    Cycling through several batches keeps ||g||^2 varying from step to step, as the adaptive policies expect.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(spec.batch_size, *spec.input_shape, generator=generator)
        y = torch.randint(spec.num_classes, (spec.batch_size,), generator=generator)
        batches.append((x.to(device), y.to(device)))
    return batches


# ---------------------------------------------------------------------------------------------- methods
Closure = Callable[[], Tensor]


def plain_step(optimizer: torch.optim.Optimizer, closure: Closure) -> None:
    closure()
    optimizer.step()


def closure_step(optimizer: torch.optim.Optimizer, closure: Closure) -> None:
    optimizer.step(closure)  # ours: calls the closure once or twice


def pytorch_optimizer_step(optimizer: torch.optim.Optimizer, closure: Closure) -> None:
    closure()  # its protocol: first pass by the caller, the perturbed pass inside step()
    optimizer.step(closure)


def plain_update(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()


def two_phase_update(optimizer: Any) -> None:
    """The optimizer's own work without the passes (both libraries have first_step/second_step)."""
    optimizer.first_step()
    optimizer.second_step()


def pytorch_optimizer_gsam_step(optimizer: Any, closure: Closure) -> None:
    """pytorch-optimizer's GSAM runs both passes inside its ``no_grad`` ``step``, through a closure that returns
    ``(outputs, loss)`` and enables gradients itself (as the one its ``set_closure`` builds does)."""
    def outputs_and_loss() -> tuple[None, Tensor]:
        with torch.enable_grad():
            return None, closure()

    optimizer.step(outputs_and_loss)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Callable[[nn.Module, int], torch.optim.Optimizer]  # (model, total_steps) -> optimizer
    step: Callable[[torch.optim.Optimizer, Closure], None] = closure_step
    update: Callable[[Any], None] | None = two_phase_update  # None: no update-only timing (no two-phase API)
    peer_of: str | None = None  # a peer library's implementation of this method of ours (same model, same base)


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, **SGD_OPTIONS)


def _peer_gsam(model: nn.Module) -> torch.optim.Optimizer:
    """pytorch-optimizer's GSAM at our GSAM's settings: rho 0.05 at every step (a constant schedule), alpha 0.1."""
    base = _sgd(model.parameters())
    constant = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
    rho = pytorch_optimizer.ProportionScheduler(constant, max_lr=SGD_OPTIONS["lr"], min_lr=0.0, max_value=0.05,
                                                min_value=0.05)
    return pytorch_optimizer.GSAM(model.parameters(), base, model, rho, alpha=0.1)


def peer_specs() -> list[MethodSpec]:
    """pytorch-optimizer's implementations of our methods, each driven the way its documentation says.

    * SAM, and ASAM as its ``adaptive=True`` (``T = |w|``, where ours has ``|w| + eta``): ``closure()``, then
      ``step(closure)``, 2 passes.
    * LookSAM: the same protocol, so 2 passes on *every* step (on the k-1 reuse steps its ``first_step`` only
      zeroes the gradients and the closure recomputes them at the same weights); ours takes ``1 + 1/k``.
    * GSAM: ``step(closure)`` with a closure that returns ``(outputs, loss)``, 2 passes.
    """
    if pytorch_optimizer is None:
        return []
    sgd = SGD_OPTIONS
    return [
        MethodSpec(THEIRS, lambda m, t: pytorch_optimizer.SAM(m.parameters(), torch.optim.SGD, rho=0.05, **sgd),
                   pytorch_optimizer_step, peer_of=OURS),
        MethodSpec("ASAM (pytorch-optimizer)",
                   lambda m, t: pytorch_optimizer.SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, **sgd),
                   pytorch_optimizer_step, peer_of="ASAM"),
        MethodSpec("LookSAM k=5 (pytorch-optimizer)",
                   lambda m, t: pytorch_optimizer.LookSAM(m.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7,
                                                          **sgd),
                   pytorch_optimizer_step, peer_of="LookSAM k=5"),
        MethodSpec("GSAM (pytorch-optimizer)", lambda m, t: _peer_gsam(m), pytorch_optimizer_gsam_step, update=None,
                   peer_of="GSAM"),
    ]


def method_specs() -> list[MethodSpec]:
    """SGD, our methods, and after each of ours the peer library's implementation of it (:func:`peer_specs`)."""
    ours = [
        MethodSpec(REFERENCE, lambda m, t: _sgd(m.parameters()), plain_step, plain_update),
        MethodSpec(OURS, lambda m, t: sharpness.SAM(_sgd(m.parameters()), rho=0.05)),
    ]
    simple = {
        "ASAM": lambda p, t: sharpness.ASAM(_sgd(p), rho=0.5),
        "LookSAM k=5": lambda p, t: sharpness.LookSAM(_sgd(p), rho=0.05, k=5, alpha=0.7),
        "SSSAM p=0.5": lambda p, t: sharpness.SSSAM(_sgd(p), p=0.5),
        "AESAM": lambda p, t: sharpness.AESAM(_sgd(p), total_steps=t),
        "AELookSAM": lambda p, t: sharpness.AELookSAM(_sgd(p), total_steps=t),
        "GSAM": lambda p, t: sharpness.GSAM(_sgd(p), rho=0.05, alpha=0.1),
    }
    single_phase = {  # no first_step/second_step pair: no update-only timing
        "ESAM b=0.6 g=0.5": lambda p, t: sharpness.ESAM(_sgd(p), rho=0.05),
        "SSAMF s=0.5": lambda p, t: sharpness.SSAMF(_sgd(p), update_freq=10),
        "SSAMF s=0.5 sketch K=16": lambda p, t: sharpness.SSAMF(_sgd(p), update_freq=10, fisher="sketch"),
        "SSAMF s=0.5 vmap": lambda p, t: sharpness.SSAMF(_sgd(p), update_freq=10, fisher="vmap"),
        "SmoothOut": lambda p, t: sharpness.SmoothOut(_sgd(p)),
        "GNR exact": lambda p, t: sharpness.GNR(_sgd(p), hvp="exact"),
        "GNR fd": lambda p, t: sharpness.GNR(_sgd(p), hvp="finite_difference"),
        "GNR fd every=10": lambda p, t: sharpness.GNR(_sgd(p), hvp="finite_difference", every=10),
        "TraceSAM m=1": lambda p, t: sharpness.TraceSAM(_sgd(p)),
        "FrobSAM m=2": lambda p, t: sharpness.FrobSAM(_sgd(p)),
        "DetSAM m=1": lambda p, t: sharpness.DetSAM(_sgd(p)),
        "SALR c=2": lambda p, t: sharpness.SALR(_sgd(p)),
        "EntropySGD L=5": lambda p, t: sharpness.EntropySGD(_sgd(p)),
    }

    def on_parameters(build: Callable[[Any, int], torch.optim.Optimizer]) -> Callable[[nn.Module, int], Any]:
        return lambda m, t: build(m.parameters(), t)

    ours += [MethodSpec(name, on_parameters(build)) for name, build in simple.items()]
    ours += [MethodSpec(name, on_parameters(build), update=None) for name, build in single_phase.items()]
    peers = {spec.peer_of: spec for spec in peer_specs()}
    specs = []
    for spec in ours:
        specs.append(spec)
        if spec.name in peers:
            specs.append(peers[spec.name])
    return specs


# ---------------------------------------------------------------------------------------------- one runner
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grad_eval_counters(optimizer: torch.optim.Optimizer) -> tuple[int, int] | None:
    """``(grad_evals, steps)`` of our optimizers; None for the others."""
    if isinstance(optimizer, pytorch_optimizer_classes()):
        return None
    if hasattr(optimizer, "grad_evals") and hasattr(optimizer, "steps"):
        return optimizer.grad_evals, optimizer.steps
    return None


def pytorch_optimizer_classes() -> tuple[type, ...]:
    if pytorch_optimizer is None:
        return ()
    return pytorch_optimizer.SAM, pytorch_optimizer.LookSAM, pytorch_optimizer.GSAM


@dataclass(frozen=True)
class Sample:
    """One timed block: wall and process-CPU seconds per step, gradient passes per step, and the fraction of
    its steps that took the method's extra passes (``sam_steps``; None for SGD and the peers)."""

    wall: float
    cpu: float
    passes: float
    sam: float | None = None


@dataclass
class Runner:
    """One method training its own copy of the model on a cycle of batches."""

    spec: MethodSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[tuple[Tensor, Tensor]]
    on_closure: Callable[[], None] | None = None  # memory probe hook (never set while timing)
    around_passes: Callable[[], Any] | None = None  # op counting: a context the closure runs in (never timed)
    forward: nn.Module | None = None  # what the closure calls: the model, or the model torch.compile'd (--compile)
    primed: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (parameter, weight, gradient)
    closure_calls: int = 0  # forward passes run through make_closure's closures (the passes of the others)

    def make_closure(self, x: Tensor, y: Tensor) -> Closure:
        """The closure the optimizer's flags ask for (``sharpness.make_closure``; plain for the others)."""
        def compute_loss(reduction: str) -> Tensor:
            self.closure_calls += 1
            if self.on_closure is not None:
                self.on_closure()
            return nn.functional.cross_entropy((self.forward or self.model)(x), y, reduction=reduction)

        closure = sharpness.make_closure(self.optimizer, compute_loss)
        if self.around_passes is None:
            return closure

        def counted() -> Tensor:
            with self.around_passes():
                return closure()

        return counted

    def step(self) -> None:
        """One full training step: the passes and the update."""
        x, y = next(self.batches)
        if getattr(self.optimizer, "mask_due", False):  # SSAM-F fisher="vmap" refreshes its mask as the harness does
            self.optimizer.update_mask(self.model, nn.functional.cross_entropy, x, y)
        self.spec.step(self.optimizer, self.make_closure(x, y))

    def update(self) -> None:
        """The update alone, on the gradients already there (see :meth:`prime`)."""
        self.spec.update(self.optimizer)

    def prime(self) -> None:
        """Fill the gradients once, for update-only timing, and keep a copy of them and of the weights for
        :meth:`refresh`."""
        self.make_closure(*next(self.batches))()
        self.primed = [(p, p.detach().clone(), p.grad.clone()) for p in self.model.parameters() if p.grad is not None]

    def refresh(self) -> None:
        """Put the primed weights and gradients back (between timed updates): with no second pass in between, an
        update applies whatever a rule left in ``p.grad`` (ASAM: ``T^2 g``, which grows with ``|w|``)."""
        with torch.no_grad():
            for p, weight, grad in self.primed:
                p.copy_(weight)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)

    def run_block(self, action: Callable[[], None], steps: int, device: torch.device,
                  between: Callable[[], None] | None = None) -> Sample:
        """``steps`` calls of ``action``, timed as one block; with ``between``, it runs before every call,
        untimed, and each call is timed on its own."""
        before, calls = grad_eval_counters(self.optimizer), self.closure_calls
        sam_before = getattr(self.optimizer, "sam_steps", None)
        if between is None:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                action()
            synchronize(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        else:
            wall = cpu = 0.0
            for _ in range(steps):
                between()
                synchronize(device)
                wall0, cpu0 = time.perf_counter(), time.process_time()
                action()
                synchronize(device)
                wall, cpu = wall + time.perf_counter() - wall0, cpu + time.process_time() - cpu0
        wall, cpu = wall / steps, cpu / steps
        after = grad_eval_counters(self.optimizer)
        if before is None or after is None or after[1] == before[1]:  # SGD, the peers: the closure calls
            return Sample(wall, cpu, (self.closure_calls - calls) / steps)
        sam = getattr(self.optimizer, "sam_steps", None)
        sam = None if sam is None or sam_before is None else (sam - sam_before) / (after[1] - before[1])
        return Sample(wall, cpu, (after[0] - before[0]) / (after[1] - before[1]), sam)


def make_runner(spec: MethodSpec, model: nn.Module, batches: list[tuple[Tensor, Tensor]],
                total_steps: int, compile_backend: str | None = None) -> Runner:
    model = copy.deepcopy(model)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else None
    return Runner(spec, model, spec.build(model, total_steps), itertools.cycle(batches),
                  forward=forward)


def compilable(spec: MethodSpec, model: nn.Module) -> bool:
    """False for a method that differentiates its gradients again (GNR's exact HVPs): no compiled graph can."""
    return not getattr(spec.build(copy.deepcopy(model), 10), "needs_graph", False)


def all_finite(runner: Runner) -> bool:
    params = list(runner.model.parameters())
    tensors = params + [p.grad for p in params if p.grad is not None]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------------------------------------- timing
def run_interleaved(runners: list[Runner], action: str, args: argparse.Namespace,
                    device: torch.device) -> dict[str, list[Sample]]:
    """Round-robin blocks of ``runner.<action>``, one per method per repeat, in :func:`block_order`."""
    samples: dict[str, list[Sample]] = {runner.spec.name: [] for runner in runners}
    def block(runner: Runner) -> Sample:
        between = runner.refresh if action == "update" else None
        return runner.run_block(getattr(runner, action), args.steps_per_repeat, device, between)

    for runner in runners:
        for _ in range(args.warmup):
            block(runner)
    gc.collect()
    gc.disable()  # no collector pauses inside timed blocks (as timeit does)
    try:
        for repeat in range(args.repeats):
            for index in block_order(len(runners), repeat):
                runner = runners[index]
                sample = block(runner)
                samples[runner.spec.name].append(sample)
    finally:
        gc.enable()
    return samples


# ---------------------------------------------------------------------------------------------- memory
def base_state_keys() -> frozenset[str]:
    """State keys plain SGD keeps (``momentum_buffer``): the base optimizer's own, not counted as extra."""
    param = nn.Parameter(torch.zeros(1))
    sgd = _sgd([param])
    param.grad = torch.ones(1)
    sgd.step()
    return frozenset(sgd.state[param])


def extra_state_bytes(optimizer: torch.optim.Optimizer, base_keys: frozenset[str]) -> int:
    """Bytes of optimizer-state tensors beyond the base SGD's own, deduplicated by storage.

    Looks at the wrapper's ``state`` and at ``base_optimizer.state`` (pytorch-optimizer shares one dict
    between them; ours keeps two), so it works for both.
    """
    states = [optimizer.state, getattr(optimizer, "base_optimizer", optimizer).state]
    storages = {}
    for state in states:
        for per_param in state.values():
            for key, value in per_param.items():
                if key not in base_keys and isinstance(value, Tensor):
                    storage = value.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_memory(spec: MethodSpec, model: nn.Module, batches: list[tuple[Tensor, Tensor]],
                   device: torch.device, steps: int = 10) -> dict[str, Any]:
    """Extra state at rest and its largest size at a closure call over a short run; the allocator's peak: on
    CUDA over the run (``max_memory_allocated``), on CPU per step above its start (the profiler's counters)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    runner = make_runner(spec, model, batches, total_steps=steps + 4)  # + the CPU peak's steps
    base_keys = base_state_keys()
    peak = 0

    def probe() -> None:
        nonlocal peak
        peak = max(peak, extra_state_bytes(runner.optimizer, base_keys))

    runner.on_closure = probe
    for _ in range(steps):
        runner.step()
        probe()
    synchronize(device)
    at_rest = extra_state_bytes(runner.optimizer, base_keys)
    result = {"extra_state_bytes_at_rest": at_rest, "extra_state_bytes_peak": peak}
    if device.type == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
    else:  # what a step allocates beyond its start, passes and temporaries included (the state is already there)
        runner.on_closure = None
        result["cpu_step_peak_bytes"] = cpu_peak_bytes(runner.step)
    return result


def count_ops(spec: MethodSpec, model: nn.Module, batches: list[tuple[Tensor, Tensor]], steps: int = 10,
              warmup: int = 3) -> dict[str, float]:
    """Kernels and scalar reads per step outside the closure (the method's own work, the base update included),
    on the device read path: on a GPU, each kernel costs the host a launch (about 5-10 us), which is what bounds
    the step of a small model there. Untimed; a separate runner."""
    runner = make_runner(spec, model, batches, total_steps=warmup + steps)
    counter = OpCounter()
    runner.around_passes = counter.pause
    with device_read_path():
        for _ in range(warmup):
            runner.step()
        with counter:
            for _ in range(steps):
                runner.step()
    return {"kernels_per_step": counter.kernels / steps, "reads_per_step": counter.reads / steps}


# ---------------------------------------------------------------------------------------------- statistics
CLOCKS = ("wall", "cpu")  # time.perf_counter; time.process_time (excludes time spent descheduled)


def clock_summary(samples: list[Sample], reference: list[Sample], clock: str) -> dict[str, Any]:
    """Median/IQR of the step time on one clock, and the cost normalized by (passes x SGD step).

    ``normalized`` is the median of the paired per-repeat ratios ``t_block / (passes_block x SGD block of the
    same repeat)`` (slow drifts cancel within a repeat; each block is divided by its own pass count, which
    matters for the methods whose pass count varies from block to block), ``normalized_q1/q3`` their
    quartiles. ``normalized_by_median_sgd`` divides by the median SGD step instead (the estimator before
    session 15).
    """
    values = [getattr(s, clock) for s in samples]
    ref = [getattr(s, clock) for s in reference]
    q1, median, q3 = quartiles(values)
    ref_median = statistics.median(ref)
    paired_q1, paired_median, paired_q3 = quartiles(
        [v / (s.passes * r) for v, s, r in zip(values, samples, ref, strict=True)])
    return {
        "median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1,
        "normalized": paired_median, "normalized_q1": paired_q1, "normalized_q3": paired_q3,
        "normalized_by_median_sgd": statistics.median(v / (s.passes * ref_median) for v, s in zip(values, samples)),
        "per_block_s": values,
    }


def summarize(steps: dict[str, list[Sample]], updates: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    """Per method: passes per step, step-time statistics per clock, median update-only time per clock."""
    summary = {}
    for name, samples in steps.items():
        entry: dict[str, Any] = {
            "passes_per_step": statistics.fmean(s.passes for s in samples),
            "passes_per_block": [s.passes for s in samples],
        }
        for clock in CLOCKS:
            entry[clock] = clock_summary(samples, steps[REFERENCE], clock)
            entry[clock]["update_only_median_s"] = (
                statistics.median(getattr(s, clock) for s in updates[name]) if name in updates else None)
        # the share of extra-pass (SAM) updates in the timed steps and in the update-only blocks, which replay one
        # frozen gradient: an adaptive policy (AE-SAM) then sees a constant ||g||^2 and may choose another mix
        for key, blocks in (("sam_fraction", samples), ("update_only_sam_fraction", updates.get(name, []))):
            fractions = [b.sam for b in blocks if b.sam is not None]
            entry[key] = statistics.fmean(fractions) if fractions else None
        summary[name] = entry
    return summary


def step_ratio(steps: dict[str, list[Sample]], numerator: str, denominator: str, clock: str,
               scale: float = 1.0) -> dict[str, float]:
    """The median of the per-repeat paired ratios ``num / (scale * den)``, with their quartiles (and the ratio
    of the medians, the estimator before session 15)."""
    return paired_ratio([getattr(s, clock) for s in steps[numerator]],
                        [getattr(s, clock) for s in steps[denominator]], scale)


def predicted_ratios(summary: dict[str, dict[str, Any]], clock: str) -> dict[str, float]:
    """The two headline ratios rebuilt from the steadier update-only medians.

    A pass costs ``SGD step - SGD update``; our SAM step is two passes plus its update, and so is
    pytorch-optimizer's. Assumes the passes cost the same for every method (they run the same closure).
    """
    sgd = summary[REFERENCE][clock]
    two_passes = 2 * (sgd["median_s"] - sgd["update_only_median_s"])
    ours = two_passes + summary[OURS][clock]["update_only_median_s"]
    predicted = {"sam_over_2x_sgd": ours / (2 * sgd["median_s"])}
    if THEIRS in summary:
        predicted["sam_over_pytorch_optimizer_sam"] = ours / (
            two_passes + summary[THEIRS][clock]["update_only_median_s"])
    return predicted


def headline_ratios(steps: dict[str, list[Sample]], summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The two targets on both clocks: measured (and paired quartiles), and predicted from update-only."""
    ratios: dict[str, Any] = {"targets": {"sam_over_2x_sgd": SAM_TARGET,
                                          "sam_over_pytorch_optimizer_sam": VS_PYTORCH_OPTIMIZER_TARGET}}
    for clock in CLOCKS:
        entry: dict[str, Any] = {"sam_over_2x_sgd": step_ratio(steps, OURS, REFERENCE, clock, scale=2.0)}
        if THEIRS in steps:
            entry["sam_over_pytorch_optimizer_sam"] = step_ratio(steps, OURS, THEIRS, clock)
        entry["predicted_from_update_only"] = predicted_ratios(summary, clock)
        sgd = summary[REFERENCE][clock]
        entry["sam_update_minus_sgd_update_s"] = (
            summary[OURS][clock]["update_only_median_s"] - sgd["update_only_median_s"])
        entry["sgd_update_share_of_step"] = sgd["update_only_median_s"] / sgd["median_s"]
        ratios[clock] = entry
    return ratios


# ---------------------------------------------------------------------------------------------- one model
def time_methods(methods: list[MethodSpec], model: nn.Module, batches: list[tuple[Tensor, Tensor]],
                 args: argparse.Namespace, device: torch.device) -> tuple[dict, dict, dict[str, float]]:
    """Full steps, then update-only (fresh runners); returns both sample sets and the final SAM fractions."""
    total_steps = (args.warmup + args.repeats) * args.steps_per_repeat
    runners = [make_runner(m, model, batches, total_steps, args.compile) for m in methods]
    steps = run_interleaved(runners, "step", args, device)
    fractions = {r.spec.name: r.optimizer.sam_fraction for r in runners if hasattr(r.optimizer, "sam_fraction")}
    runners = [make_runner(m, model, batches, total_steps) for m in methods if m.update is not None]
    for runner in runners:
        runner.prime()
    updates = run_interleaved(runners, "update", args, device)
    for runner in runners:
        if not all_finite(runner):
            print(f"warning: {runner.spec.name}: non-finite weights/gradients after the update-only timing",
                  file=sys.stderr)
    return steps, updates, fractions


def selected_methods(names: list[str] | None) -> list[MethodSpec]:
    """The methods named (all for None), SGD and our SAM always, and the peer of every method that runs."""
    chosen = {REFERENCE, OURS} | set(names or ())
    return [m for m in method_specs() if names is None or m.name in chosen or m.peer_of in chosen]


def peer_ratios(steps: dict[str, list[Sample]], summary: dict[str, dict[str, Any]],
                methods: list[MethodSpec]) -> dict[str, Any]:
    """Per method with a peer in the run: our step / the peer's step (paired, per clock), the pass counts, and
    our update / the peer's update where both have one."""
    out: dict[str, Any] = {}
    for spec in methods:
        if spec.peer_of is None or spec.peer_of not in steps:
            continue
        ours, theirs = summary[spec.peer_of], summary[spec.name]
        entry: dict[str, Any] = {"peer": spec.name, "passes_per_step": [ours["passes_per_step"],
                                                                        theirs["passes_per_step"]]}
        for clock in CLOCKS:
            entry[clock] = step_ratio(steps, spec.peer_of, spec.name, clock)
            a, b = ours[clock]["update_only_median_s"], theirs[clock]["update_only_median_s"]
            entry[clock]["update_only"] = None if a is None or b is None else a / b
        out[spec.peer_of] = entry
    return out


def bench_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = spec.build().to(device)
    batches = make_batches(spec, device, count=8, seed=args.seed)
    methods = selected_methods(args.methods)
    if args.compile:
        left_out = [m.name for m in methods if not compilable(m, model)]
        if left_out:
            print(f"--compile: left out {', '.join(left_out)} (double backward does not go through a compiled "
                  "graph)", file=sys.stderr)
        methods = [m for m in methods if m.name not in left_out]
    if device.type == "cuda":  # one-time allocations (cuBLAS workspaces) must not land in the first method's peak
        measure_memory(methods[0], model, batches, device, steps=1)
    memory = {m.name: measure_memory(m, model, batches, device) for m in methods}
    ops = {m.name: count_ops(m, model, batches) for m in methods}
    steps, updates, fractions = time_methods(methods, model, batches, args, device)
    summary = summarize(steps, updates)
    for name, entry in summary.items():
        entry.update(memory[name])
        entry.update(ops[name])
        if name in fractions:
            entry["sam_fraction"] = fractions[name]
    return {
        "model": spec.name, "batch_size": spec.batch_size, "input_shape": list(spec.input_shape),
        "parameters": sum(p.numel() for p in model.parameters()), "param_bytes": param_bytes(model),
        "methods": summary, "ratios": headline_ratios(steps, summary),
        "peers": peer_ratios(steps, summary, methods),
    }


# ---------------------------------------------------------------------------------------------- environment
def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    env = shared_environment(
        packages=["pytorch_optimizer"], extra={"device": str(device)},
        options={"repeats": args.repeats, "steps_per_repeat": args.steps_per_repeat,
                 "warmup_blocks": args.warmup, "seed": args.seed, "sgd": SGD_OPTIONS, "compile": args.compile},
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ---------------------------------------------------------------------------------------------- output
def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def shown_clocks(device: str) -> tuple[str, ...]:
    """Process CPU time says nothing about asynchronous GPU work: wall time only on CUDA."""
    return ("wall",) if device.startswith("cuda") else CLOCKS


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def table_row(name: str, m: dict[str, Any], clocks: tuple[str, ...], cuda: bool) -> list[str]:
    row = [name, f"{m['passes_per_step']:.2f}"]
    for clock in clocks:
        c = m[clock]
        update = c["update_only_median_s"]
        row += [_ms(c["median_s"]), _ms(c["iqr_s"]), f"{c['normalized']:.3f}", "-" if update is None else _ms(update)]
    row.append(f"{_mib(m['extra_state_bytes_at_rest'])} / {_mib(m['extra_state_bytes_peak'])}")
    row.append(_mib(m["cuda_peak_bytes"] if cuda else m["cpu_step_peak_bytes"]))
    row.append(f"{m['kernels_per_step']:.0f} / {m['reads_per_step']:.1f}")
    return row


def format_model_table(result: dict[str, Any], device: str) -> str:
    """A Markdown table (pastes into docs/benchmarks.md as is)."""
    clocks, cuda = shown_clocks(device), device.startswith("cuda")
    header = ["method", "passes/step"]
    for clock in clocks:
        header += [f"{clock} ms/step", f"{clock} IQR", f"{clock} t/(passes*SGD)", f"{clock} update-only ms"]
    header.append("opt. state beyond SGD MiB (rest / max at a pass)")
    header.append("CUDA peak MiB (run)" if cuda else "step peak MiB (over its start)")
    header.append("kernels / reads per step")
    rows = [header] + [table_row(name, m, clocks, cuda) for name, m in result["methods"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    table = "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])
    mixes = [f"{name} {m['update_only_sam_fraction']:.2f} vs {m['sam_fraction']:.2f}"
             for name, m in result["methods"].items()
             if m.get("sam_fraction") is not None and m.get("update_only_sam_fraction") is not None
             and abs(m["sam_fraction"] - m["update_only_sam_fraction"]) > 0.05]
    if mixes:
        table += ("\nnote: the update-only column replays one frozen gradient, so these methods took another share "
                  "of extra-pass updates there than in the timed steps (update-only vs steps): " + "; ".join(mixes))
    return table


def _verdict(value: float, target: float) -> str:
    return "meets target" if value <= target else f"ABOVE target by {100 * (value / target - 1):.1f}%"


def format_ratios(ratios: dict[str, Any], device: str) -> str:
    targets = ratios["targets"]
    labels = {"sam_over_2x_sgd": "our SAM / (2 x SGD)",
              "sam_over_pytorch_optimizer_sam": "our SAM / pytorch-opt. SAM"}
    lines = []
    for clock in shown_clocks(device):
        entry = ratios[clock]
        predicted = entry["predicted_from_update_only"]
        for key, label in labels.items():
            if key in entry:
                r = entry[key]
                lines.append(f"{clock:>4}: {label:<27} = {r['value']:.3f}  "
                             f"[paired q1 {r['q1']:.3f}, q3 {r['q3']:.3f}]  "
                             f"target <= {targets[key]}: {_verdict(r['value'], targets[key])}")
                lines.append(f"{'':>4}  {'  predicted (update-only)':<27} = {predicted[key]:.3f}  "
                             f"{' ' * 32}{_verdict(predicted[key], targets[key])}")
        extra = _ms(entry["sam_update_minus_sgd_update_s"])
        lines.append(f"{clock:>4}: SAM update - SGD update = {extra} ms/step; "
                     f"SGD's update is {100 * entry['sgd_update_share_of_step']:.1f}% of its step")
    return "\n".join(lines)


def format_peers(peers: dict[str, Any], device: str) -> str:
    """Our step against the peer library's, method by method (paired ratios; < 1: ours is faster)."""
    if not peers:
        return ""
    clocks = shown_clocks(device)
    lines = ["against pytorch-optimizer (our step / its step, paired quartiles; passes ours / its; update only):"]
    for name, entry in peers.items():
        ours_passes, their_passes = entry["passes_per_step"]
        for clock in clocks:
            r = entry[clock]
            update = "-" if r["update_only"] is None else f"{r['update_only']:.3f}"
            lines.append(f"{clock:>4}: {name:<12} {r['value']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]  "
                         f"passes {ours_passes:.2f} / {their_passes:.2f}  update {update}")
    return "\n".join(lines)


def print_report(env: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(f"torch {env['torch']}, python {env['python']}, {env['cpu']}, {env['torch_threads']} threads, "
          f"device {env['device']}{', ' + env['gpu'] if env.get('gpu') else ''}, {env['date']}, "
          f"commit {env['git']['commit']}{' (dirty)' if env['git']['dirty'] else ''}")
    opts = env["options"]
    print(f"{opts['repeats']} repeats x {opts['steps_per_repeat']} steps per method (interleaved), "
          f"{opts['warmup_blocks']} warm-up blocks; medians over repeats")
    if opts.get("compile"):
        print(f"steps timed with the model torch.compile'd (backend {opts['compile']}); update-only, memory and "
              "kernel columns eager")
    for result in results:
        print(f"\n## {result['model']} (batch {result['batch_size']}, {result['parameters']:,} parameters, "
              f"{_mib(result['param_bytes'])} MiB)\n")
        print(format_model_table(result, env["device"]))
        print()
        print(format_ratios(result["ratios"], env["device"]))
        peers = format_peers(result.get("peers", {}), env["device"])
        if peers:
            print()
            print(peers)


# ---------------------------------------------------------------------------------------------- main
def warn_without_peer() -> None:
    """Say so when pytorch-optimizer is missing: its rows and the "ours / peer" target would vanish silently."""
    if pytorch_optimizer is None:
        print("note: pytorch-optimizer is not installed, so its rows and the 'ours / pytorch-optimizer' ratios are "
              "left out (pip install pytorch-optimizer, or the project's test extra)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warn_without_peer()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.compile:  # SSAM-F's per-example Fisher back-propagates one graph several times (retain_graph)
        from torch._functorch import config as functorch_config

        functorch_config.donated_buffer = False
    device = torch.device(args.device)
    env = environment(args, device)
    results = [bench_model(MODELS[key], args, device) for key in args.models]
    if args.json:  # first, so that the measurements survive a failure below
        write_json_atomically(args.json, {"environment": env, "results": results})
    print_report(env, results)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
