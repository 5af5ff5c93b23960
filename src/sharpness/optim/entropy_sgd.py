"""Entropy-SGD: descend the local entropy estimated by Langevin dynamics (Chaudhari et al., ICLR 2017)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import _foreach
from .._compile import EagerUnderCompile
from .._foreach import group_by_device_dtype, uses_foreach_option
from .._validation import (
    check_bool,
    check_dense_grads,
    check_int_at_least,
    check_non_negative,
    check_positive,
    check_wrapper_options,
)
from ..batchnorm import RunningStatsGuard
from ..distributed import ddp_module
from ._finite import FiniteLossCheck
from ._generator import LazyGenerator, draw_device, shard_stream
from ._state import ScratchLists, SharesBaseParamGroups, check_steps_without_closure, scratch_buffers

_LOG_MAX_SCOPE = math.log(1e300)  # beyond this the scope times a weight difference is no longer a float

__all__ = ["EntropySGD"]

Closure = Callable[[], Any]

# Scratch buffers per parameter (allocated once, never checkpointed: every step starts them afresh).
_ANCHOR = "entropy_anchor"  # x, the weights the Langevin chain is tethered to
_MEAN = "entropy_mean"  # mu, the running average of the chain
_NOISE = "entropy_noise"  # the Langevin noise xi ~ N(0, I) of one inner step (only when noise > 0); flat per bucket


class EntropySGD(EagerUnderCompile, FiniteLossCheck, SharesBaseParamGroups, torch.optim.Optimizer):
    r"""Entropy-SGD (Algorithm 1 of the paper): an outer step along the gradient of the local entropy.

    Per step, with the current weights ``x``, the scope ``gamma_t = gamma * gamma_growth**t`` and
    ``L = langevin_steps`` stochastic-gradient Langevin steps (on the step's mini-batch, or on a fresh one each
    with ``step(closure, langevin_closure)``):

    .. math::
        x'_0 = \mu_0 = x, \qquad
        x'_{l+1} = x'_l - \eta' \big(\nabla L_B(x'_l) + \gamma_t (x'_l - x)\big) + \sqrt{\eta'}\,\varepsilon\,\xi_l,
        \qquad \mu_{l+1} = (1 - \alpha)\mu_l + \alpha x'_{l+1},

        x \leftarrow \mathrm{base\_step}\big(x,\ \gamma_t (x - \mu_L)\big) \quad (\texttt{scale\_by\_gamma=True},
        \text{ the paper}) \quad\text{or}\quad \mathrm{base\_step}(x,\ x - \mu_L) \quad (\text{default, the authors' code})

    with ``xi_l ~ N(0, I)`` from a ``torch.Generator`` on the parameters' device (its state is checkpointed).
    The base optimizer makes it Entropy-SGD (SGD, optionally with momentum/Nesterov) or Entropy-Adam (Adam).

    The closure is called ``L`` times per step: the first call, at ``x``, is the training pass (its loss is
    returned) and gives the first Langevin gradient; ``grad_evals`` counts ``L`` per step (the authors' code
    makes ``L + 1`` calls and discards the first gradient). ``langevin_steps=0`` is the authors' convention
    for plain SGD: the base step on the gradient at ``x`` (one call), bit for bit the base optimizer.

    Deviations, stated: by default every Langevin step reuses the step's mini-batch; the paper samples a fresh
    one per Langevin step, which ``langevin_closure`` gives (the harness: ``langevin_batches="fresh"``); the
    Langevin steps are plain SGLD (the authors' code adds the outer momentum and weight decay to them); the
    outer gradient omits ``gamma_t`` by default as the authors' code does (with the paper's form the step is
    ``gamma_t`` times smaller, i.e. the lr must be ``1/gamma_t`` larger); the noise is ``sqrt(eta') eps xi`` as
    in the paper (``sqrt(2 eta') eps xi`` in the code). The SALR paper's settings are the defaults: ``L = 5``, ``eta' = 0.1``, ``eps = 1e-4``,
    ``gamma = 0.03`` growing by ``1.001`` per update; ``alpha = 0.25`` is the code's ``1 - beta1``.

    Args:
        base_optimizer: the outer optimizer instance (its param groups are shared; schedulers drive them).
        langevin_steps: ``L >= 0``.
        sgld_lr: ``eta' > 0``, the Langevin step size.
        noise: thermal noise ``eps >= 0``.
        gamma: initial scope ``> 0``; gamma_growth: factor ``>= 1`` per update (scoping).
        gamma_max: cap of the scope (default None: the paper's unbounded schedule). The Langevin loop is a
            gradient step on a term of curvature ``gamma_t``, stable only while ``sgld_lr * gamma_t < 2``: with
            the defaults (0.03, 1.001, 0.1) that ends near step 6,500, so long runs want e.g. ``1 / sgld_lr``.
        alpha: weight ``in (0, 1]`` of the newest Langevin iterate in the running mean ``mu``.
        scale_by_gamma: multiply the outer gradient by ``gamma_t`` (the paper's Algorithm 1).
        seed: seeds the noise generator (integer >= 0; the same on every rank, so DDP replicas draw the same
            noise and stay identical).
        model: enables the BatchNorm guard (only the first pass updates running statistics).
        max_grad_norm: clip the outer gradient to this L2 norm before the base step.
        check_finite: check the losses of the step's passes once before the update (one host read per step); a
            NaN or inf raises ``FloatingPointError`` with the weights and the inner state unchanged.
        foreach: fused ``torch._foreach_*`` list ops (None/True) or one tensor at a time (False; same results).

    Counters: ``steps``, ``grad_evals``, ``sam_steps`` and ``skipped_steps`` (always 0), ``sam_fraction``,
    ``scope`` (current gamma).

    Reference: P. Chaudhari, A. Choromanska, S. Soatto, Y. LeCun, C. Baldassi, C. Borgs, J. Chayes, L. Sagun,
    R. Zecchina. Entropy-SGD: Biasing Gradient Descent Into Wide Valleys. ICLR 2017.
    """

    min_grad_evals_per_step: ClassVar[int] = 5
    max_grad_evals_per_step: ClassVar[int] = 5
    needs_closure: ClassVar[bool] = True
    needs_graph: ClassVar[bool] = False
    needs_per_sample_losses: ClassVar[bool] = False
    neutral_options: ClassVar[dict[str, Any]] = {"langevin_steps": 0}
    standard_closure_options: ClassVar[dict[str, Any]] = {}
    supports_grad_scaler: ClassVar[bool] = False
    has_unperturbed_pass: ClassVar[bool] = True  # the training pass at x; the Langevin passes keep no BN statistics
    scales_base_lr: ClassVar[bool] = False
    base_gradient_is_displacement: ClassVar[bool] = True  # the base steps on x - mu (authors' code: lr = 1)
    supports_sync_perturbation: ClassVar[bool] = False  # no per-worker pass: DDP all-reduces every pass
    description: ClassVar[str] = "Entropy-SGD: outer step on x - mu of L Langevin steps (Chaudhari et al., 2017)"

    def __init__(self, base_optimizer: torch.optim.Optimizer, *, langevin_steps: int = 5, sgld_lr: float = 0.1,
                 noise: float = 1e-4, gamma: float = 0.03, gamma_growth: float = 1.001, alpha: float = 0.25,
                 gamma_max: float | None = None, scale_by_gamma: bool = False, seed: int = 0,
                 model: nn.Module | None = None, max_grad_norm: float | None = None, check_finite: bool = True,
                 foreach: bool | None = None) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid base_optimizer type: {type(base_optimizer).__name__} (expected a "
                            "torch.optim.Optimizer instance such as torch.optim.SGD(params, lr=0.01))")
        check_steps_without_closure(type(self).__name__, base_optimizer)
        self.langevin_steps = check_int_at_least("langevin_steps", langevin_steps, 0)
        self.sgld_lr = check_positive("sgld_lr", sgld_lr)
        self.noise = check_non_negative("noise", noise)
        self.gamma = check_positive("gamma", gamma)
        self.gamma_growth = check_positive("gamma_growth", gamma_growth)
        if self.gamma_growth < 1:
            raise ValueError(f"Invalid gamma_growth value: {gamma_growth} (expected gamma_growth >= 1)")
        if gamma_max is not None:
            gamma_max = check_positive("gamma_max", gamma_max)
            if gamma_max < self.gamma:
                raise ValueError(f"Invalid gamma_max value: {gamma_max} (expected gamma_max >= gamma = {self.gamma})")
        self.gamma_max = gamma_max
        self.alpha = check_positive("alpha", alpha)
        if self.alpha > 1:
            raise ValueError(f"Invalid alpha value: {alpha} (expected 0 < alpha <= 1)")
        max_grad_norm = check_wrapper_options(model, max_grad_norm, foreach)
        self.foreach = foreach
        self._rng = LazyGenerator(seed)
        self.scale_by_gamma = check_bool("scale_by_gamma", scale_by_gamma)
        self.check_finite = check_bool("check_finite", check_finite)
        self._ddp = ddp_module(model)
        self.base_optimizer = base_optimizer
        self.model = model
        self.max_grad_norm = max_grad_norm
        self._bn_guard = RunningStatsGuard(model) if model is not None else None
        self.min_grad_evals_per_step = self.max_grad_evals_per_step = max(self.langevin_steps, 1)
        self.steps = 0
        self.grad_evals = 0
        self.sam_steps = 0
        self.skipped_steps = 0  # the engine's counter set; no GradScaler, so never incremented
        self._flat_scratch = ScratchLists()  # the noise buffers (views of one flat buffer per bucket)
        super().__init__(list(base_optimizer.param_groups), dict(base_optimizer.defaults))

    # ------------------------------------------------------------------ counters
    @property
    def sam_fraction(self) -> float:
        return 0.0

    @property
    def scope(self) -> float:
        """``gamma_t = min(gamma * gamma_growth**t, gamma_max)`` for the next step (the cap is decided in log
        space: no overflow however long the run; without a cap, a clear error where the power overflows)."""
        log_scope = math.log(self.gamma) + self.steps * math.log(self.gamma_growth)
        if self.gamma_max is not None and log_scope >= math.log(self.gamma_max):
            return self.gamma_max
        if log_scope > _LOG_MAX_SCOPE:
            raise FloatingPointError(
                f"EntropySGD: the scope gamma * gamma_growth**t = {self.gamma} * {self.gamma_growth}**{self.steps} "
                "overflows; pass gamma_max (e.g. 1 / sgld_lr, where the Langevin loop is still stable)")
        return min(self.gamma * self.gamma_growth ** self.steps, self.gamma_max or math.inf)

    @property
    def seed(self) -> int:
        return self._rng.seed

    def _scratch(self, params: list[Tensor], key: str) -> list[Tensor]:
        return scratch_buffers(self.state, params, key)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    @uses_foreach_option
    def step(self, closure: Closure | None = None,  # type: ignore[override]
             langevin_closure: Closure | None = None) -> Any:
        """One Entropy-SGD step. Returns the loss at ``x``.

        Args:
            closure: clears the gradients, runs forward and backward on the step's mini-batch and returns the
                loss; called ``max(L, 1)`` times, or once when ``langevin_closure`` is given.
            langevin_closure: the same on a *fresh* mini-batch per call (the paper's Algorithm 1 samples one per
                Langevin step): Langevin steps ``2..L`` call it, ``L - 1`` times per step; the first Langevin
                gradient is the training pass's, at ``x``.
        """
        if closure is None or not callable(closure):
            raise TypeError("EntropySGD.step() requires a closure that clears the gradients, runs forward and "
                            "backward and returns the loss")
        if langevin_closure is not None and not callable(langevin_closure):
            raise TypeError(f"Invalid langevin_closure type: {type(langevin_closure).__name__} (expected a closure "
                            "like the step's, on a fresh mini-batch per call, or None)")
        closure = self._watch_losses(closure)
        langevin = closure if langevin_closure is None else self._watch_losses(langevin_closure, same_step=True)
        with torch.enable_grad():
            loss = closure()
        self.grad_evals += 1
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        check_dense_grads(type(self).__name__, [p.grad for p in params])
        if self.langevin_steps > 0 and params:
            try:
                self._langevin(langevin, params)
            except BaseException:  # a Langevin pass raised: back to x, bit for bit (the anchor holds it)
                for p, a in group_by_device_dtype(params, self._scratch(params, _ANCHOR)):
                    _foreach.copy_(p, a)
                if self._bn_guard is not None:
                    self._bn_guard.restore()
                raise
        self._check_losses()
        if self.max_grad_norm is not None and params:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.base_optimizer.step()
        self.steps += 1
        return loss

    def _langevin(self, closure: Closure, params: list[Tensor]) -> None:
        gamma = self.scope
        anchor = self._scratch(params, _ANCHOR)
        mean = self._scratch(params, _MEAN)
        # the noise buffers are views of one flat buffer per (device, dtype): one draw per bucket, not per tensor
        flats, views = self._flat_scratch.get_flat(self.state, params, _NOISE) if self.noise > 0 else ([], [])
        noise = [views] if views else []
        for a, m, p in group_by_device_dtype(anchor, mean, params):
            _foreach.copy_(a, p)
            _foreach.copy_(m, p)
        if self._bn_guard is not None:
            self._bn_guard.save()  # the training pass's running statistics are the ones kept
        noise_scale = math.sqrt(self.sgld_lr) * self.noise
        for index in range(self.langevin_steps):
            if index > 0:  # the first Langevin gradient is the training pass's, at x'_0 = x
                with torch.enable_grad():
                    closure()
                self.grad_evals += 1
            for flat in flats:  # xi ~ N(0, I) (on each rank its shards' own numbers under FSDP2)
                flat.normal_(generator=shard_stream(self._rng.get(flat.device), params[0]))
            self._sgld_update(params, anchor, mean, noise, gamma, noise_scale)
        if self._bn_guard is not None:
            self._bn_guard.restore()
        outer = gamma if self.scale_by_gamma else 1.0
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        for p, g, a, m in group_by_device_dtype(params, [p.grad for p in params], anchor, mean):
            _foreach.copy_(p, a)  # back to x, bit for bit
            _foreach.copy_(g, a)
            _foreach.sub_(g, m)
            if outer != 1.0:
                _foreach.mul_(g, outer)  # the local-entropy gradient gamma (x - mu)

    def _sgld_update(self, params: list[Tensor], anchor: list[Tensor], mean: list[Tensor], noise: list[list[Tensor]],
                     gamma: float, noise_scale: float) -> None:
        """One Langevin update of ``x'`` from the gradient in ``p.grad``, and the running mean ``mu``.

        A method of its own so that no reference to the pass's gradient tensors outlives it: the next closure
        clears them (set_to_none), and they must be freed before its backward allocates new ones (peak memory;
        loop variables left bound in ``_langevin`` kept one set alive)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, a, m, g, *xi in group_by_device_dtype(params, anchor, mean, grads, *noise):
            # x' <- x' - eta' (g' + gamma (x' - x)) in two passes: x' <- x' + eta' gamma (x - x'), then - eta' g'
            _foreach.lerp_(p, a, self.sgld_lr * gamma)
            _foreach.add_(p, g, alpha=-self.sgld_lr)
            if xi:  # x' <- x' + sqrt(eta') eps xi
                _foreach.add_(p, xi[0], alpha=noise_scale)
            _foreach.lerp_(m, p, self.alpha)  # mu = (1 - alpha) mu + alpha x'

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = self.base_optimizer.state_dict()
        state["sharpness"] = {
            "version": 1,
            "optimizer": "EntropySGD",
            "counters": {"steps": self.steps, "grad_evals": self.grad_evals, "sam_steps": self.sam_steps},
            "entropy_sgd": {"generator": self._rng.state_dict(draw_device(self))},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict):
            raise TypeError(f"Invalid state_dict type: {type(state_dict).__name__} (expected a dict)")
        state_dict = dict(state_dict)
        extra = state_dict.pop("sharpness", None)
        if extra is None or "entropy_sgd" not in extra:
            raise ValueError("This state_dict was not saved by EntropySGD (no state['sharpness']['entropy_sgd']); "
                             "to load a plain optimizer's state use EntropySGD.base_optimizer.load_state_dict()")
        if extra.get("version") != 1:
            raise ValueError(f"Unsupported EntropySGD state_dict version: {extra.get('version')!r} (expected 1)")
        self.base_optimizer.load_state_dict(state_dict)
        counters = extra["counters"]
        self.steps = int(counters["steps"])
        self.grad_evals = int(counters["grad_evals"])
        self.sam_steps = int(counters.get("sam_steps", 0))
        self._rng.load_state_dict(extra["entropy_sgd"]["generator"])

    def __repr__(self) -> str:
        parts = [f"langevin_steps={self.langevin_steps}", f"sgld_lr={self.sgld_lr}", f"noise={self.noise}",
                 f"gamma={self.gamma}", f"gamma_growth={self.gamma_growth}", f"alpha={self.alpha}"]
        if self.gamma_max is not None:
            parts.append(f"gamma_max={self.gamma_max}")
        if self.scale_by_gamma:
            parts.append("scale_by_gamma=True")
        base = "\n    ".join(repr(self.base_optimizer).splitlines())
        return f"EntropySGD({', '.join(parts)},\n  base={base})"
