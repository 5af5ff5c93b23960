"""GSAM: surrogate-gap guided sharpness-aware minimization (Zhuang et al., ICLR 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from .. import _foreach
from .._foreach import group_by_device_dtype, squared_norm
from .._validation import check_non_negative, check_real
from ..policies.always import Always
from ..rules.sam import SAMPerturbation
from ..rules.scheduled import LRProportionalRho
from ._finite import GradWitness
from .engine import _CLEAN_GRAD, SharpnessAwareOptimizer

__all__ = ["GSAM"]


class GSAM(SharpnessAwareOptimizer):
    r"""SAM's gradient minus ``alpha`` times the part of the clean gradient orthogonal to it.

    With ``g = grad L_B(w)``, the perturbed gradient ``g_s = grad L_B(w + rho_t g/||g||)`` and
    ``g_perp = g - (<g, g_s>/||g_s||^2) g_s`` (the component of ``g`` orthogonal to ``g_s``):

    .. math::
        d = g_s - \alpha\, g_\perp, \qquad w \leftarrow \mathrm{base\_step}(w, d)

    The step moves along ``+g_perp``, up the clean loss but orthogonally to ``g_s``: it lowers the surrogate
    gap ``h = L(w + e) - L(w)`` while leaving the perturbed loss unchanged to first order (Algorithm 1 of the
    paper). ``alpha = 0`` is SAM, bit for bit.

    The radius follows the learning rate (the paper's schedule) when ``rho_min`` is given:
    ``rho_t = rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max - lr_min)`` per group, read from the group's
    current ``lr`` at every step (see :class:`~sharpness.rules.LRProportionalRho`); otherwise ``rho_t = rho``.

    Two gradient evaluations per step; the clean gradient is kept in a preallocated buffer.

    Args:
        params_or_base, base_class, eps: as for :class:`SAM`.
        rho: the radius at the peak learning rate, ``rho_max`` (>= 0; paper 0.04 to 0.3 for ViTs).
        alpha: weight of the orthogonal correction (>= 0; paper grid 0.01 to 0.3).
        rho_min: radius at ``lr_min`` (0 <= rho_min <= rho); None keeps ``rho`` constant.
        lr_max: the learning rate at which the radius is ``rho`` (default: the first group's lr at
            construction, i.e. the peak of a schedule that starts there).
        lr_min: the learning rate at which the radius is ``rho_min`` (default 0).
        **kwargs: engine options and, in the davda54 form, the base optimizer's options.

    Example::

        opt = sharpness.GSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1, alpha=0.1,
                             rho_min=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)   # drives rho_t too

    Reference: J. Zhuang, B. Gong, L. Yuan, Y. Cui, H. Adam, N. Dvornek, S. Tatikonda, J. Duncan, T. Liu.
    Surrogate Gap Minimization Improves Sharpness-Aware Training. ICLR 2022.
    """

    min_grad_evals_per_step = 2
    max_grad_evals_per_step = 2
    #: rho = 0 alone gives g_s = g and g_perp = 0 only up to rounding (c = <g, g>/||g||^2 is not exactly 1)
    neutral_options: ClassVar[dict[str, Any]] = {"rho": 0.0, "alpha": 0.0}
    description = "GSAM: SAM gradient minus alpha x the clean gradient's part orthogonal to it (Zhuang et al., 2022)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.05, alpha: float = 0.1,
                 rho_min: float | None = None, lr_max: float | None = None, lr_min: float | None = None,
                 eps: float = 1e-12, **kwargs: Any) -> None:
        alpha = check_non_negative("alpha", alpha)
        rule = SAMPerturbation(eps=eps)
        if rho_min is not None:
            rho_min = check_non_negative("rho_min", rho_min)
            if rho_min > check_non_negative("rho", rho):
                raise ValueError(f"Invalid rho_min value: {rho_min} (expected rho_min <= rho = {rho})")
        elif lr_max is not None or lr_min is not None:
            raise ValueError(f"GSAM got {'lr_max' if lr_max is not None else 'lr_min'} without rho_min; give rho_min "
                             "to schedule rho with the lr")
        self.alpha = alpha
        # The engine's LookSAM path keeps the clean gradient g (unscaled, averaged across ranks) in a preallocated
        # buffer; GSAM replaces the LookSAM hook that consumes it. alpha = 0 skips the copy (plain SAM).
        super().__init__(params_or_base, base_class, rule=rule, policy=Always(), rho=rho,
                         reuse_alpha=alpha if alpha > 0 else None, **kwargs)
        if rho_min is not None:  # lr_max defaults to the base optimizer's lr (its class default in the davda54 form)
            lr_max = self.param_groups[0]["lr"] if lr_max is None else lr_max
            self.rule = LRProportionalRho(rule, rho_min=rho_min, lr_max=check_real("lr_max", lr_max),
                                          lr_min=0.0 if lr_min is None else lr_min)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict()
        rule = self.rule if isinstance(self.rule, LRProportionalRho) else None
        state["sharpness"]["gsam"] = {
            "alpha": self.alpha,
            "rho_schedule": None if rule is None else
            {"rho_min": rule.rho_min, "lr_max": rule.lr_max, "lr_min": rule.lr_min},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Also restores the rho schedule's end points (``lr_max`` may have defaulted to the lr at construction)."""
        super().load_state_dict(state_dict)
        schedule = state_dict["sharpness"].get("gsam", {}).get("rho_schedule")
        if schedule is not None and isinstance(self.rule, LRProportionalRho):
            self.rule = LRProportionalRho(self.rule.inner, **schedule)

    # ------------------------------------------------------------------ the GSAM gradient
    def _keeps_reuse_direction(self) -> bool:
        """GSAM's ``alpha`` combines ``g`` and ``g_s`` within the step: no direction outlives it."""
        return False

    def _clean_grad_key(self) -> str:
        """GSAM consumes ``g`` within the step and stores no reuse direction: ``g`` has its own scratch buffer."""
        return _CLEAN_GRAD

    @_foreach.no_grad
    def _store_reuse_direction(self, params: list[Tensor]) -> GradWitness | None:
        r"""``p.grad <- g_s - alpha (g - c g_s) = (1 + alpha c) g_s - alpha g`` with ``c = <g, g_s>/||g_s||^2``.
        Returns ``||g_s||^2`` over the parameters it combined, for the finite check."""
        pair = self._gradient_pair(params)
        if pair is None:
            return None
        params, clean, sam_grads, inner = pair
        sam_sq = squared_norm(sam_grads)
        # a number on the CPU (no 0-d kernels), a 0-d tensor elsewhere (no host synchronisation)
        factor = 1.0 + _foreach.divide_floored(self.alpha * inner, sam_sq)
        for g_s, g in group_by_device_dtype(sam_grads, clean):
            _foreach.mul_(g_s, _foreach.like(factor, g_s[0]))
            _foreach.add_(g_s, g, alpha=-self.alpha)
        return params, sam_sq

    def _apply_reuse_direction(self, params: list[Tensor], grad_norm: float | None = None) -> GradWitness | None:
        """GSAM has no reuse steps (every step is a SAM step)."""
