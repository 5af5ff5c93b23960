"""Per-sample gradients ``grad f_j(w)`` with ``torch.func`` (``vmap`` over the samples of ``grad``).

Each sample is run through the model as a batch of one, so ``loss_fn`` with ``reduction="mean"`` gives the
sample's own loss ``f_j``. Used by SALR's Algorithm 2 (per-sample normalized gradients) and by the
per-sample gradient variance (AE-SAM's Assumption 3.2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .._attention import math_attention
from ._common import LossFn, batch_randomness

__all__: list[str] = []


def check_per_sample_mode(model: nn.Module, mode: str) -> None:
    """Per-sample losses are undefined with batch statistics: reject BatchNorm in train mode."""
    if mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("Invalid mode value: 'train' with BatchNorm (per-sample gradients need per-sample "
                         "losses; use mode='eval')")


def per_sample_gradients(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, *,
                         chunk_size: int | None = None) -> tuple[Tensor, list[Tensor]]:
    """``(losses, grads)``: ``losses[j] = f_j(w)`` (shape ``[n]``) and, per trainable parameter ``p``, a
    tensor of shape ``[n, *p.shape]`` holding ``grad f_j(w)``. ``chunk_size`` bounds how many samples ``vmap``
    processes at once (memory ``chunk_size x`` the parameter count)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in named]
    primals = tuple(p.detach() for _, p in named)
    as_tuple = isinstance(inputs, (tuple, list))

    def sample_loss(params: tuple[Tensor, ...], x: Any, y: Any) -> tuple[Tensor, Tensor]:
        xb = tree_map(lambda t: t.unsqueeze(0), x)
        yb = tree_map(lambda t: t.unsqueeze(0), y)
        outputs = functional_call(model, dict(zip(names, params)), tuple(xb) if as_tuple else (xb,))
        loss = loss_fn(outputs, yb)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"Invalid loss_fn output: shape {shape} (expected a scalar tensor, e.g. "
                             "reduction='mean')")
        return loss, loss.detach()

    # randomness="different": in train mode each sample draws its own dropout mask, as in a batched forward
    per_sample = torch.func.vmap(torch.func.grad(sample_loss, has_aux=True), in_dims=(None, 0, 0),
                                 randomness="different", chunk_size=chunk_size)
    # the math attention kernel: vmap runs fused attention kernels one example at a time
    with batch_randomness(inputs), math_attention():  # a train-mode measurement: this batch's masks each call
        grads, losses = per_sample(primals, tuple(inputs) if as_tuple else inputs, targets)
    return losses, list(grads)
