"""SAM's perturbation restricted to a binary mask of coordinates (ESAM, SSAM-F)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor

from .. import _foreach
from .._foreach import global_norm, group_by_device_dtype
from .._validation import check_choice, check_non_negative, check_positive
from .base import ParamGroupView, PerturbationRule
from .sam import climb_

__all__ = ["MaskedSAMPerturbation"]

#: ``masks(params, scratch)`` returns one mask per parameter (same shape; bool or 0/1 of any dtype), or None for
#: all ones. ``scratch`` is None or a list of writable tensors shaped like ``params`` (the parameters themselves,
#: backed up by the engine) that a freshly drawn mask may be written into instead of a buffer of its own.
MaskFn = Callable[[list[Tensor], list[Tensor] | None], list[Tensor] | None]


class MaskedSAMPerturbation(PerturbationRule):
    r"""``e(w) = scale * rho * (m ⊙ g) / (||g_N|| + eps)``: SAM's ascent on the coordinates where ``m = 1``.

    ``m`` comes from ``masks(params, scratch)`` at each perturbation (random for ESAM, a Fisher mask for SSAM-F).
    ``norm`` picks the normalizer: ``"full"`` uses ``||g||`` over every parameter (then ``E[e] = scale * beta *
    e_SAM`` for a Bernoulli(beta) mask, so ``scale = 1/beta`` makes the perturbation unbiased: ESAM's paper);
    ``"masked"`` uses ``||m ⊙ g||`` (ESAM's public code with per-tensor masks). With all-ones masks and
    ``scale = 1`` this is exactly :class:`~sharpness.rules.SAMPerturbation` (bit for bit).

    Args:
        masks: the mask provider; None means all ones.
        scale: multiplies the radius (> 0).
        norm: ``"full"`` or ``"masked"``.
        eps: guards the division for a zero gradient.
    """

    name = "masked_sam"

    def __init__(self, masks: MaskFn | None = None, *, scale: float = 1.0, norm: str = "full",
                 eps: float = 1e-12) -> None:
        if masks is not None and not callable(masks):
            raise TypeError(f"Invalid masks type: {type(masks).__name__} (expected a callable or None)")
        self.masks = masks
        self.scale = check_positive("scale", scale)
        self.norm = check_choice("norm", norm, ("full", "masked"))
        self.eps = check_non_negative("eps", eps)

    @_foreach.no_grad
    def perturb_(self, views: list[ParamGroupView], *, grad_sq_norm: Tensor | None = None) -> None:
        grads = [g for view in views for g in view.grads]
        if not grads:
            return
        norm = None
        if self.norm == "full":  # ||g|| before masking
            norm = global_norm(grads) if grad_sq_norm is None else grad_sq_norm.sqrt()
        params = [p for view in views for p in view.params]
        has_origin = all(view.origin is not None for view in views)
        masks = self.masks(params, params if has_origin else None) if self.masks is not None else None
        if masks is not None:
            if len(masks) != len(grads):
                raise RuntimeError(f"The mask provider returned {len(masks)} masks for {len(grads)} parameters")
            for bucket_grads, bucket_masks in group_by_device_dtype(grads, masks):
                _foreach.mul_(bucket_grads, bucket_masks)  # g <- m ⊙ g, in place
            if has_origin and any(m is p for m, p in zip(masks, params, strict=True)):
                origin = [t for view in views for t in view.origin]
                for dst, src in group_by_device_dtype(params, origin):
                    _foreach.copy_(dst, src)  # the mask was drawn into the parameters: back to w
        if norm is None:  # norm="masked": ||m ⊙ g|| from the masked gradients
            norm = global_norm(grads)
        if self.scale != 1.0:
            views = [dataclasses.replace(view, group={**view.group, "rho": view.group["rho"] * self.scale})
                     for view in views]
        # SAM's own step on the masked gradients: with all-ones masks and scale 1 it is SAM, bit for bit.
        climb_(views, norm, self.eps)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, norm={self.norm!r}, eps={self.eps}"
