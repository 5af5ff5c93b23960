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
