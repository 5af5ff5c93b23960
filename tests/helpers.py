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


def native(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A wrapper's ``state_dict`` in the layout its methods read: the wrapper's entry at ``["sharpness"]`` (with
    its per-parameter tensors under ``["param_state"]``), the groups and state as the base optimizer's."""
    from sharpness.optim._checkpoint import unpack

    return unpack(state_dict)


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


def run_spawned(worker: Callable[[int, str, str], None], world: int, tmp: Any, join_timeout_s: float) -> list[dict]:
    """Run ``worker(rank, init_file, out_dir)`` in ``world`` spawned processes and return each rank's results,
    which the worker saves to ``out_dir/rank{rank}.pt`` (a dict; ``{"error": traceback}`` on failure).

    A hang fails the test (hard join timeout) instead of blocking the run; a rank's error fails it with that
    rank's traceback."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, str(tmp / "init"), str(tmp)), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + join_timeout_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    if hung:
        pytest.fail(f"worker processes did not finish within {join_timeout_s}s (hang)")
    results = []
    for rank, p in enumerate(procs):
        path = tmp / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} exited with code {p.exitcode} and wrote no result"
        res = torch.load(path, weights_only=False)
        if "error" in res:
            pytest.fail(f"rank {rank} failed:\n{res['error']}")
        assert p.exitcode == 0, f"rank {rank} exit code {p.exitcode}"
        results.append(res)
    return results


def run_scenarios(rank: int, init_file: str, out_dir: str, world: int, timeout_s: float,
                  scenarios: Callable[[int, dict], Any]) -> None:
    """The body of a spawned worker: join a gloo group of ``world`` ranks, run the generator ``scenarios(rank,
    result)`` (it fills ``result`` and yields each scenario's name before running it), then save ``result``, or
    the traceback of the failing scenario, to ``out_dir/rank{rank}.pt`` for :func:`run_spawned`."""
    import datetime
    import os
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict = {}
    scenario = "init_process_group"
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        for scenario in scenarios(rank, result):  # (the name is reported on failure)
            pass
        scenario = "barrier"
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent process
        result = {"error": f"in scenario {scenario}:\n{traceback.format_exc()}"}
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()
