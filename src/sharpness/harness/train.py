"""One training loop for every registered optimizer, on a budget of epochs, steps or gradient evaluations.

The loop branches on capability flags only (every optimizer is a ``SharpnessAwareOptimizer`` with counters;
the baseline is ``"erm"``). Records are per epoch; a checkpoint after every epoch lets a killed run resume
bit-identically (model, optimizer, RNG, data order, records, config).
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import __version__, _foreach
from ..data._random import make_generator
from ..data.resident import as_resident, check_shard, resident_batches, shard_bounds
from ..optim.closure import make_closure
from ..optim.entropy_sgd import EntropySGD
from ..optim.salr import SALR
from ..param_groups import weight_decay_groups
from ..registry import create, get_optimizer_info
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig

__all__ = ["TrainResult", "check_compile_backend", "check_optimizer", "distributed_context", "environment",
           "lr_factor", "optimizer_option_names", "resolve_device", "train"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainResult:
    """A finished run: its config, the final summary and the per-epoch records.

    ``model`` and ``optimizer`` are the trained objects of this process (the final model is SWA's average when
    SWA is on), for inspection in Python, e.g. SALR's ``factor_history``; they are not stored in the database.
    """

    config: TrainConfig
    summary: dict[str, Any]
    epochs: list[dict[str, Any]]
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False, compare=False)


def lr_factor(schedule: str, progress: float, milestones: tuple[float, ...] = (), gamma: float = 0.1,
              warmup: float = 0.0) -> float:
    """The learning-rate multiplier at ``progress`` in [0, 1] of the budget.

    ``constant``: 1; ``step``: 1, then 0.1 from 50% and 0.01 from 75%; ``cosine``: ``(1 + cos(pi p)) / 2``;
    ``multistep``: ``gamma ** (number of milestones <= p)`` (``torch.optim.lr_scheduler.MultiStepLR`` with the
    milestones as fractions of the budget). With ``warmup = w > 0`` the factor is ``p / w`` below ``w``, and the
    schedule runs over the rest, at ``(p - w) / (1 - w)``.
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0.0:
        if progress < warmup:
            return progress / warmup
        progress = (progress - warmup) / (1.0 - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "multistep":
        return gamma ** sum(progress >= milestone for milestone in milestones)
    raise ValueError(f"Invalid schedule value: {schedule!r} (expected constant, step, cosine or multistep)")


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What produced a result: package and torch versions, Python, platform, device (and GPU), git commit."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.device(device)
    env = {"sharpness": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": device.type, "git_commit": commit}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def check_compile_backend(backend: str | None) -> str | None:
    """``None`` (eager) or the name of a ``torch.compile`` backend this torch has (``"inductor"``, ...)."""
    if backend is None:
        return None
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())  # debugging backends (eager, aot_eager) are accepted
    if not isinstance(backend, str) or backend not in known:
        # but not offered: the message lists torch's default set (inductor, cudagraphs, ...) and two debugging
        # ones, not the minifier and TESTING_ONLY backends
        offered = [*torch._dynamo.list_backends(), *(name for name in ("eager", "aot_eager") if name in known)]
        raise ValueError(f"Invalid compile_backend value: {backend!r} (expected None or one of {', '.join(offered)}; "
                         "`python -c 'import torch._dynamo; print(torch._dynamo.list_backends(exclude_tags=()))'` "
                         "lists every backend this torch has)")
    return backend


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device a run trains on: ``"auto"`` (or None) is CUDA when available (under torchrun: when each local
    process gets a GPU of its own), else CPU; ``"cuda"`` under torchrun is this process's GPU
    (``cuda:LOCAL_RANK``). Refuses a device this machine does not have."""
    spec = "auto" if device is None else device
    if isinstance(spec, str) and spec == "auto":
        # CUDA only if every process on this node gets a GPU of its own (torchrun's LOCAL_WORLD_SIZE), so all
        # ranks agree on the device and the backend
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        spec = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "cpu"
    try:
        resolved = torch.device(spec)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Invalid device value: {device!r} (expected auto, cpu, cuda, cuda:N or mps)") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Invalid device value: {device!r} (CUDA is not available on this machine; "
                             "use --device cpu)")
        if resolved.index is None:
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if resolved.index >= torch.cuda.device_count():
            raise ValueError(f"Invalid device value: {device!r} (this machine has {torch.cuda.device_count()} "
                             "CUDA device(s))")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Invalid device value: {device!r} (MPS is not available on this machine)")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Invalid device value: {device!r} (expected auto, cpu, cuda, cuda:N or mps)")
    return resolved


def distributed_context(device: torch.device | None = None) -> tuple[int, int]:
    """``(rank, world_size)``; under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialized here
    if the caller has not done it: nccl for a CUDA ``device`` (default: when CUDA is available), else gloo."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device if device is not None else int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


# -------------------------------------------------------------------------------------------- building blocks
def build_base_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The base optimizer: ``config.base`` with its lr, momentum (SGD), weight decay and ``base_options``.

    With ``decay_biases_and_norms=False`` the parameters with at most one dimension (biases, normalization
    scales and shifts) form a second param group with weight decay 0 (nanoGPT's and timm's rule).
    """
    if config.decay_biases_and_norms:
        groups: list[Any] = [p for p in model.parameters() if p.requires_grad]
    else:
        groups = weight_decay_groups(model, config.weight_decay)
    return config.base_optimizer(groups)


def planned_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The number of optimizer steps the run is expected to take (AE-SAM's ``T``).

    For a gradient-evaluation budget it is the budget divided by the optimizer's mean of its minimum and
    maximum passes per step (e.g. 1.5 for AE-SAM), an estimate stated in the run's summary.
    """
    if config.epochs is not None:
        return config.epochs * steps_per_epoch
    if config.budget_steps is not None:
        return config.budget_steps
    info = get_optimizer_info(config.optimizer)
    passes = (info.min_grad_evals_per_step + info.max_grad_evals_per_step) / 2
    return max(1, int(config.budget_grad_evals / passes))


def build_optimizer(config: TrainConfig, model: nn.Module, total_steps: int):
    info = get_optimizer_info(config.optimizer)
    options = dict(config.optimizer_options)
    if "total_steps" in info.required:
        options.setdefault("total_steps", total_steps)
    if _takes_seed(config.optimizer, options) and "seed" not in (options.get("inner_options") or {}):  # the optimizer's own random stream (SS-SAM, ESAM, SmoothOut,
        options.setdefault("seed", config.seed)  # Trace-SAM, SALR's inner Entropy-SGD, ...) follows the run's seed
    return create(config.optimizer, build_base_optimizer(config, model), model=model,
                  max_grad_norm=config.max_grad_norm, **options)


#: engine keywords a run sets itself or that take objects, not ``--opt`` values
_NOT_OPTIONS = frozenset({"self", "params_or_base", "base_class", "base_optimizer", "optimizer", "rule", "policy",
                          "reuse_alpha", "model", "grad_scaler", "generator", "sampler", "phi", "psi",
                          "max_grad_norm"})  # the config's own field


def optimizer_option_names(name: str) -> list[str] | None:
    """The keyword options ``optimizer_options`` (``--opt``) may set for the registered optimizer ``name``: the
    keywords of its constructors down to the engine's (whose ``**kwargs`` are the base optimizer's, set by the
    config's own fields). ``None`` when a constructor passes its ``**kwargs`` on to something else (SALR's go to
    its inner optimizer), so the names cannot be listed."""
    from ..optim.engine import SharpnessAwareOptimizer

    names: set[str] = set()
    for klass in get_optimizer_info(name).cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is torch.optim.Optimizer:  # reached past a constructor whose **kwargs go elsewhere
            return None
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if klass is SharpnessAwareOptimizer or not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return sorted(names - _NOT_OPTIONS)
    return None


def _takes_seed(name: str, options: Mapping[str, Any]) -> bool:
    """Whether the optimizer ``name`` (or, for SALR, the ``inner`` one its options build) has a ``seed`` option,
    wherever in its constructors it is declared (Trace-SAM's comes through ``**kwargs`` from UniversalSAM)."""
    names = optimizer_option_names(name)
    if names is None and isinstance(options.get("inner"), str):  # the **kwargs go to an inner optimizer (SALR)
        try:
            names = optimizer_option_names(options["inner"])
        except ValueError:  # an unknown name: create() reports it
            names = None
    return names is not None and "seed" in names


def check_optimizer(config: TrainConfig) -> None:
    """Build the configured optimizer on a stand-in parameter, before any data is loaded or anything trains:
    unknown option names (the error lists the valid ones), bad values, and a ``budget_grad_evals`` smaller than
    one step are refused (the sweep's plan and ``--dry-run`` check every run this way)."""
    names = optimizer_option_names(config.optimizer)
    unknown = sorted(set(config.optimizer_options) - set(names)) if names is not None else []
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for optimizer {config.optimizer!r} (valid options: "
                         f"{', '.join(names or [])})")
    probe = nn.Linear(1, 1)
    optimizer = build_optimizer(config, probe, total_steps=1)
    if config.langevin_batches == "fresh":
        entropy = optimizer.optimizer if isinstance(optimizer, SALR) else optimizer
        if not isinstance(entropy, EntropySGD) or entropy.langevin_steps < 2:
            raise ValueError(
                f"Invalid langevin_batches value: 'fresh' for optimizer {config.optimizer!r} (expected Entropy-SGD, "
                "alone or as SALR's inner optimizer, with langevin_steps >= 2: only its Langevin passes after the "
                "first take a fresh mini-batch)")
    per_step = optimizer.max_grad_evals_per_step
    if config.budget_grad_evals is not None and config.budget_grad_evals < per_step:
        raise ValueError(f"Invalid budget_grad_evals value: {config.budget_grad_evals} (one {config.optimizer} step "
                         f"takes up to {per_step} gradient evaluations with these options; give at least {per_step})")


def make_loss(config: TrainConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy with label smoothing; classes are dimension 1 (sequence models give ``(B, V, T)``)."""
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def batches(dataset: Dataset, batch_size: int, generator: torch.Generator | None, *,
            augment: torch.Generator | None = None,
            shard: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches in a seeded order (``generator=None``: in order).

    Sets held in tensors (:func:`~sharpness.data.resident.as_resident`: in-memory sets, images, token windows,
    and their subset/relabelled views) are indexed a batch at a time where they are, augmented with draws from
    ``augment`` (``None``: not augmented), in the order ``torch.randperm(n, generator=generator)``; other sets go
    through a ``DataLoader`` (shuffled from ``generator``, augmented item by item as the set itself does).
    ``shard=(rank, world_size)``: this rank's part of each global batch of ``batch_size`` (see
    :func:`~sharpness.data.resident.resident_batches`; a resident set cuts only that part).
    """
    resident = as_resident(dataset)
    if resident is not None:
        yield from resident_batches(resident, batch_size, order=generator, augment=augment, shard=shard)
        return
    rank, world = check_shard(shard, batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator)
    for x, y in loader:
        if len(y) < world:  # as resident_batches: no rank is left without an example
            continue
        low, high = shard_bounds(len(y), rank, world)
        yield x[low:high], y[low:high]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, loss_fn: Callable, batch_size: int = 1024,
             bf16: bool = False, shard: tuple[int, int] | None = None) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over ``dataset`` in eval mode (training flags restored), on the model's device
    (sums kept there: one host read at the end).

    ``shard=(rank, world_size)`` under an initialized process group: each rank evaluates its part of every
    batch and one all-reduce of the sums gives every rank the whole set's numbers.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=_foreach.sum_dtype(device), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    _, world = check_shard(shard)
    for x, y in batches(dataset, batch_size, None, shard=shard):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out = out.float()
        loss_sum += loss_fn(out, y).to(loss_sum.dtype) * y.numel()
        correct += (out.argmax(1) == y).sum()
        count += y.numel()
    model.train(was_training)
    if world > 1:
        loss_sum, correct, count = _sum_over_ranks(loss_sum, correct, count)
    return float(loss_sum) / count, float(correct) / count


def _sum_over_ranks(first: Tensor, *rest: Tensor | int) -> list[float]:
    """The values summed over the process group, as numbers: one float64 all-reduce of them all on ``first``'s
    device and one host read (the epoch's and the evaluation's totals under torchrun)."""
    import torch.distributed as dist

    totals = torch.stack([first.to(torch.float64), *(torch.as_tensor(v, dtype=torch.float64, device=first.device)
                                                     for v in rest)])
    dist.all_reduce(totals)
    return totals.tolist()


# ---------------------------------------------------------------------------------------------- the loop
def _on_device(dataset: Dataset, device: torch.device) -> Dataset:
    """``dataset`` held on ``device`` when it is a set of tensors (see :func:`as_resident`), else as it is."""
    resident = as_resident(dataset, device)
    return dataset if resident is None else resident


class _Run:
    """The mutable state of one run (kept small so a checkpoint is easy to read)."""

    def __init__(self, config: TrainConfig, data: Any, model: nn.Module, device: torch.device,
                 compile_backend: str | None = None) -> None:
        self.config = config
        self.data = data
        self.device = device
        self.model = model.to(device)
        self.rank, self.world = distributed_context(device)
        self.shard = (self.rank, self.world) if self.world > 1 else None
        # Under torchrun the forward/backward goes through DDP; the engine gets the DDP module so the first
        # pass runs under no_sync (per-worker perturbation) and policy decisions agree on every rank.
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.network = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.network = self.model
        # torch.compile wraps the network the closures run (the DDP module under torchrun); the eager module
        # keeps the weights, the checkpoints and the evaluation, and the measures unwrap a compiled model
        if compile_backend is not None:
            self.network = torch.compile(self.network, backend=compile_backend)
        self.loss_fn = make_loss(config)
        # the splits as tensors on the training device, served a batch at a time (sets that are not held in
        # tensors stay as they are and go through a DataLoader)
        self.train_set = _on_device(data.train, device)
        self.test_set = _on_device(data.test, device)
        self.validation_set = None if data.validation is None else _on_device(data.validation, device)
        self.steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
        self.total_steps = planned_steps(config, self.steps_per_epoch)
        self.optimizer = build_optimizer(config, self.network, self.total_steps)
        self.order = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.records: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self._measure_batch: tuple[Tensor, Tensor] | None = None
        # SWA: the running average of the weights at the end of every cyclic-lr cycle (config.swa_*).
        self.swa = torch.optim.swa_utils.AveragedModel(model) if config.swa_start is not None else None
        self.swa_cycle = config.swa_cycle or self.steps_per_epoch  # steps per cyclic-lr cycle
        if self.swa is not None:
            phase = self.total_steps - math.ceil(config.swa_start * self.total_steps)  # steps from swa_start on
            if phase < self.swa_cycle:  # no cycle would end: the "SWA" result would be the last iterate
                raise ValueError(
                    f"Invalid SWA schedule: {phase} of the planned {self.total_steps} steps fall after swa_start = "
                    f"{config.swa_start}, fewer than one cycle of {self.swa_cycle} steps, so no weights would be "
                    "averaged (expected an earlier swa_start or a shorter swa_cycle)")
        self.swa_steps = 0  # steps taken in the SWA phase
        self.swa_finished = False  # the averaged weights have been swapped into the model
        self._swa_step = False

    def progress(self) -> float:
        c, opt = self.config, self.optimizer
        if c.budget_grad_evals is not None:
            return opt.grad_evals / c.budget_grad_evals
        if c.budget_steps is not None:
            return opt.steps / c.budget_steps
        return opt.steps / (c.epochs * self.steps_per_epoch)

    def done(self) -> bool:
        c, opt = self.config, self.optimizer
        if c.budget_grad_evals is not None:
            # Stop before a step that could exceed the budget (a SAM step costs two evaluations).
            return opt.grad_evals + opt.max_grad_evals_per_step > c.budget_grad_evals
        if c.budget_steps is not None:
            return opt.steps >= c.budget_steps
        return self.epoch >= c.epochs

    def set_lr(self) -> None:
        c = self.config
        self._swa_step = c.swa_start is not None and self.progress() >= c.swa_start
        if self._swa_step:  # Izmailov et al. eq. (2): alpha(i) = (1 - t(i)) a1 + t(i) a2, t(i) = (((i-1) mod c) + 1) / c
            t = (self.swa_steps % self.swa_cycle + 1) / self.swa_cycle
            low = c.swa_lr if c.swa_lr_min is None else c.swa_lr_min
            for group in self.optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = (1 - t) * c.swa_lr + t * low
            return
        factor = lr_factor(c.schedule, self.progress(), c.lr_milestones, c.lr_gamma, c.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor

    def batch_loss(self, x: Tensor, y: Tensor) -> Callable[[str], Tensor]:
        """``compute_loss(reduction)`` of the network on the batch ``(x, y)`` (moved to the device if not there)."""
        model, bf16 = self.network, self.config.bf16
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

        def compute_loss(reduction: str) -> Tensor:
            if bf16:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    out = model(x).float()
            else:  # no autocast context at all: entering a disabled one still costs host time every pass
                out = model(x)
            return nn.functional.cross_entropy(out, y, label_smoothing=self.config.label_smoothing,
                                               reduction=reduction)

        return compute_loss

    def fresh_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The mini-batches of this step's Langevin passes (``langevin_batches="fresh"``): the training set in an
        order, and with augmentation, drawn from a generator fixed by the run's seed and the step's index, so a
        resumed run draws the same ones and the training order is untouched; each rank takes its part."""
        generator = make_generator(self.config.seed, f"langevin/{self.optimizer.steps}")
        whole = max(1, len(self.train_set) // self.config.batch_size)  # a permutation's short last batch is skipped
        while True:  # L - 1 batches per step; more than a permutation's worth draws another permutation
            yield from itertools.islice(batches(self.train_set, self.config.batch_size, generator, augment=generator,
                                                shard=self.shard), whole)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimizer step; returns its mean training loss as a 0-d tensor on the device (not read here: a
        host read per step would stall a GPU's queue; the optimizers' ``check_finite`` stops a non-finite pass)."""
        opt = self.optimizer
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        compute_loss = self.batch_loss(x, y)
        self.set_lr()
        if getattr(opt, "mask_due", False):  # SSAM-F fisher="vmap": refresh the mask from this batch first
            opt.update_mask(self.model, self.loss_fn, x, y)
        extra = {}
        if self.config.langevin_batches == "fresh":  # Entropy-SGD's Langevin passes, a new mini-batch each
            stream = self.fresh_batches()
            extra["langevin_closure"] = lambda: make_closure(opt, self.batch_loss(*next(stream)))()
        # The closure follows the optimizer's convention (create_graph for exact HVPs, per-sample losses for
        # data selection); a per-sample loss vector is reported as its mean.
        try:
            loss = opt.step(make_closure(opt, compute_loss), **extra).detach()
        except FloatingPointError as error:  # a non-finite pass (the optimizers' check_finite), weights unchanged
            raise FloatingPointError(f"Training diverged at step {opt.steps}: {error}") from error
        return loss.mean() if loss.ndim else loss

    def train_epoch(self) -> None:
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=_foreach.sum_dtype(self.device), device=self.device)
        count = 0
        steps = self.optimizer.steps
        # each rank cuts its contiguous part of every global batch (the same seeded order and augmentation on
        # every rank)
        for x, y in batches(self.train_set, self.config.batch_size, self.order, augment=self.order,
                            shard=self.shard):
            if self.done():
                break
            loss_sum.add_(self.step(x, y), alpha=y.shape[0])
            count += y.shape[0]
            self.after_step()
        if self.world > 1:  # the mean over every rank's examples: one all-reduce per epoch
            loss_sum, count = _sum_over_ranks(loss_sum, count)
        train_loss = float(loss_sum) / max(count, 1)  # the epoch's one host read of the loss
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"Training diverged: mean loss {train_loss} over steps {steps + 1}.."
                                     f"{self.optimizer.steps} (lower --lr or rho)")
        self.epoch += 1
        self.elapsed += time.perf_counter() - start
        if self.swa is not None and self.done():
            self.finish_swa()
        self.records.append(self.record(train_loss))

    def after_step(self) -> None:
        """SWA: average the weights at the end of each cycle (where the cyclic lr reaches ``swa_lr_min``)."""
        if not self._swa_step:
            return
        self.swa_steps += 1
        if self.swa_steps % self.swa_cycle == 0:
            self.swa.update_parameters(self.model)

    def finish_swa(self) -> None:
        """Make the SWA average the final model: copy its weights, recompute BatchNorm statistics (update_bn)."""
        if int(self.swa.n_averaged) == 0 and not self.swa_finished:  # the budget ended sooner than planned
            warnings.warn("SWA averaged no weights (the run ended before its first cycle did): the result is the "
                          "last iterate, not an SWA model (swa_snapshots = 0 in the summary)", RuntimeWarning,
                          stacklevel=2)
        if self.swa_finished or int(self.swa.n_averaged) == 0:
            return
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), self.swa.module.parameters()):
                p.copy_(q)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            # the training inputs as training sees them (augmented), in stored order, from a stream of their own
            augment = make_generator(self.config.seed, "swa_update_bn")
            torch.optim.swa_utils.update_bn(batches(self.train_set, self.config.batch_size, None, augment=augment),
                                            self.model, device=self.device)
        self.swa_finished = True

    def record(self, train_loss: float) -> dict[str, Any]:
        opt = self.optimizer
        test_loss, test_acc = evaluate(self.model, self.test_set, self.loss_fn, bf16=self.config.bf16,
                                       shard=self.shard)
        record = {
            "epoch": self.epoch, "train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc,
            "lr": self.optimizer.param_groups[0]["lr"], "steps": opt.steps, "sam_steps": opt.sam_steps,
            "sam_fraction": opt.sam_fraction, "grad_evals": opt.grad_evals, "wall_time": self.elapsed,
        }
        if self.validation_set is not None:
            record["val_loss"], record["val_acc"] = evaluate(self.model, self.validation_set, self.loss_fn,
                                                             bf16=self.config.bf16, shard=self.shard)
        for key in ("test_loss", "val_loss"):  # the last step's update is checked by no later pass
            if key in record and not math.isfinite(record[key]):
                raise FloatingPointError(f"Training diverged: {key.replace('_', ' ')} {record[key]} after step "
                                         f"{opt.steps} (lower --lr or rho)")
        if self.config.measures and (self.epoch % self.config.measure_every == 0 or self.done()):
            record.update(self.measure())
        return record

    def measure(self) -> dict[str, Any]:
        """The configured sharpness measures on the first ``measure_examples`` training examples.

        Measures run in eval mode, restore weights, flags and buffers, and draw from private generators, so
        measuring never changes the training trajectory.
        """
        from .measure import measure_model

        if self._measure_batch is None:
            x, y = next(batches(self.train_set, self.config.measure_examples, None))  # not augmented
            self._measure_batch = (x.to(self.device), y.to(self.device))
        values = measure_model(self.model, self.loss_fn, self._measure_batch, self.config.measures,
                               rho=self.config.measure_rho, samples=self.config.measure_samples, seed=self.config.seed)
        return {f"sharpness.{name}": m["value"] for name, m in values.items()}

    # ------------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "epoch": self.epoch, "elapsed": self.elapsed,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(), "order_rng": self.order.get_state(), "records": self.records,
            # the run's GPU stream (dropout masks drawn there): without it a resumed run replayed them from the seed
            **({"device_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            **({"swa": {"model": self.swa.state_dict(), "steps": self.swa_steps, "finished": self.swa_finished}}
               if self.swa is not None else {}),
        }

    def load(self, state: dict[str, Any]) -> None:
        if state["config"] != self.config.to_dict():
            raise ValueError("Checkpoint belongs to a different config; delete it or choose another --checkpoint-dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "device_rng" in state:  # (a CPU checkpoint resumes on a GPU from the seed)
            torch.cuda.set_rng_state(state["device_rng"], self.device)
        self.order.set_state(state["order_rng"])
        self.epoch, self.elapsed, self.records = int(state["epoch"]), float(state["elapsed"]), list(state["records"])
        if self.swa is not None:
            self.swa.load_state_dict(state["swa"]["model"])
            self.swa_steps, self.swa_finished = int(state["swa"]["steps"]), bool(state["swa"]["finished"])


def train(config: TrainConfig, *, data: Any = None, checkpoint: str | Path | None = None,
          log: Log | None = print, stop_after_epochs: int | None = None, download: bool = False,
          device: str | torch.device | None = "auto", compile_backend: str | None = None) -> TrainResult:
    """Train ``config`` to the end of its budget and return the records.

    Args:
        data: a loaded :class:`~sharpness.data.DatasetSplits` (default: load ``config.dataset``).
        checkpoint: a file path; written after every epoch and, if it exists, resumed from.
        log: called with one line per epoch (``None``: quiet).
        stop_after_epochs: stop after this many epochs of this call (for tests of resuming).
        download: fetch ``config.dataset`` if it is not on disk (not part of the run's identity).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``; under
            torchrun ``"cuda"`` is each process's ``cuda:LOCAL_RANK``. Not part of the run's identity (like the
            thread count, it changes results only at rounding level); the summary and the stored environment
            record it. Checkpoints resume on any device.
        compile_backend: ``torch.compile`` the network the training closures run with this backend
            (``"inductor"``, torch's default; ``"aot_eager"`` traces without generating code); ``None`` (default):
            eager. Not part of the run's identity (inductor's fused kernels change results at rounding level);
            the summary records it. Evaluation, checkpoints and the measures use the eager module (the same
            weights). Methods that differentiate twice (GNR ``hvp="exact"``) or back-propagate a graph several
            times (SSAM-F's per-example Fisher) raise a RuntimeError that says what to use instead.
    """
    from ..data import load_dataset
    from ..models import create_model

    device = resolve_device(device)
    compile_backend = check_compile_backend(compile_backend)
    check_optimizer(config)
    world = distributed_context(device)[1]
    if config.world_size != world:
        if config.world_size != 1:
            raise ValueError(f"Invalid world_size value: {config.world_size} (this run has {world} process"
                             f"{'es' if world > 1 else ''}; launch it with torchrun --nproc_per_node {config.world_size})")
        config = replace(config, world_size=world)
    if data is None:
        data = load_dataset(config.dataset, download=download, **config.dataset_options())
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.num_classes, input_shape=data.input_shape,
                         **config.model_options)
    run = _Run(config, data, model, device, compile_backend)
    if checkpoint is not None and Path(checkpoint).exists():
        run.load(load_checkpoint(checkpoint))
        if log is not None and run.rank == 0:
            done = "finished; its summary follows" if run.done() else "resuming"
            log(f"checkpoint {checkpoint}: {len(run.records)} epoch(s) done, {done}")
    epochs_this_call = 0
    while not run.done():
        run.train_epoch()
        epochs_this_call += 1
        if checkpoint is not None and run.rank == 0:
            save_checkpoint(checkpoint, run.state())
        if log is not None and run.rank == 0:
            r = run.records[-1]
            measured = "".join(f"  {k.removeprefix('sharpness.')} {v:.4g}" for k, v in r.items()
                               if k.startswith("sharpness.") and isinstance(v, float))
            validated = f"val acc {r['val_acc']:.4f}  " if "val_acc" in r else ""
            log(f"epoch {r['epoch']:3d}  train loss {r['train_loss']:.4f}  {validated}test acc {r['test_acc']:.4f}  "
                f"%SAM {100 * r['sam_fraction']:5.1f}  grad evals {r['grad_evals']}  {r['wall_time']:.1f}s{measured}")
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and not run.done():
            return TrainResult(config, {"finished": False}, run.records, run.model, run.optimizer)
    last = run.records[-1] if run.records else {}
    summary = {key: last.get(key) for key in ("test_acc", "test_loss", "train_loss", "steps", "sam_steps",
                                              "sam_fraction", "grad_evals", "wall_time")}
    summary.update({key: last[key] for key in ("val_acc", "val_loss") if key in last})  # with --validation
    summary.update({key: value for key, value in last.items() if key.startswith("sharpness.")})  # final measures
    summary.update(finished=True, epochs=run.epoch, planned_steps=run.total_steps, world_size=run.world,
                   device=device.type)
    if compile_backend is not None:
        summary["compile_backend"] = compile_backend
    if run.swa is not None:  # test_acc/test_loss above are the averaged model's
        summary.update(swa_snapshots=int(run.swa.n_averaged), swa_steps=run.swa_steps)
    return TrainResult(config, summary, run.records, run.model, run.optimizer)
