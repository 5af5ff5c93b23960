"""Per-parameter optimizer state shared by the optimizers: preallocated scratch buffers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

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


class ScratchLists:
    """:func:`scratch_buffers` lists remembered per key, so a step does not re-validate every buffer.

    A list is reused while the same parameters sit in the same storage (their data pointers: ``model.to()``, a
    dtype change or ``p.data = ...`` all move them) and is rebuilt, validated, otherwise. :meth:`clear` after
    the optimizer's state is replaced (``load_state_dict``). Copies and pickles of an optimizer start empty.
    """

    def __init__(self) -> None:
        self._lists: dict[str, tuple[tuple[int, ...], list[Tensor]]] = {}

    def get(self, state: dict[Tensor, dict[str, Any]], params: list[Tensor], key: str) -> list[Tensor]:
        signature = tuple(p.data_ptr() for p in params)
        hit = self._lists.get(key)
        # (the identity check on the first buffer also catches a state that was cleared or replaced)
        if hit is not None and hit[0] == signature and (not params or state[params[0]].get(key) is hit[1][0]):
            return hit[1]
        buffers = scratch_buffers(state, params, key)
        self._lists[key] = (signature, buffers)
        return buffers

    def clear(self) -> None:
        self._lists.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lists = {}

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

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
