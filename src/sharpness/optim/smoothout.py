"""SmoothOut: the gradient at uniformly perturbed weights, applied at the unperturbed ones (Wen et al., 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _foreach
from .._foreach import group_by_device_dtype, is_sharded, local, uses_foreach_option
from .._validation import check_bool, check_int_at_least, check_non_negative
from ..amp import record_step, unscale_
from ..policies.never import Never
from ..rules.sam import SAMPerturbation
from ._generator import GeneratorCheckpoint, LazyGenerator, shard_stream
from .engine import _BACKUP, Closure, SharpnessAwareOptimizer

__all__ = ["SmoothOut"]

_GRAD_SUM = "smoothout_grad_sum"  # scratch: the sum of the copies' gradients (copies > 1)


class SmoothOut(GeneratorCheckpoint, SharpnessAwareOptimizer):
    r"""Stochastic SmoothOut: inject uniform noise, take the gradient there, de-noise, step.

    .. math::
        \xi \sim U(-a, a)^N, \qquad w \leftarrow \mathrm{base\_step}\big(w, \nabla L_B(w + \xi)\big)

    (``a`` per param group as ``group["a"]``). With ``copies=1`` (default) this is the paper's unbiased
    stochastic SmoothOut: one noisy copy per mini-batch, whose expectation is the gradient of the smoothed loss
    ``E_xi L(w + xi)``. With ``copies=m`` the gradient is the average over ``m`` independently perturbed copies,
    ``(1/m) sum_k grad L_B(w + xi_k)`` (the paper's multi-copy SmoothOut), at ``m`` passes per step. The de-noising restores ``w`` exactly from a backup (never
    ``w + xi - xi``). With ``adaptive=True`` (AdaSmoothOut) the noise of each filter (output unit) is scaled by
    that filter's L2 norm: for a tensor of shape ``[out, ...]`` the bound of row ``j`` is
    ``a * ||w_j||``; one-dimensional tensors (biases, norm weights) use ``a * |w_j|``. With an Adam base this
    is the "AdamSmoothOut" of SALR's appendix. ``a = 0`` is the base optimizer, bit for bit.

    ``copies`` gradient evaluations per step (at the noisy points); the loss returned is their mean.
    Noise comes from a private generator on the parameters' device (seeded with ``seed``, same on every
    rank, checkpointed). BatchNorm running statistics are updated by the noisy pass (the only pass); with
    ``copies > 1`` and ``model=model`` by the first copy's pass only (one update per step, as with one copy),
    without ``model`` by every copy's.

    Args:
        params_or_base, base_class: as for :class:`SAM`.
        a: noise half-width (>= 0; paper 0.004 to 0.02 plain, about 0.01 to 0.1 relative for AdaSmoothOut).
        adaptive: AdaSmoothOut, noise relative to filter norms.
        copies: number of perturbed copies averaged per step (integer >= 1; one pass each).
        seed: seed of the noise generator (integer >= 0).
        **kwargs: engine options (``model``, ``grad_scaler``, ``max_grad_norm``) and, in the davda54 form, the
            base optimizer's options.

    Reference: W. Wen, Y. Wang, F. Yan, C. Xu, C. Wu, Y. Chen, H. Li. SmoothOut: Smoothing Out Sharp Minima
    to Improve Generalization in Deep Learning. arXiv:1805.07898, 2018.
    """

    supports_complex: ClassVar[bool] = True  # equal to the real view (tested)
    min_grad_evals_per_step = 1
    max_grad_evals_per_step = 1
    neutral_options: ClassVar[dict[str, Any]] = {"a": 0.0}
    has_unperturbed_pass: ClassVar[bool] = False  # the only pass is at w + noise (its BN statistics are kept)
    _rng_key = "smoothout"  # state_dict()["param_groups"][0]["sharpness"]["smoothout"]: the noise generator
    supports_maximize: ClassVar[bool] = True  # symmetric noise: the same update for -L
    description = "SmoothOut: gradient at w + U(-a, a) noise, applied at w (Wen et al., 2018)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, a: float = 0.01, adaptive: bool = False,
                 copies: int = 1, seed: int = 0, **kwargs: Any) -> None:
        a = check_non_negative("a", a)
        self.copies = check_int_at_least("copies", copies, 1)
        self.min_grad_evals_per_step = self.max_grad_evals_per_step = self.copies
        self.adaptive = check_bool("adaptive", adaptive)
        self._rng = LazyGenerator(seed)
        super().__init__(params_or_base, base_class, rule=SAMPerturbation(), policy=Never(), rho=0.0, **kwargs)
        self._wrapper_defaults["a"] = a
        self.defaults["a"] = a
        for group in self.param_groups:
            group.setdefault("a", a)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self.adaptive:
            split = next((p for p in group["params"] if _splits_filters(p)), None)
            if split is not None:
                self.base_optimizer.param_groups.pop()  # refused: the group is not added
                raise NotImplementedError(
                    f"{type(self).__name__}(adaptive=True) scales each filter's noise by that filter's norm, which "
                    f"needs whole filters (rows), but a parameter of shape {tuple(split.shape)} is sharded as "
                    f"{tuple(split.placements)}; keep FSDP2's default Shard(0) (no shard_placement_fn) or use "
                    "adaptive=False")
        if "a" in self._wrapper_defaults:
            group.setdefault("a", self._wrapper_defaults["a"])
        if "a" in group:
            check_non_negative("a", group["a"])

    # ------------------------------------------------------------------ noise
    def _noise_(self, weights: list[Tensor], noise: list[Tensor], a: float) -> None:
        """Fill ``noise`` with U(-a, a) (AdaSmoothOut: times each filter's norm of ``weights``), in place."""
        generator = shard_stream(self._rng.get(weights[0].device), weights[0])
        for p, xi in zip(local(weights), local(noise), strict=True):
            if xi.device == generator.device:
                xi.uniform_(-a, a, generator=generator)
            else:
                xi.copy_(torch.empty(xi.shape, dtype=xi.dtype, device=generator.device).uniform_(
                    -a, a, generator=generator))
            if self.adaptive:
                if p.dim() <= 1:
                    xi.mul_(p.abs())
                else:  # filter j = w[j]: its norm over all other dimensions
                    xi.mul_(torch.linalg.vector_norm(p, dim=tuple(range(1, p.dim())), keepdim=True))

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    @uses_foreach_option
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """Perturb, run the closure once at ``w + xi``, restore ``w`` exactly, apply the base step."""
        if closure is None or not callable(closure):
            raise TypeError(
                f"{type(self).__name__}.step() requires a closure that clears the gradients, runs forward and "
                "backward and returns the loss"
            )
        closure = self._watch_losses(closure)
        noisy = []  # (params, backup, a) per group with a > 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if not params or group["a"] == 0:
                continue
            backup = self._scratch(params, _BACKUP)
            for dst, src in group_by_device_dtype(backup, params):
                _foreach.copy_(dst, src)
            noisy.append((params, backup, float(group["a"])))
        losses = []
        grad_sum: list[tuple[Tensor, Tensor]] = []  # (param, running sum of its gradients) when copies > 1
        try:
            for copy_index in range(self.copies):
                for params, backup, a in noisy:
                    # The noise is drawn straight into the parameters and w is added back from the backup:
                    # xi + w is bit for bit w + xi, and no noise buffer is kept (one parameter-sized buffer less).
                    self._noise_(backup, params, a)
                    for bucket, w in group_by_device_dtype(params, backup):
                        _foreach.add_(bucket, w)  # w + xi_k
                with torch.enable_grad():
                    losses.append(closure())
                if copy_index == 0 and self.copies > 1 and self._bn_guard is not None:
                    self._bn_guard.save()  # the first copy's statistics, put back after the others
                if self.copies > 1:
                    with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
                    if copy_index == 0:
                        sums = self._scratch(with_grad, _GRAD_SUM)
                        for dst, p in zip(sums, with_grad, strict=True):
                            dst.copy_(p.grad)
                        grad_sum = list(zip(with_grad, sums, strict=True))
                    else:
                        for p, total in grad_sum:
                            if p.grad is not None:
                                total.add_(p.grad)
        finally:
            for params, backup, _ in noisy:  # de-noise: back to w, bit-exact
                for dst, src in group_by_device_dtype(params, backup):
                    _foreach.copy_(dst, src)
            if self._bn_guard is not None:
                self._bn_guard.restore()  # a no-op unless the first copy's statistics were saved
        self.grad_evals += len(losses)
        if grad_sum:  # the average over the copies becomes the gradient the base optimizer sees
            for p, total in grad_sum:
                p.grad.copy_(total).div_(self.copies)
        loss = losses[0] if len(losses) == 1 else torch.stack([torch.as_tensor(x).detach() for x in losses]).mean()
        if self._scaler_enabled():
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            self._found_inf = torch.zeros(1, dtype=torch.float32, device=self._grad_device(grads))
            unscale_(self.grad_scaler, grads, self._found_inf)
            if self._found_inf.item() > 0:
                self._skip()
                return loss
        self._check_losses()
        if self.max_grad_norm is not None:
            params_with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params_with_grad, self.max_grad_norm)
        self.base_optimizer.step()
        self.steps += 1
        if self._scaler_enabled():
            record_step(self.grad_scaler, self, self._found_inf)
        return loss

    def first_step(self, zero_grad: bool = False, *, local_grads: bool = False) -> bool:
        raise RuntimeError(
            "SmoothOut perturbs before the forward pass, so it has no first_step()/second_step(); use step(closure)"
        )

    def second_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError(
            "SmoothOut perturbs before the forward pass, so it has no first_step()/second_step(); use step(closure)"
        )

    def __repr__(self) -> str:
        a = sorted({group["a"] for group in self.param_groups})
        base = "\n    ".join(repr(self.base_optimizer).splitlines())
        return (f"{type(self).__name__}(a={a[0] if len(a) == 1 else a}, adaptive={self.adaptive}, "
                f"copies={self.copies}, "
                f"seed={self._rng.seed},\n  base={base})")


def _splits_filters(p: Tensor) -> bool:
    """Whether a ``DTensor`` parameter of two or more dimensions is sharded along a dimension other than 0, so
    that a rank holds parts of filters (AdaSmoothOut's per-filter norm would then be a partial one)."""
    return is_sharded(p) and p.dim() > 1 and any(
        placement.is_shard() and placement.dim != 0 for placement in p.placements)
