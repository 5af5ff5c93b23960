"""What reaches torch's dispatcher during a step, counted: the probe of ``benchmarks/bench_step.py``'s kernel
column and of ``tests/test_memory.py``'s kernel and host-read budgets (one counter for both); and the peak of the
CPU allocator during a step (the benchmark's "step peak" column and the test's peak budgets)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from . import _foreach

__all__: list[str] = []


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher, unless ``paused`` (see :meth:`pause`).

    ``ops``: every op by name. ``kernels``: the ops that are not views and not profiler markers (torch.optim's
    ``record_function``), one launch each on a GPU (a fused ``_foreach_*`` op is one). ``reads``:
    ``_local_scalar_dense``, a tensor-to-Python read (``.item()``, ``float(t)``, ``bool(t)``), a host
    synchronisation when the tensor lives on a GPU (not counted among the kernels).
    """

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.ops: Counter[str] = Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.paused:
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            if name != "_local_scalar_dense" and not func.is_view and func.namespace != "profiler":
                self.kernels += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return self.ops["_local_scalar_dense"]

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Nothing is counted inside (the gradient passes, when counting a method's own work)."""
        before, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = before


@contextlib.contextmanager
def device_read_path() -> Iterator[None]:
    """The code path a GPU runs, on any device: the CPU-only shortcut that reads 0-d scales for free is off."""
    saved = _foreach.host_read_is_free
    _foreach.host_read_is_free = lambda tensor: False
    try:
        yield
    finally:
        _foreach.host_read_is_free = saved


def cpu_peak_bytes(fn: Callable[[], Any], *, calls: int = 3) -> int:
    """Peak bytes the CPU allocator held during ``fn()`` above its level at the start, closures and backward
    passes included: the allocator's own ``Total Allocated`` counter, read from the profiler's memory events.

    ``fn`` runs ``calls + 1`` times and the result is the largest peak of the last ``calls``: the profiler learns
    the size of a block only once it has seen it allocated while profiling, so the first call (which frees what
    earlier calls allocated) is not counted."""
    _profiled_peak(fn)
    return max(_profiled_peak(fn) for _ in range(calls))


def _profiled_peak(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path) as file:
            events = [e for e in json.load(file)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.unlink(path)
    if not events:
        return 0
    events.sort(key=lambda e: e["ts"])
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs two lines per session there); a no-op where
    ``sys.stderr`` has no descriptor (pytest's capture)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
