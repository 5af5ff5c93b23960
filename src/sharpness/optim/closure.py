"""One closure builder that follows each optimizer's closure convention (read from its flags, never its class)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["make_closure"]


def make_closure(optimizer: torch.optim.Optimizer, compute_loss: Callable[[str], Tensor]) -> Callable[[], Tensor]:
    """Build the closure ``optimizer.step`` expects from ``compute_loss(reduction)``.

    ``compute_loss`` runs the forward pass and returns the loss with the given ``reduction`` (``"mean"`` or
    ``"none"``, as ``torch.nn.functional.cross_entropy`` takes it). The closure clears the gradients and then

    * by default: ``loss = compute_loss("mean")``, ``loss.backward()``, returns ``loss``;
    * if the *instance* attribute ``optimizer.needs_graph`` is True (e.g. GNR with exact Hessian-vector
      products): ``loss.backward(create_graph=True)``, so ``p.grad`` carries a graph for double backward;
    * if ``optimizer.needs_per_sample_losses`` is True (e.g. ESAM's data selection): returns the per-sample
      losses ``compute_loss("none")`` averaged over any trailing dimensions (shape ``[B]``) *without* calling
      backward; the optimizer back-propagates the samples it selects.

    Example::

        closure = sharpness.make_closure(opt, lambda reduction: F.cross_entropy(model(x), y, reduction=reduction))
        loss = opt.step(closure)
    """
    if not callable(compute_loss):
        raise TypeError(f"Invalid compute_loss type: {type(compute_loss).__name__} (expected a callable)")
    per_sample = bool(getattr(optimizer, "needs_per_sample_losses", False))
    create_graph = bool(getattr(optimizer, "needs_graph", False))

    def closure() -> Tensor:
        optimizer.zero_grad()
        if per_sample:
            losses = compute_loss("none")
            return losses.reshape(losses.shape[0], -1).mean(1) if losses.dim() > 1 else losses
        loss = compute_loss("mean")
        if create_graph:
            # torch warns that p.grad now references its own graph (a reference cycle); the optimizers that
            # ask for the graph replace every p.grad by a detached tensor once their HVPs are done.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                loss.backward(create_graph=True)
        else:
            loss.backward()
        return loss

    return closure
