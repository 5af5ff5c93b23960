"""The non-finite-loss guard shared by every optimizer's ``step(closure)``.

A NaN or inf loss in any pass of a step (the perturbed pass included, whose loss ``step`` does not return)
would otherwise flow through the gradients into the weights and the base optimizer's state. The losses the
closure returns during a step are kept on their device (no host read while the step runs) and checked once,
right before the base optimizer's update, when every method has already put the weights back at ``w``: a bad
step raises ``FloatingPointError`` with the weights and the base optimizer's state unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _foreach
from ..distributed import has_sharded_params, is_distributed

__all__: list[str] = []


class FiniteLossCheck:
    """Mixin: ``_watch_losses(closure)`` at the start of ``step``, ``_check_losses()`` before the base update.

    The instance sets ``check_finite`` (bool) and, under DDP, ``_ddp`` (the wrapped model or None): with a
    DDP model, or parameters sharded by FSDP2, the verdict is reduced over the ranks, so every rank raises
    together (no rank waits alone in the next collective). Costs two small kernels and one host read per step
    on a device (reads of scalar losses alone on the CPU); ``check_finite=False`` removes it.
    """

    check_finite: bool
    _ddp: Any = None
    _step_losses: list[Tensor] | None = None

    def _reduces_over_ranks(self) -> bool:
        """Whether the verdict is reduced over the ranks: under DDP (``_ddp``) or with parameters sharded by FSDP2
        (``DTensor`` s; each rank sees its own data's losses), in a process group of more than one rank."""
        return is_distributed() and (self._ddp is not None or has_sharded_params(getattr(self, "param_groups", [])))

    def _watch_losses(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure``, recording the loss of each call (detached; floats as tensors) for :meth:`_check_losses`."""
        self._step_losses = losses = []
        if not self.check_finite:
            return closure

        def watched() -> Any:
            out = closure()
            if isinstance(out, Tensor):
                losses.append(out.detach())  # a reference: no kernel while the step runs
            elif isinstance(out, (int, float)):
                losses.append(torch.tensor(float(out)))
            return out

        return watched

    def _check_losses_if_free(self) -> None:
        """Raise as :meth:`_check_losses` now, where that costs nothing: scalar CPU losses, one process, no
        GradScaler. After pass 1 this stops a NaN step before the climb, whose perturbed pass would run at
        ``w + rho * NaN`` and write NaN into BatchNorm running statistics the optimizer cannot restore without
        ``model=``. On a device the one read stays at the update (pass ``model=`` there to keep the statistics)."""
        total = self._free_total(self._step_losses or [])
        if total is not None and not math.isfinite(total):
            self._check_losses()

    def _free_total(self, losses: list[Tensor]) -> float | None:
        """The sum of ``losses`` read in Python where that waits for nothing (scalars on the CPU, one process);
        ``None`` where it would take a kernel and a host synchronisation (or an all-reduce)."""
        if (not losses or self._reduces_over_ranks()
                or not all(loss.dim() == 0 and _foreach.host_read_is_free(loss) for loss in losses)):
            return None
        return sum(loss.item() for loss in losses)

    def _check_losses(self) -> None:
        """Raise ``FloatingPointError`` if a loss recorded in this step is NaN or inf (one host read).

        Every loss recorded is finite iff their sum is (NaN and inf propagate through a sum; it is taken in
        float64, so finite float32 losses cannot overflow it): two kernels (concatenate, sum) and one read,
        whatever the number of passes. Scalar losses on the CPU, where a read waits for nothing, are read and
        summed in Python instead (no kernel). The per-pass values are only looked at on the error path.
        """
        losses, self._step_losses = self._step_losses, None
        scaler = getattr(self, "grad_scaler", None)
        if not losses or (scaler is not None and scaler.is_enabled()):  # the scaler skips such steps itself
            return
        distributed = self._reduces_over_ranks()
        total = self._free_total(losses)  # CPU scalars: reading them is free, no kernel needed
        if total is None:
            device = losses[0].device
            dtype = _foreach.sum_dtype(device)
            if all(loss.dim() == 0 and loss.device == device for loss in losses):  # the usual: scalars, one device
                total = torch.stack(losses).sum(dtype=dtype)
            else:
                total = torch.cat([loss.reshape(-1).to(device) for loss in losses]).sum(dtype=dtype)
            if distributed:
                dist.all_reduce(total)  # a bad pass on any rank stops every rank
            total = total.item()  # the one host read
        if math.isfinite(total):
            return
        bad = next((i for i, loss in enumerate(losses) if not bool(torch.isfinite(loss).all())), None)
        if bad is None and not distributed:
            return  # finite float64 losses whose sum overflowed
        values = ", ".join(f"{loss.float().sum().item():.4g}" for loss in losses)
        where = f"pass {bad + 1} of this step" if bad is not None else "a pass of this step on another rank"
        raise FloatingPointError(
            f"{type(self).__name__}: non-finite loss in {where} (losses {values}); the update was "
            "not applied and the weights are unchanged. Lower the learning rate or rho, or pass "
            "check_finite=False to let the base optimizer see the non-finite gradients"
        )
