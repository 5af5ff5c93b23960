"""Keep BatchNorm running statistics from the unperturbed pass only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["frozen_running_stats", "RunningStatsGuard"]


class RunningStatsGuard:
    """Snapshots every BatchNorm buffer (running mean/var, batch counter) of ``model`` and restores it exactly.

    Unlike setting ``momentum = 0`` (which still bumps ``num_batches_tracked`` and, with ``momentum=None``,
    uses a cumulative average) or switching to eval mode (which changes the forward pass), a snapshot/restore
    leaves the perturbed forward pass identical to training mode and the statistics bit-identical to what
    the unperturbed pass produced. Only normalization buffers are copied, never parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    @torch.no_grad()
    def save(self) -> None:
        saved = []
        for module in self._modules:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(module, name, None)
                if buf is not None:
                    saved.append((buf, buf.clone()))
        self._saved = saved

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            return
        for buf, copy in self._saved:
            buf.copy_(copy)
        self._saved = None


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Context manager: forward passes inside it leave BatchNorm running statistics unchanged.

    Example::

        loss_fn(model(x), y).backward()          # updates running stats
        opt.first_step(zero_grad=True)
        with sharpness.frozen_running_stats(model):
            loss_fn(model(x), y).backward()      # perturbed pass: statistics untouched
        opt.second_step()
    """
    guard = RunningStatsGuard(model)
    guard.save()
    try:
        yield
    finally:
        guard.restore()
