"""What reaches torch's dispatcher during a step, counted: the probe of ``benchmarks/bench_step.py``'s kernel
column and of ``tests/test_memory.py``'s kernel and host-read budgets (one counter for both)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
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
