"""Shared test fixtures: tiny models, data, closures and the registry-driven construction of optimizers."""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sharpness

#: keyword arguments each registered optimizer needs beyond the base optimizer (required ones only)
REQUIRED_DEFAULTS: dict[str, Any] = {"total_steps": 100}


def registered_names() -> list[str]:
    return [info.name for info in sharpness.list_optimizers()]


def make_optimizer(name: str, base: torch.optim.Optimizer, **kwargs: Any) -> sharpness.SharpnessAwareOptimizer:
    info = sharpness.get_optimizer_info(name)
    for key, value in REQUIRED_DEFAULTS.items():
        if key in info.required:
            kwargs.setdefault(key, value)
        else:
            kwargs.pop(key, None)
    return sharpness.create(name, base, **kwargs)


#: keyword arguments a cross-cutting test may pass to every optimizer; dropped for a class that has no such
#: parameter (e.g. ``rho`` for Entropy-SGD or SALR)
SOFT_KWARGS = ("rho",)


def create_for_test(name: str, base: torch.optim.Optimizer, *, standard_closure: bool = True, **kwargs: Any):
    """``sharpness.create`` for tests that run every registered optimizer with their own closures.

    Drops soft keywords the class does not take, fills required ones, and (``standard_closure``) merges the
    class's ``standard_closure_options`` so the test's hand-written closure follows the instance's convention.
    """
    info = sharpness.get_optimizer_info(name)
    accepted = inspect.signature(info.cls.__init__).parameters
    for key in SOFT_KWARGS:
        if key in kwargs and key not in accepted:
            del kwargs[key]
    if standard_closure:
        kwargs = {**getattr(info.cls, "standard_closure_options", {}), **kwargs}
    return make_optimizer(name, base, **kwargs)


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


def classification_data(seed: int = 0, n: int = 64, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def make_closure(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 counter: list[int] | None = None) -> Callable[[], torch.Tensor]:
    """The closure ``opt`` expects (``sharpness.make_closure``: create_graph / per-sample losses by its flags)."""

    def compute_loss(reduction: str) -> torch.Tensor:
        if counter is not None:
            counter[0] += 1
        return nn.functional.cross_entropy(model(x), y, reduction=reduction)

    return sharpness.make_closure(opt, compute_loss)


def params_equal(a: nn.Module | list, b: nn.Module | list) -> bool:
    pa = list(a.parameters()) if isinstance(a, nn.Module) else list(a)
    pb = list(b.parameters()) if isinstance(b, nn.Module) else list(b)
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


def has_both_branches(name: str) -> bool:
    """Whether the optimizer can take both SAM (two-pass) and ERM (one-pass) steps."""
    info = sharpness.get_optimizer_info(name)
    return info.min_grad_evals_per_step == 1 and info.max_grad_evals_per_step == 2


def assert_nested_equal(a: Any, b: Any) -> None:
    """Dicts (same keys), lists/tuples (same type and length), tensors (``torch.equal``) and plain values, recursively."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_nested_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            assert_nested_equal(u, v)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def checkpoint_round_trip(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": ..., "opt": ...}`` state dicts through ``torch.save`` / ``torch.load(weights_only=True)`` in memory."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
