"""The one Hessian-vector product every measure (and GNR) uses.

``HessianOperator`` maps a parameter-shaped vector ``v`` to ``H v``, where ``H`` is the Hessian of the
size-weighted mean loss over the given batches at the current weights. Three methods:

* ``"double_backward"`` (default): ``H v = d/dw <grad L(w), v>``, one extra backward through the gradient's
  graph. With a single batch the gradient graph is built once and reused for every product.
* ``"func"``: forward-over-reverse with ``torch.func.jvp`` of ``torch.func.grad`` (no retained graph).
* ``"finite_difference"``: ``H v ~ (grad L(w + h v) - grad L(w - h v)) / (2h)`` with ``h = fd_eps / ||v||``
  (two gradient passes, no second-order autograd: works where double backward is unsupported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._attention import math_attention
from .._compile import accepts_compiled
from .._validation import check_choice, check_positive
from ._common import (Batch, LossFn, Vector, as_batches, batch_loss, batch_randomness, gradient, measurement_mode,
                      norm, shifted_parameters, trainable_parameters)

__all__ = ["HVP_METHODS", "HessianOperator", "hvp"]

HVP_METHODS = ("double_backward", "func", "finite_difference")


class HessianOperator:
    """``v -> H v`` at the current weights of ``model`` (which must not change while the operator is used).

    Use it inside :func:`~sharpness.measures._common.measurement_mode` (the measures do); ``matvecs`` counts
    the products computed, ``dim`` is the number of trainable scalars.
    """

    @accepts_compiled
    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Batch | Any, *, method: str = "double_backward",
                 fd_eps: float = 1e-4) -> None:
        check_choice("method", method, HVP_METHODS)
        self.model = model
        self.loss_fn = loss_fn
        self.method = method
        self.fd_eps = check_positive("fd_eps", fd_eps)
        self.params = trainable_parameters(model)
        self.batches = as_batches(data)
        self.total = sum(n for _, _, n in self.batches)
        self.dim = sum(p.numel() for p in self.params)
        self.matvecs = 0
        self._cached_grads: tuple[Tensor, ...] | None = None

    def __call__(self, vector: Sequence[Tensor]) -> Vector:
        return self.matvec(vector)

    def matvec(self, vector: Sequence[Tensor]) -> Vector:
        vector = list(vector)
        if len(vector) != len(self.params) or any(v.shape != p.shape for v, p in zip(vector, self.params)):
            raise ValueError("Invalid vector: expected one tensor per trainable parameter, with the same shapes")
        self.matvecs += 1
        if self.method == "double_backward":
            return self._double_backward(vector)
        if self.method == "func":
            return self._func(vector)
        return self._finite_difference(vector)

    # -------------------------------------------------------------------------------------------- methods
    def _accumulate(self, parts_per_batch) -> Vector:
        out = [torch.zeros_like(p) for p in self.params]
        for (_, _, n), parts in zip(self.batches, parts_per_batch):
            for acc, part in zip(out, parts):
                if part is not None:
                    acc.add_(part, alpha=n / self.total)
        return out

    def _double_backward(self, vector: Vector) -> Vector:
        if len(self.batches) == 1:
            if self._cached_grads is None:
                x, y, _ = self.batches[0]
                self._cached_grads = self._gradient_graph(x, y)
            return self._backward_through(self._cached_grads, vector, retain_graph=True)

        def per_batch():
            for x, y, _ in self.batches:
                yield self._backward_through(self._gradient_graph(x, y), vector, retain_graph=False)

        return self._accumulate(per_batch())

    def _gradient_graph(self, x: Any, y: Any) -> tuple[Tensor | None, ...]:
        """``grad L_B(w)`` with its graph kept (``None`` for parameters the loss does not use)."""
        with torch.enable_grad(), math_attention():  # attention's fused kernels have no double backward
            loss = batch_loss(self.model, self.loss_fn, x, y)
            return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

    def _backward_through(self, grads: tuple[Tensor | None, ...], vector: Vector, *, retain_graph: bool) -> Vector:
        """``d/dw <grad L(w), v>``; parameters outside the graph get zero rows of the Hessian."""
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = [torch.zeros_like(p) for p in self.params]
        if not used:
            return out
        with torch.enable_grad():
            parts = torch.autograd.grad([grads[i] for i in used], self.params,
                                        grad_outputs=[vector[i] for i in used], retain_graph=retain_graph,
                                        allow_unused=True)
        return [part.detach() if part is not None else zero for part, zero in zip(parts, out)]

    def _func(self, vector: Vector) -> Vector:
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        names = [name for name, _ in named]
        primals = tuple(p.detach() for _, p in named)

        buffers = dict(self.model.named_buffers())

        def per_batch():
            for x, y, _ in self.batches:
                def loss_of(params: tuple[Tensor, ...]) -> Tensor:
                    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
                    # buffers as copies made inside the transform: a train-mode BatchNorm updates its running
                    # statistics in place, which torch.func refuses on a captured tensor (and which a measure
                    # must not keep anyway)
                    state = {**{name: b.clone() for name, b in buffers.items()}, **dict(zip(names, params))}
                    outputs = functional_call(self.model, state, inputs)
                    return self.loss_fn(outputs, y)

                with batch_randomness(x), math_attention():  # fused attention has no forward-mode AD
                    _, tangent_out = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tuple(vector),))
                yield list(tangent_out)

        return self._accumulate(per_batch())

    def _finite_difference(self, vector: Vector) -> Vector:
        v_norm = float(norm(vector))
        if v_norm == 0.0:
            return [torch.zeros_like(p) for p in self.params]
        h = self.fd_eps / v_norm
        with shifted_parameters(self.params, vector, h):
            _, g_plus = gradient(self.model, self.loss_fn, self.batches, self.params)
        with shifted_parameters(self.params, vector, -h):
            _, g_minus = gradient(self.model, self.loss_fn, self.batches, self.params)
        return [(a - b) / (2 * h) for a, b in zip(g_plus, g_minus)]


@accepts_compiled
def hvp(model: nn.Module, loss_fn: LossFn, data: Batch | Any, vector: Sequence[Tensor], *,
        method: str = "double_backward", mode: str = "eval", fd_eps: float = 1e-4) -> Vector:
    """One Hessian-vector product ``H v`` of the loss over ``data`` (see :class:`HessianOperator`).

    ``vector`` is a list of tensors shaped like the model's trainable parameters. The model's training flags
    and BatchNorm buffers are restored afterwards (``mode="eval"`` by default).
    """
    with measurement_mode(model, mode):
        return HessianOperator(model, loss_fn, data, method=method, fd_eps=fd_eps).matvec(vector)
