"""``torch.amp.GradScaler`` support for optimizers that take several gradient passes per step.

``GradScaler.unscale_`` may run only once per optimizer per step, and ``GradScaler.step`` does not accept a
closure, so multi-pass optimizers unscale each pass themselves and then record the combined inf/NaN flag
where ``GradScaler.update()`` reads it. The recording touches ``GradScaler._per_optimizer_states`` (stable
since torch 1.6, unchanged through 2.x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._foreach import group_by_device_dtype, is_sharded
from .distributed import all_reduce_mean_, is_distributed

__all__: list[str] = []


@torch.no_grad()
def unscale_(scaler: torch.amp.GradScaler, grads: list[Tensor], found_inf: Tensor) -> None:
    """Divide ``grads`` by the current scale in place and OR a non-finite flag into ``found_inf`` (no sync)."""
    scale = getattr(scaler, "_scale", None)
    if scale is None:
        raise RuntimeError(
            "GradScaler has no scale yet: call scaler.scale(loss).backward() in the closure before step()"
        )
    inv_scale = scale.double().reciprocal().float()
    # FSDP2: each rank checks its own shards, so an inf in any rank's shards must flag every rank's step (one
    # all-reduce of this call's flags)
    sharded = bool(grads) and is_sharded(grads[0]) and is_distributed()
    flags = torch.zeros_like(found_inf) if sharded else found_inf
    for (bucket,) in group_by_device_dtype(grads):
        device = bucket[0].device
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(bucket, flag, inv_scale.to(device))
        flags.add_(flag.to(flags.device))
    if sharded:
        found_inf.add_(all_reduce_mean_(flags))


def check_not_unscaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Refuse gradients the user already unscaled (``scaler.unscale_(optimizer)`` before ``first_step``, the
    usual recipe before clipping): the engine unscales each pass itself, and a second division by the scale would
    shrink the applied gradient by it (1/1024 on an ERM step)."""
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED:
        raise RuntimeError(
            f"{type(optimizer).__name__}: scaler.unscale_(optimizer) was called before this step; the optimizer "
            "unscales each gradient pass itself (for clipping pass max_grad_norm=...), so remove that call"
        )


def record_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """Tell ``scaler.update()`` whether this optimizer's step saw an inf/NaN, as ``scaler.step`` would."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    state["stage"] = OptState.STEPPED
    state["found_inf_per_device"] = {found_inf.device: found_inf.clamp(max=1.0)}
