"""``torch.compile``'d models: the measures run them eagerly, and double backward gets a clear error.

``torch.compile(model)`` returns an ``OptimizedModule`` that shares the model's parameters and buffers
(``model.compile()`` compiles the module in place). Training through a compiled model works with every optimizer
that needs first-order gradients only (tested against the eager model in ``tests/test_compile.py``). Two things
do not go through a compiled graph:

* double backward (``torch.compile with aot_autograd does not currently support double backward``): Hessian
  measures and GNR's exact Hessian-vector products;
* the wrapper's state dict, whose keys carry an ``_orig_mod.`` prefix.

So every measure runs eagerly (:func:`accepts_compiled`): on the module a wrapper holds, with compilation off
(``torch.compiler.set_stance("force_eager")``): the same function of the same weights.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["accepts_compiled", "is_compiled_double_backward_error", "uncompiled"]

F = TypeVar("F", bound=Callable[..., Any])


def uncompiled(obj: Any) -> Any:
    """The module a ``torch.compile`` wrapper holds (unwrapped repeatedly); anything else as it is."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing can have been compiled
    optimized = getattr(eval_frame, "OptimizedModule", None)
    while optimized is not None and isinstance(obj, optimized):
        obj = obj._orig_mod
    return obj


def accepts_compiled(function: F) -> F:
    """Decorator: run ``function`` eagerly. Every argument that is a ``torch.compile`` wrapper is passed as the
    module it holds, and compiled code inside (``model.compile()``, a compiled loss) runs as plain PyTorch."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:  # nothing compiled yet (and no 2 s import of dynamo here)
            return function(*args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return function(*(uncompiled(a) for a in args), **{k: uncompiled(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def is_compiled_double_backward_error(error: BaseException) -> bool:
    """True for the errors torch raises when a backward through a compiled graph is asked for a graph of its own
    (``create_graph=True``, or ``retain_graph=True`` with donated buffers) or is differentiated again."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("double backward" in text and "aot_autograd" in text
                                                or "donated buffers" in text)
