"""Per-parameter optimizer state shared by the optimizers: preallocated scratch buffers."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._foreach import group_by_device_dtype, local
from ._checkpoint import is_state_initialization, pack, unpack

__all__: list[str] = []


def scratch_buffers(state: dict[Tensor, dict[str, Any]], params: Iterable[Tensor], key: str) -> list[Tensor]:
    """``state[p][key]`` for each parameter: a buffer shaped like ``p``, allocated on first use and reused
    afterwards (reallocated only if the parameter's shape, dtype or device changed), so no step allocates a
    parameter-sized tensor."""
    buffers = []
    for p in params:
        per_param = state[p]
        buf = per_param.get(key)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            per_param[key] = buf
        buffers.append(buf)
    return buffers


def flat_scratch_buffers(state: dict[Tensor, dict[str, Any]], params: list[Tensor],
                         key: str) -> tuple[list[Tensor], list[Tensor]]:
    """``state[p][key]`` for each parameter as a view into one flat buffer per (device, dtype) bucket, and those
    flat buffers: an op that fills every buffer (a random draw) is then one kernel per bucket, not one per tensor.

    The views are what the state holds, so memory accounting sees the same bytes as with
    :func:`scratch_buffers`. A bucket is reallocated if any of its parameters changed shape, dtype or device, or
    its views are not (all) views of one flat buffer of the bucket's size.
    """
    flats: list[Tensor] = []
    views: list[Tensor | None] = [None] * len(params)
    # (a DTensor parameter's buffer is shaped like its local shard: the noise is drawn per shard)
    for bucket, index in group_by_device_dtype(local(params), list(range(len(params)))):
        numels = [p.numel() for p in bucket]
        current = [state[params[i]].get(key) for i in index]
        base = current[0]._base if current[0] is not None else None
        reusable = base is not None and base.dim() == 1 and base.numel() == sum(numels) and all(
            v is not None and v._base is base and v.shape == p.shape and v.dtype == p.dtype and v.device == p.device
            for v, p in zip(current, bucket, strict=True))
        if not reusable:
            base = torch.empty(sum(numels), dtype=bucket[0].dtype, device=bucket[0].device)
            current = [chunk.view(p.shape) for chunk, p in zip(base.split(numels), bucket, strict=True)]
            for i, v in zip(index, current, strict=True):
                state[params[i]][key] = v
        flats.append(base)
        for i, v in zip(index, current, strict=True):
            views[i] = v
    return flats, views  # type: ignore[return-value]  (every index is in one bucket)


class ScratchLists:
    """:func:`scratch_buffers` lists remembered per key, so a step does not re-validate every buffer.

    A list is reused while the same parameters sit in the same storage (their data pointers: ``model.to()``, a
    dtype change or ``p.data = ...`` all move them) and is rebuilt, validated, otherwise. :meth:`clear` after
    the optimizer's state is replaced (``load_state_dict``). Copies and pickles of an optimizer start empty.
    """

    def __init__(self) -> None:
        self._lists: dict[str, tuple[tuple[int, ...], list[Tensor]]] = {}
        self._flat: dict[str, tuple[tuple[int, ...], list[Tensor], list[Tensor]]] = {}

    def get(self, state: dict[Tensor, dict[str, Any]], params: list[Tensor], key: str) -> list[Tensor]:
        signature = tuple(p.data_ptr() for p in params)
        hit = self._lists.get(key)
        # (the identity check on the first buffer also catches a state that was cleared or replaced)
        if hit is not None and hit[0] == signature and (not params or state[params[0]].get(key) is hit[1][0]):
            return hit[1]
        buffers = scratch_buffers(state, params, key)
        self._lists[key] = (signature, buffers)
        return buffers

    def get_flat(self, state: dict[Tensor, dict[str, Any]], params: list[Tensor],
                 key: str) -> tuple[list[Tensor], list[Tensor]]:
        """:func:`flat_scratch_buffers` ``(flats, views)``, remembered as :meth:`get` remembers its lists."""
        signature = tuple(p.data_ptr() for p in params)
        hit = self._flat.get(key)
        if hit is not None and hit[0] == signature and (not params or state[params[0]].get(key) is hit[2][0]):
            return hit[1], hit[2]
        flats, views = flat_scratch_buffers(state, params, key)
        self._flat[key] = (signature, flats, views)
        return flats, views

    def clear(self) -> None:
        self._lists.clear()
        self._flat.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lists = {}
        self._flat = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> ScratchLists:
        return ScratchLists()


class SharesBaseParamGroups:
    """Mixin for an optimizer that wraps ``self.base_optimizer`` and shares its param-group dicts.

    ``param_groups`` *is* the base optimizer's list (so torch LR schedulers stepping the wrapper drive the base),
    new groups go to the base, and pickling/deepcopy keep the plain instance ``__dict__`` (torch.optim's own
    ``__getstate__`` would try to rebuild ``param_groups`` as an attribute). List it before
    ``torch.optim.Optimizer`` in the bases.
    """

    base_optimizer: torch.optim.Optimizer
    #: the update is right for a base optimizer with ``maximize=True`` (equal to minimizing the negated loss);
    #: False where the method climbs the loss it is given (SAM's perturbation): such a group is refused
    supports_maximize: ClassVar[bool] = False
    #: complex parameters are optimized as their real view (torch.optim's convention, tested per class);
    #: False: a group holding one is refused
    supports_complex: ClassVar[bool] = False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and not self.supports_maximize and \
                param_group.get("maximize", self.base_optimizer.defaults.get("maximize", False)):
            name = type(self).__name__
            raise ValueError(f"Invalid maximize value: True ({name} does not support a base optimizer with "
                             "maximize=True: its sharpness term is built for minimizing the loss the closure "
                             "returns, so it would favour sharp maxima; minimize the negated objective instead, "
                             "loss = -objective with maximize=False)")
        self.base_optimizer.add_param_group(param_group)
        if not self.supports_complex and any(torch.is_complex(p) for p in self.base_optimizer.param_groups[-1]["params"]):
            self.base_optimizer.param_groups.pop()
            raise ValueError(f"Invalid parameter dtype: complex ({type(self).__name__} does not support complex "
                             "parameters; optimize their real view, torch.view_as_real, in a parametrization)")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass's ``state_dict``/``load_state_dict`` runs the hooks registered on the wrapper, once.

        The wrappers build their state from the base optimizer's (whose own hooks run there), so
        ``torch.optim.Optimizer``'s hook loop never sees the wrapper. Each class's resolved method (its own, or
        a mixin's earlier in the MRO) is wrapped; an instance flag makes only the outermost call run the hooks,
        in torch's order and with its return-value rules. The outermost call also converts between the layout
        the methods build and read (native) and the public one (:mod:`._checkpoint`).
        """
        super().__init_subclass__(**kwargs)
        for name, wrap in (("state_dict", _runs_save_hooks), ("load_state_dict", _runs_load_hooks)):
            method = getattr(cls, name)
            if not getattr(method, "_runs_hooks", False):
                setattr(cls, name, wrap(method))
        own_step = cls.__dict__.get("step")
        if own_step is not None and not getattr(own_step, "_initializes_state", False):
            cls.step = _initializes_state(own_step)  # type: ignore[method-assign]

    def _initialize_state(self) -> None:
        """DCP's state initialization (:func:`._checkpoint.is_state_initialization`): the base optimizer
        allocates its state by a step at learning rate 0 over the zero gradients, unless it already holds state
        (loaded, or from earlier steps: a step would move its momenta). No counter moves, no weight changes."""
        if not self.base_optimizer.state:
            self.base_optimizer.step()

    def __getstate__(self) -> dict[str, Any]:
        """The instance ``__dict__`` without what torch.optim's own ``__getstate__`` drops too: the hooks, and
        the ``step`` an LR scheduler patches onto the instance (a closure over a weak reference to *this*
        optimizer: copied, it would step the original; pickled, it fails)."""
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        torch.optim.Optimizer.__setstate__(self, state)  # type: ignore[arg-type]  # empty hook dicts, step profiling


def check_steps_without_closure(name: str, base: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Refuse a base optimizer whose ``step`` requires a closure (LBFGS re-evaluates the loss itself): the
    wrappers hand it the gradients they combined and call ``step()`` without one."""
    closure = inspect.signature(type(base).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(f"{name} cannot wrap {type(base).__name__}: its step() requires a closure (it evaluates "
                        f"the loss itself), while {name} computes the gradients and calls step() without one; use "
                        "a first-order base optimizer such as torch.optim.SGD or torch.optim.AdamW")
    return base


#: instance attributes a copy or a pickle of a wrapper leaves out (see ``SharesBaseParamGroups.__getstate__``)
_NOT_COPIED = frozenset({
    "step", "_opt_called", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
})


def _outermost(flag: str, method: Callable[..., Any], with_hooks: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with ``with_hooks`` around it on the outermost call per instance (``flag`` marks the call)."""

    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:  # (DCP passes ``state_dict=`` by keyword)
        if self.__dict__.get(flag):
            return method(self, *args, **kwargs)
        self.__dict__[flag] = True
        try:
            return with_hooks(self, functools.partial(method, self), *args, **kwargs)
        finally:
            del self.__dict__[flag]

    wrapped._runs_hooks = True  # type: ignore[attr-defined]
    return wrapped


def _initializes_state(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` that answers DCP's ``step()`` without a closure at learning rate 0 over zero gradients (it builds
    the state of a fresh optimizer before loading a checkpoint into it) by initializing the state; any other
    call goes to ``step``, which refuses a missing closure as before."""

    @functools.wraps(step)
    def wrapped(self: Any, closure: Any = None, *args: Any, **kwargs: Any) -> Any:
        if closure is None and not args and not kwargs and is_state_initialization(self):
            self._initialize_state()
            return None
        return step(self, closure, *args, **kwargs)

    wrapped._initializes_state = True  # type: ignore[attr-defined]
    return wrapped


def _save_with_hooks(self: Any, save: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    for hook in self._optimizer_state_dict_pre_hooks.values():
        hook(self)
    state = pack(save())  # the public layout (_checkpoint): the hooks see what the caller gets
    for hook in self._optimizer_state_dict_post_hooks.values():
        result = hook(self, state)
        if result is not None:
            state = result
    return state


def _load_with_hooks(self: Any, load: Callable[[dict[str, Any]], None], state_dict: dict[str, Any]) -> None:
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()  # as torch does: the pre-hooks may edit the top level
    for hook in self._optimizer_load_state_dict_pre_hooks.values():
        result = hook(self, state_dict)
        if result is not None:
            state_dict = result
    load(unpack(state_dict))  # the methods read the native layout
    for hook in self._optimizer_load_state_dict_post_hooks.values():
        hook(self)


def _runs_save_hooks(method: Callable[..., Any]) -> Callable[..., Any]:
    return _outermost("_saving_state", method, _save_with_hooks)


def _runs_load_hooks(method: Callable[..., Any]) -> Callable[..., Any]:
    return _outermost("_loading_state", method, _load_with_hooks)
