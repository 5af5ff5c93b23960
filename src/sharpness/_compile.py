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

A compiled *optimizer step* (``torch.compile(opt.step)``, or a compiled training function that calls
``opt.step(closure)`` or the two-phase API) is another matter: dynamo drops attribute writes on
``torch.optim.Optimizer`` subclasses (pytorch/pytorch#171590), so a compiled SAM step counted half its gradient
evaluations, lost its phase and took a different step. Every step-like method of our optimizers therefore runs as
plain PyTorch when compiled code reaches it (:class:`EagerUnderCompile`, as torch.optim's own ``zero_grad`` and
``state_dict`` do): the step is the eager step bit for bit, and a compiled model inside the closure stays compiled.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = [
    "EagerUnderCompile", "accepts_compiled", "eager_under_compile", "is_compiled_double_backward_error", "uncompiled",
]

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


#: the methods :class:`EagerUnderCompile` runs eagerly: every one that changes the optimizer's Python state
EAGER_METHODS = ("step", "first_step", "second_step", "abort_step", "zero_grad", "state_dict", "load_state_dict")


def eager_under_compile(function: F) -> F:
    """Decorator: ``function`` runs as plain PyTorch, with every call it makes, when compiled code reaches it.

    An eager call costs one ``torch.compiler.is_compiling()`` check. Compiled code calls torch's lazy
    ``torch.compiler.disable(recursive=True)`` wrapper (``torch._disable_dynamo``, the one torch.optim's own
    ``zero_grad`` and ``state_dict`` use; it imports dynamo only when called), which sits outside the traced region,
    so a ``fullgraph=True`` compile names the skipped function where the graph breaks.
    """
    disabled = torch._disable_dynamo(function, recursive=True)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return function(*args, **kwargs)

    wrapper.__sharpness_eager__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


class EagerUnderCompile:
    """Mixin for optimizers: each method named in :data:`EAGER_METHODS` that a class (or a user's subclass)
    defines is wrapped by :func:`eager_under_compile` when the class is created."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in EAGER_METHODS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "__sharpness_eager__", False):
                setattr(cls, name, eager_under_compile(method))
