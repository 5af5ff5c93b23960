"""What every measure shares: batches, weighted losses and gradients, model-mode handling, parameter vectors.

A "vector" here is a list of tensors shaped like the trainable parameters (what ``torch.autograd.grad``
returns), so no flattening copies are needed; ``dot`` and ``norm`` work on such lists.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_choice
from ..batchnorm import RunningStatsGuard

__all__ = ["Batch", "LossFn", "as_batches", "batch_loss", "batch_randomness", "gradient", "mean_loss",
           "measurement_mode", "trainable_parameters"]

LossFn = Callable[[Any, Any], Tensor]
Batch = tuple[Any, Any]
Vector = list[Tensor]

MODES = ("eval", "train")

# In a train-mode measurement: the seed of each batch seen so far, keyed by where its inputs live (None in eval)
_BATCH_SEEDS: contextvars.ContextVar[dict[tuple[Any, ...], int] | None] = contextvars.ContextVar(
    "sharpness_batch_seeds", default=None)


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0] if inputs.dim() > 0 else 1
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], Tensor):
        return inputs[0].shape[0]
    raise TypeError(f"Invalid inputs type: {type(inputs).__name__} (expected a tensor or a tuple of tensors)")


def _is_single_batch(data: Any) -> bool:
    """``(inputs, targets)`` with tensor targets and tensor (or tuple-of-tensor) inputs."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)):
        return False
    inputs = data[0]
    return isinstance(inputs, Tensor) or (
        isinstance(inputs, (tuple, list)) and bool(inputs) and all(isinstance(t, Tensor) for t in inputs))


def as_batches(data: Batch | Iterable[Batch]) -> list[tuple[Any, Any, int]]:
    """Normalize ``data`` to a list of ``(inputs, targets, batch_size)``.

    ``data`` is one ``(inputs, targets)`` pair of tensors or an iterable of such pairs (a DataLoader). An
    iterable is consumed once and kept, so every estimator iteration sees the same batches.
    """
    if _is_single_batch(data):
        pairs: Iterable[Any] = [data]
    elif isinstance(data, Iterable):
        pairs = data
    else:
        raise TypeError(f"Invalid data type: {type(data).__name__} (expected an (inputs, targets) batch or an "
                        "iterable of batches)")
    batches = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"Invalid batch: {type(pair).__name__} (expected an (inputs, targets) pair)")
        inputs, targets = pair
        size = _batch_size(inputs)
        if size == 0:
            continue
        batches.append((inputs, targets, size))
    if not batches:
        raise ValueError("Invalid data: no samples (expected at least one non-empty (inputs, targets) batch)")
    return batches


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model type: {type(model).__name__} (expected a torch.nn.Module)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("Invalid model: it has no parameters with requires_grad=True (nothing to measure)")
    return params


def check_mode(mode: str) -> str:
    """Validate a measurement mode name (``"eval"`` or ``"train"``)."""
    return check_choice("mode", mode, MODES)


