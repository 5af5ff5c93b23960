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