@contextlib.contextmanager
def measurement_mode(model: nn.Module, mode: str = "eval") -> Iterator[None]:
    """Run a measurement in ``mode`` and restore every module's training flag (and BatchNorm buffers) after.

    ``"eval"`` (default): dropout off, BatchNorm uses its running statistics, so the loss is a deterministic
    function of the weights. ``"train"``: the training-mode loss (BatchNorm batch statistics, dropout on);
    running statistics are restored afterwards, so measuring never changes the model. Dropout masks are frozen
    per batch (:func:`batch_randomness`): every forward on the same batch draws the same masks, so the loss is
    still a function of the weights (the network with that batch's masks), ``H`` a fixed matrix, and the global
    random streams are left as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model type: {type(model).__name__} (expected a torch.nn.Module)")
    check_mode(mode)
    flags = [(module, module.training) for module in model.modules()]
    guard = RunningStatsGuard(model)
    guard.save()
    model.train(mode == "train")
    token = _BATCH_SEEDS.set({} if mode == "train" else None)
    try:
        yield
    finally:
        _BATCH_SEEDS.reset(token)
        guard.restore()
        for module, training in flags:
            module.training = training


def _first_tensor(inputs: Any) -> Tensor:
    return inputs if isinstance(inputs, Tensor) else inputs[0]


@contextlib.contextmanager
def batch_randomness(inputs: Any) -> Iterator[None]:
    """Run a forward on ``inputs`` with that batch's own random stream inside a train-mode
    :func:`measurement_mode` (a no-op elsewhere).

    Batch ``i`` (in order of first use, keyed by its inputs' storage, so a slice seen again counts as the same
    batch) draws from seed ``i`` on the CPU generator and the inputs' device generator, forked so the global
    streams are untouched. Without this a train-mode Hessian would be a random operator: each product, and each
    side of a finite difference, would draw new dropout masks (a finite-difference HVP of a dropout MLP came
    out about 2,700 times the eval-mode top eigenvalue instead of about 1).
    """
    seeds = _BATCH_SEEDS.get()
    if seeds is None:
        yield
        return
    first = _first_tensor(inputs)
    key = (first.device, first.data_ptr(), tuple(first.shape), first.stride())
    seed = seeds.setdefault(key, len(seeds))
    device = first.device
    forked = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.default_generator.manual_seed(seed)
        if forked:
            torch.cuda.default_generators[forked[0]].manual_seed(seed)
        yield


def batch_loss(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any) -> Tensor:
    with batch_randomness(inputs):
        outputs = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"Invalid loss_fn output: shape {shape} (expected a scalar tensor, e.g. reduction='mean')")
    return loss


@torch.no_grad()
def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Any, Any, int]]) -> float:
    """The loss over all batches, each batch's (mean) loss weighted by its size."""
    total = sum(batch_loss(model, loss_fn, x, y).double() * n for x, y, n in batches)
    return float(total) / sum(n for _, _, n in batches)


def gradient(model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Any, Any, int]],
             params: Sequence[Tensor]) -> tuple[float, Vector]:
    """``(L(w), grad L(w))`` over all batches (size-weighted mean), without touching ``p.grad``."""
    total_n = sum(n for _, _, n in batches)
    grads = [torch.zeros_like(p) for p in params]
    loss_sum = 0.0
    with torch.enable_grad():
        for x, y, n in batches:
            loss = batch_loss(model, loss_fn, x, y)
            parts = torch.autograd.grad(loss, params, allow_unused=True)
            weight = n / total_n
            for acc, part in zip(grads, parts):
                if part is not None:
                    acc.add_(part, alpha=weight)
            loss_sum += float(loss.detach()) * weight
    return loss_sum, grads


# ---------------------------------------------------------------------- parameter-shaped vector algebra
def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum(dtype=torch.float64) for x, y in zip(xs, ys, strict=True))


def norm(xs: Sequence[Tensor]) -> Tensor:
    return dot(xs, xs).sqrt()


def rademacher(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """``+-1`` entries drawn on CPU from ``generator``, as int8: no float64 temporaries on the host (4x less host
    time than drawing floats), and a copy to the device moves one byte per entry; convert there."""
    return torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8).mul_(2).sub_(1)


def random_vector(params: Sequence[Tensor], generator: torch.Generator, kind: str = "gaussian") -> Vector:
    """A random parameter-shaped vector drawn on CPU from ``generator`` (reproducible across devices)."""
    out = []
    for p in params:
        if kind == "gaussian":
            v = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        elif kind == "rademacher":
            v = rademacher(p.shape, generator)
        else:
            raise ValueError(f"Invalid kind value: {kind!r} (expected 'gaussian' or 'rademacher')")
        out.append(v.to(device=p.device).to(dtype=p.dtype))  # converted where it lands
    return out


@contextlib.contextmanager
def shifted_parameters(params: Sequence[Tensor], shift: Sequence[Tensor], scale: float = 1.0) -> Iterator[None]:
    """Temporarily set ``w <- w + scale * shift``; the exact original weights are restored afterwards."""
    backup = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, s in zip(params, shift, strict=True):
                p.add_(s, alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
