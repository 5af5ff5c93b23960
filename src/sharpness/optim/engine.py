"""The one engine every sharpness-aware optimizer in the package runs on.

A sharpness-aware optimizer here is three composable parts:

* a **base optimizer instance** (SGD, AdamW, ...) whose param groups the wrapper shares, so every
  ``torch.optim.lr_scheduler`` works on the wrapper and the base's state is checkpointed with it;
* a **perturbation rule** (:mod:`sharpness.rules`) computing the ascent point ``w + e(w)``;
* a **policy** (:mod:`sharpness.policies`) deciding per step whether to spend the perturbed pass.

One step with a closure (the torch.optim convention: clear grads, forward, backward, return the loss)::

    g     = grad L(w)                     # pass 1, at the current weights (its loss is returned)
    if policy.decide(t, ||g||^2):         # SAM step
        w'  = w + e(w)                    # rule; w is backed up first
        g_s = grad L(w')                  # pass 2
        w   = backup                      # exact restore, never w' - e
        base.step(g_s)
    else:                                 # ERM step: the second pass is really skipped
        base.step(g)                      # (LookSAM-style reuse adds alpha ||g||/||g_v|| g_v)
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import optimizer as _torch_optimizer

from .. import _foreach
from .._compile import EagerUnderCompile
from .._foreach import dot, global_norm, group_by_device_dtype, squared_norm, uses_foreach_option
from .._validation import check_bool, check_dense_grads, check_non_negative, check_wrapper_options
from ..amp import check_not_unscaled, record_step, unscale_
from ..batchnorm import RunningStatsGuard
from ..distributed import all_reduce_grads_mean_, all_reduce_mean_, ddp_module, is_distributed
from ..policies.base import Policy
from ..rules.base import ParamGroupView, PerturbationRule
from ._finite import FiniteLossCheck, GradWitness
from ._state import ScratchLists, SharesBaseParamGroups, check_steps_without_closure

__all__ = ["SharpnessAwareOptimizer"]

Closure = Callable[[], Any]

# Per-parameter state keys. Only the reuse direction outlives a step; the others are scratch buffers
# allocated once and reused (no per-step parameter-sized allocation).
_BACKUP = "unperturbed_weight"
_CLEAN_GRAD = "unperturbed_grad"
_REUSE = "reuse_direction"
_PERSISTENT_KEYS = (_REUSE,)


class _Phase(enum.Enum):
    IDLE = "idle"  # between steps
    READY = "ready"  # first pass done, ERM step: second_step() applies the update
    PERTURBED = "perturbed"  # weights sit at w + e(w); the caller runs the second pass
    SKIPPED = "skipped"  # inf/NaN under a GradScaler: second_step() only records it


def resolve_base_optimizer(
    name: str, params_or_base: Any, base_class: Any, base_kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """Accept either a base optimizer instance, or ``(params, OptimizerClass, **kwargs)`` (davda54 form)."""
    if isinstance(params_or_base, torch.optim.Optimizer):
        if isinstance(params_or_base, SharpnessAwareOptimizer):
            raise TypeError(
                f"{name} cannot wrap another sharpness-aware optimizer ({type(params_or_base).__name__}); "
                "wrap its base optimizer instead"
            )
        if base_class is not None:
            raise TypeError(
                f"{name} got a base optimizer instance and a base optimizer class; pass one: "
                f"{name}(torch.optim.SGD(params, lr=0.1)) or {name}(params, torch.optim.SGD, lr=0.1)"
            )
        if base_kwargs:
            raise TypeError(
                f"{name} got unexpected keyword arguments {sorted(base_kwargs)}; options of an existing base "
                "optimizer instance are set when it is constructed"
            )
        return check_steps_without_closure(name, params_or_base)
    if base_class is None:
        raise TypeError(
            f"{name} needs a base optimizer: {name}(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05) "
            f"or {name}(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1); got {type(params_or_base).__name__}"
        )
    if not (isinstance(base_class, type) and issubclass(base_class, torch.optim.Optimizer)):
        raise TypeError(
            f"Invalid base_class: {base_class!r} (expected a torch.optim.Optimizer subclass such as torch.optim.SGD)"
        )
    return check_steps_without_closure(name, base_class(params_or_base, **base_kwargs))


class SharpnessAwareOptimizer(EagerUnderCompile, FiniteLossCheck, SharesBaseParamGroups, torch.optim.Optimizer):
    r"""Wraps a base optimizer with a perturbation rule and a policy (see the module docstring).

    Args:
        params_or_base: a base optimizer *instance* (preferred), or an iterable of parameters / param groups
            together with ``base_class``.
        base_class: a ``torch.optim.Optimizer`` subclass, constructed as ``base_class(params, **base_kwargs)``.
        rule: the perturbation rule (:class:`~sharpness.rules.SAMPerturbation`, ...).
        policy: when to take the perturbed pass (:class:`~sharpness.policies.Always`, ...).
        rho: default perturbation radius (>= 0), stored per param group as ``group["rho"]``.
        reuse_alpha: if not None, LookSAM-style reuse: SAM steps store the component ``g_v`` of the SAM
            gradient orthogonal to ``g``; ERM steps use ``g + reuse_alpha * ||g|| / ||g_v|| * g_v``.
        model: the model (or its ``DistributedDataParallel`` wrapper; ``torch.compile``'d or not). Enables
            (1) BatchNorm running statistics from the unperturbed pass only and (2) for DDP, the first pass under
            ``no_sync`` (per-worker perturbation, the papers' m-sharpness) unless ``sync_perturbation``.
        grad_scaler: a ``torch.amp.GradScaler`` the closure uses (``scaler.scale(loss).backward()``). Each pass
            is unscaled once; an inf/NaN in any pass skips the whole step with weights restored. Call
            ``scaler.update()`` after ``step`` as usual.
        max_grad_norm: clip the final gradient to this global L2 norm (magnitude only) before the base step.
        sync_perturbation: with a DDP ``model``, all-reduce the first pass too, so every rank uses the global
            perturbation (equals single-process training on the global batch).
        check_finite: with ``step(closure)``, check the losses of all the step's passes once before the
            update (one host read per step); a NaN or inf raises ``FloatingPointError`` with the weights and the
            base optimizer's state unchanged (a non-finite perturbed-pass loss would otherwise reach the
            weights although ``step`` returns the finite loss at ``w``). Not applied under an enabled
            GradScaler (which skips such steps) or in the two-phase API (the caller has the losses).
        foreach: the wrapper's own list operations (perturb, restore, norms, combinations) as fused
            ``torch._foreach_*`` kernels (None or True, the default) or one tensor at a time (False; same
            results, for debugging). The base optimizer keeps its own ``foreach`` setting.
        **base_kwargs: options of ``base_class`` (davda54 construction form only).

    Counters: ``steps`` (updates applied), ``sam_steps``, ``grad_evals`` (passes used, including those of
    skipped steps), ``skipped_steps`` (GradScaler overflow) and ``sam_fraction = sam_steps / steps``.
    """

    #: Capability flags read by the harness and the test-suite (never branch on class names).
    min_grad_evals_per_step: ClassVar[int] = 1
    max_grad_evals_per_step: ClassVar[int] = 2
    needs_closure: ClassVar[bool] = True
    needs_graph: ClassVar[bool] = False
    #: the closure returns per-sample losses (shape ``[B]``) without calling backward; the optimizer back-propagates
    needs_per_sample_losses: ClassVar[bool] = False
    #: keyword options under which the method equals its base optimizer bit for bit (used by the property suite)
    neutral_options: ClassVar[dict[str, Any]] = {"rho": 0.0}
    #: options under which the instance uses the default closure convention (no per-sample losses, no graph);
    #: loops that write their own closures (micro-batch accumulation, GradScaler) can merge them in
    standard_closure_options: ClassVar[dict[str, Any]] = {}
    #: whether ``grad_scaler=`` (fp16 loss scaling) is supported
    supports_grad_scaler: ClassVar[bool] = True
    #: a pass at the current weights ``w`` exists and (with ``model=``) is the one whose BatchNorm running
    #: statistics are kept (False for SmoothOut, whose only pass is at ``w + noise``)
    has_unperturbed_pass: ClassVar[bool] = True
    #: the base optimizer steps with ``group["lr"]`` times a factor the method chooses per step (SALR), so the
    #: update is not ``w - lr * g`` with the scheduler's ``lr``
    scales_base_lr: ClassVar[bool] = False
    #: the "gradient" handed to the base optimizer is a weight displacement (Entropy-SGD's ``x - mu``, about
    #: ``sgld_lr * L`` gradients long), not a loss gradient: its natural ``lr`` is ~1, not plain SGD's
    base_gradient_is_displacement: ClassVar[bool] = False
    #: accepts ``sync_perturbation=`` (with a DDP ``model=`` the first pass may run per worker under ``no_sync``);
    #: False: every pass is all-reduced by DDP, so a DDP run always equals the global batch
    supports_sync_perturbation: ClassVar[bool] = True
    description: ClassVar[str] = "Base optimizer + perturbation rule + policy"

    def __init__(
        self,
        params_or_base: Any,
        base_class: type[torch.optim.Optimizer] | None = None,
        *,
        rule: PerturbationRule,
        policy: Policy,
        rho: float = 0.05,
        reuse_alpha: float | None = None,
        model: nn.Module | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        sync_perturbation: bool = False,
        check_finite: bool = True,
        foreach: bool | None = None,
        **base_kwargs: Any,
    ) -> None:
        name = type(self).__name__
        base = resolve_base_optimizer(name, params_or_base, base_class, base_kwargs)
        if not isinstance(rule, PerturbationRule):
            raise TypeError(f"Invalid rule: {rule!r} (expected a sharpness.rules.PerturbationRule)")
        if not isinstance(policy, Policy):
            raise TypeError(f"Invalid policy: {policy!r} (expected a sharpness.policies.Policy)")
        rho = check_non_negative("rho", rho)
        if reuse_alpha is not None:
            reuse_alpha = check_non_negative("alpha", reuse_alpha)
        max_grad_norm = check_wrapper_options(model, max_grad_norm, foreach)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"Invalid grad_scaler type: {type(grad_scaler).__name__} (expected torch.amp.GradScaler)")

        self.base_optimizer = base
        self.rule = rule
        self.policy = policy
        self.reuse_alpha = reuse_alpha
        self.model = model
        self.grad_scaler = grad_scaler
        self.max_grad_norm = max_grad_norm
        self.sync_perturbation = check_bool("sync_perturbation", sync_perturbation)
        self.check_finite = check_bool("check_finite", check_finite)
        self.foreach = foreach
        self._wrapper_defaults = {"rho": rho}
        self._ddp = ddp_module(model)
        self._bn_guard = RunningStatsGuard(model) if model is not None else None

        self.steps = 0
        self.sam_steps = 0
        self.grad_evals = 0
        self.skipped_steps = 0
        self.last_grad_sq_norm: float | None = None
        self._phase = _Phase.IDLE
        self._perturbed_params: list[Tensor] = []
        # LookSAM: first_step's parameters for second_step's reuse step, and their ||g|| when the policy read it
        self._reuse_step: tuple[list[Tensor], float | None] = ([], None)
        # an ERM step's ||g||^2 the policy read, for second_step's finite check (step(closure) only: with the
        # two-phase API the caller may change the gradients in between)
        self._policy_witness: GradWitness | None = None
        # (step index, the policy's state before that step's decision): undone while the step is not applied
        self._policy_before: tuple[int, dict[str, Any]] | None = None
        self._backup_buckets: list[tuple[list[Tensor], ...]] = []
        self._found_inf: Tensor | None = None
        self._local_grads = False
        self._reuse_norm: Tensor | float | None = None  # ||g_v|| of the stored LookSAM direction (float on CPU)
        self._scratch_lists = ScratchLists()

        # Optimizer.__init__ sets up hooks and calls add_param_group (below) for each of the base's groups,
        # which re-registers the same dicts with the base and adds our defaults: the groups are shared.
        super().__init__(list(base.param_groups), {**base.defaults, **self._wrapper_defaults})

    # ------------------------------------------------------------------ shared param groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):  # checked before the group joins: a refused group is not added
            check_non_negative("rho", param_group.get("rho", self._wrapper_defaults["rho"]))
        super().add_param_group(param_group)
        group = self.base_optimizer.param_groups[-1]
        for key, value in self._wrapper_defaults.items():
            group.setdefault(key, value)

    @property
    def sam_fraction(self) -> float:
        """Fraction of applied steps that were SAM steps (0.0 before the first step)."""
        return self.sam_steps / self.steps if self.steps else 0.0

    # ------------------------------------------------------------------ the closure API
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """Run one full step; the closure is called once or twice. Returns the loss at the unperturbed weights."""
        return self._closure_step(closure)

    @_foreach.no_grad
    @uses_foreach_option
    def _closure_step(self, closure: Closure | None) -> Any:
        """:meth:`step`'s body. Subclasses extend this, not ``step``: torch.optim wraps ``step`` of the first
        instance's class with the step hooks, so a subclass's ``step`` calling ``super().step()`` would run them
        twice once the engine class itself has been instantiated."""
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() requires a closure that clears the gradients, runs forward and "
                "backward and returns the loss; or call first_step() / second_step() around your own passes"
            )
        if not callable(closure):
            raise TypeError(f"Invalid closure type: {type(closure).__name__} (expected a callable)")
        closure = self._watch_losses(closure)
        local = self._ddp is not None and not self.sync_perturbation and is_distributed()
        with torch.enable_grad(), self._ddp.no_sync() if local else contextlib.nullcontext():
            loss = self._first_pass(closure)
        self._check_losses_if_free()  # a NaN pass 1 stops here: no pass at w + rho * NaN to poison BatchNorm
        # (the undecorated bodies of first_step/second_step: step already holds no_grad and the foreach mode)
        if self._first_step(False, local):
            try:
                with torch.enable_grad():
                    self._second_pass(closure, loss)
            except BaseException:
                self.abort_step()  # e.g. out of memory in the perturbed pass: back at w, ready for the next step
                raise
        self._second_step(False)
        return loss

    def _first_pass(self, closure: Closure) -> Any:
        """Pass 1, at ``w``: gradients in ``p.grad``; returns what ``step`` returns (the loss)."""
        return closure()

    def _second_pass(self, closure: Closure, first: Any) -> None:
        """Pass 2, at ``w + e(w)`` (``first``: what pass 1 returned)."""
        closure()

    # ------------------------------------------------------------------ the two-phase API
    def _views(self) -> list[ParamGroupView]:
        views = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            check_dense_grads(type(self).__name__, grads)
            views.append(ParamGroupView(group, params, grads))
        return views

    def _fill_unreached_grads(self) -> set[Tensor] | None:
        """Under DDP ``no_sync`` with ``find_unused_parameters=True`` a rank's pass may miss parameters that
        another rank's reaches. Each such ``p.grad`` becomes zeros (returned, by identity), so that every rank
        averages, decomposes and perturbs over the same parameters (the collectives' layouts agree; a zero
        gradient perturbs nothing). None, and nothing allocated, when every trainable parameter has one."""
        unreached = [p for group in self.param_groups for p in group["params"] if p.requires_grad and p.grad is None]
        if not unreached:
            return None
        for p in unreached:
            p.grad = torch.zeros_like(p)
        return set(unreached)

    def _average_local_grads(self, views: list[ParamGroupView], filled: set[Tensor] | None) -> None:
        """ERM step after a ``no_sync`` pass: ``p.grad`` <- the mean over ranks, as DDP's reducer makes it: a
        gradient this rank did not compute counts as zeros, and one no rank computed goes back to None (the base
        optimizer then skips it, weight decay and momentum included)."""
        grads = [g for view in views for g in view.grads]
        if filled is None:
            all_reduce_grads_mean_(grads)
            return
        params = [p for view in views for p in view.params]
        found = all_reduce_grads_mean_(grads, [p not in filled for p in params])
        for p, computed in zip(params, found or (), strict=False):
            if not computed:
                p.grad = None

    def _scratch(self, params: list[Tensor], key: str) -> list[Tensor]:
        """Preallocated per-parameter buffers (allocated on first use, reused afterwards)."""
        return self._scratch_lists.get(self.state, params, key)

    def _perturb(self, views: list[ParamGroupView], origin: list[Tensor], *,
                 grad_sq_norm: Tensor | None = None) -> None:
        """``w <- w + e(w)`` by the rule. ``origin``: the backup of the views' parameters (in order) just taken;
        the rule may use the parameters as scratch memory and rebuild them from it."""
        with_origin, offset = [], 0
        for view in views:
            end = offset + len(view.params)
            with_origin.append(ParamGroupView(view.group, view.params, view.grads, origin[offset:end]))
            offset = end
        self.rule.perturb_(with_origin, grad_sq_norm=grad_sq_norm)

    def _grad_device(self, grads: list[Tensor]) -> torch.device:
        return grads[0].device if grads else torch.device("cpu")

    @_foreach.no_grad
    @uses_foreach_option
    def first_step(self, zero_grad: bool = False, *, local_grads: bool = False) -> bool:
        """After the first pass (gradients at ``w``): decide and, for a SAM step, climb to ``w + e(w)``.

        Returns True when the caller must run the perturbed pass before :meth:`second_step`; False for an
        ERM step (then call :meth:`second_step` directly, without another pass).

        Args:
            zero_grad: clear the gradients after perturbing (only when a perturbed pass follows).
            local_grads: the first pass ran under DDP ``no_sync``; the engine averages the policy statistic
                across ranks and, on ERM steps, the gradients themselves.

        The step pre-hooks (``register_step_pre_hook`` and the global ones) run here, the post-hooks at the end
        of :meth:`second_step`: once per step, as ``step(closure)`` runs them.
        """
        if self._phase is _Phase.IDLE:
            self._run_step_hooks(pre=True)
        perturbed = self._first_step(zero_grad, local_grads)
        self._policy_witness = None  # the caller may change the gradients before second_step
        return perturbed

    def _first_step(self, zero_grad: bool, local_grads: bool) -> bool:
        if self._phase is not _Phase.IDLE:
            raise RuntimeError(
                f"{type(self).__name__}.first_step() called twice without second_step() in between"
            )
        if self._scaler_enabled():
            check_not_unscaled(self.grad_scaler, self)
        self.grad_evals += 1
        self._policy_witness = None
        self._local_grads = bool(local_grads) and is_distributed()
        filled = self._fill_unreached_grads() if self._local_grads else None
        views = self._views()
        grads = [g for view in views for g in view.grads]

        if self._scaler_enabled():
            self._found_inf = torch.zeros(1, dtype=torch.float32, device=self._grad_device(grads))
            unscale_(self.grad_scaler, grads, self._found_inf)
            if self._local_grads:
                all_reduce_mean_(self._found_inf)
            if self._found_inf.item() > 0:
                self._phase = _Phase.SKIPPED
                return False

        grad_sq_norm = None
        local_sq = None  # ||g||^2 of this rank's gradients, reused by the rule (no second norm pass)
        if self.policy.needs_grad_sq_norm:
            sq = squared_norm(grads)
            if self._local_grads:
                local_sq = sq.clone()
                all_reduce_mean_(sq)
            else:
                local_sq = sq
            grad_sq_norm = sq.item()
            self.last_grad_sq_norm = grad_sq_norm
        perturb = self._decide(grad_sq_norm) and bool(grads)

        if not perturb:
            if self._local_grads:
                self._average_local_grads(views, filled)
            self._phase = _Phase.READY
            # ||g||^2 of these very gradients when the policy read it (AE-SAM, AE-LookSAM): no second norm for the
            # finite check or the reuse step (not under DDP no_sync, where that value is a mean of local norms)
            known = grad_sq_norm is not None and not self._local_grads
            if known or self.reuse_alpha is not None:
                params = [p for view in views for p in view.params]
                if known:
                    self._policy_witness = (params, grad_sq_norm)
                if self.reuse_alpha is not None:  # LookSAM's reuse step in second_step: no second walk over groups
                    self._reuse_step = (params, math.sqrt(grad_sq_norm) if known else None)
            return False

        params = [p for view in views for p in view.params]
        if self.reuse_alpha is not None:
            clean = self._scratch(params, self._clean_grad_key())
            for dst, src in group_by_device_dtype(clean, grads):
                _foreach.copy_(dst, src)
            if self._local_grads:
                # Every rank must store the same reuse direction, so average g before decomposing.
                all_reduce_grads_mean_(clean)
        backup = self._displace(params)
        self._perturb(views, backup, grad_sq_norm=local_sq)  # w <- w + e(w); may overwrite the gradients
        self._phase = _Phase.PERTURBED
        if zero_grad:
            self.zero_grad()
        return True

    @_foreach.no_grad
    @uses_foreach_option
    def abort_step(self) -> None:
        """Abandon the step begun by :meth:`first_step` (e.g. the perturbed pass raised): the weights go back
        to ``w`` bit for bit, BatchNorm statistics to those of the first pass, nothing is applied or counted
        beyond the passes already spent. A no-op between steps."""
        phase, self._phase = self._phase, _Phase.IDLE
        self._step_losses = None
        if phase is _Phase.PERTURBED:
            self._restore_perturbed()
            self._forget_reuse_direction()
            self._undo_decision()

    def _displace(self, params: list[Tensor]) -> list[Tensor]:
        """Before the weights leave ``w``: back them up (returned) and the first pass's BatchNorm statistics;
        :meth:`_restore_perturbed` undoes both."""
        backup = self._scratch(params, _BACKUP)
        self._backup_buckets = group_by_device_dtype(backup, params)
        for dst, src in self._backup_buckets:
            _foreach.copy_(dst, src)
        if self._bn_guard is not None:
            self._bn_guard.save()
        self._perturbed_params = params
        return backup

    def _restore_perturbed(self) -> list[Tensor]:
        """Back to ``w`` from the backup (bit-exact) and the first pass's BatchNorm statistics."""
        params = self._perturbed_params
        self._perturbed_params = []
        for src, dst in self._backup_buckets:  # the (backup, params) buckets _displace copied
            _foreach.copy_(dst, src)
        self._backup_buckets = []
        if self._bn_guard is not None:
            self._bn_guard.restore()
        return params

    @_foreach.no_grad
    @uses_foreach_option
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly (after a SAM step) and apply the base optimizer's update; then the step
        post-hooks run (see :meth:`first_step`)."""
        self._second_step(zero_grad)
        self._opt_called = True  # what an LR scheduler's wrapper of step() sets: no "scheduler before step" warning
        self._run_step_hooks(pre=False)

    def _run_step_hooks(self, *, pre: bool) -> None:
        """The hooks torch.optim runs around ``step`` (global and this optimizer's), for the two-phase API, whose
        step has no arguments for a pre-hook to replace."""
        first, second = ((_torch_optimizer._global_optimizer_pre_hooks, self._optimizer_step_pre_hooks) if pre else
                         (self._optimizer_step_post_hooks, _torch_optimizer._global_optimizer_post_hooks))
        if not (first or second):  # the usual case: no hooks, nothing to walk
            return
        for hook in [*first.values(), *second.values()]:
            if hook(self, (self,), {}) is not None and pre:
                raise RuntimeError(f"{type(self).__name__}.first_step(): a step pre-hook returned new arguments; "
                                   "the two-phase API takes none (use step(closure) for such hooks)")

    def _second_step(self, zero_grad: bool) -> None:
        phase = self._phase
        if phase is _Phase.IDLE:
            raise RuntimeError(f"{type(self).__name__}.second_step() called without first_step()")
        self._phase = _Phase.IDLE

        if phase is _Phase.SKIPPED:
            self._skip(zero_grad)
            return

        if phase is _Phase.PERTURBED:
            self.grad_evals += 1
            params = self._restore_perturbed()  # back to w, bit-exact
            if self._scaler_enabled():
                grads = [g for view in self._views() for g in view.grads]
                unscale_(self.grad_scaler, grads, self._found_inf)
                if self._local_grads:
                    all_reduce_mean_(self._found_inf)
                if self._found_inf.item() > 0:
                    self._skip(zero_grad)
                    return
            try:
                # LookSAM/GSAM build their direction first: its ||g_s||^2 is the check's (a failed check drops it)
                witness = self._store_reuse_direction(params) if self.reuse_alpha is not None else None
                self._check_losses(witness)
            except FloatingPointError:
                self._forget_reuse_direction()
                self._undo_decision()
                raise
            self.sam_steps += 1
        else:
            witness, self._policy_witness = self._policy_witness, None
            if self.reuse_alpha is not None:
                (params, grad_norm), self._reuse_step = self._reuse_step, ([], None)
                witness = self._apply_reuse_direction(params, grad_norm) or witness
            try:
                self._check_losses(witness)
            except FloatingPointError:
                self._undo_decision()
                raise

        if self.max_grad_norm is not None:
            params_with_grad = [p for view in self._views() for p in view.params]
            torch.nn.utils.clip_grad_norm_(params_with_grad, self.max_grad_norm)
        self.base_optimizer.step()
        self.steps += 1
        if self._scaler_enabled():
            record_step(self.grad_scaler, self, self._found_inf)
        if zero_grad:
            self.zero_grad()

    # ------------------------------------------------------------------ internals
    def _scaler_enabled(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def _decide(self, grad_sq_norm: float | None) -> bool:
        """``policy.decide`` for this step. The policy's state before it is kept until the step is applied, so a
        step that fails or is skipped after the decision (:meth:`_undo_decision`) leaves the policy as it found
        it: AE-SAM's running mean and variance see no ``||g||^2`` of a step that never happened, and a retried
        SS-SAM step draws the same decision. (One small dict per step: three floats, or a generator's state.)"""
        self._policy_before = (self.steps, self.policy.state_dict())
        return bool(self.policy.decide(self.steps, grad_sq_norm))

    def _undo_decision(self) -> None:
        """Put the policy back as it was before this step's :meth:`_decide`: nothing when this step made none
        (its index is ``self.steps`` until the step is applied, so an applied step's decision is never undone)."""
        before, self._policy_before = self._policy_before, None
        if before is not None and before[0] == self.steps:
            self.policy.load_state_dict(before[1])

    def _skip(self, zero_grad: bool = False) -> None:
        """Abandon the step (inf/NaN under a GradScaler): weights are already back at ``w``. ``zero_grad`` is
        honoured as on an applied step: the non-finite gradients left in ``p.grad`` would poison the next
        step's backward, and every step after it would overflow too. The policy's state goes back to what it
        was before this step's decision."""
        self._undo_decision()
        self.skipped_steps += 1
        record_step(self.grad_scaler, self, self._found_inf)
        if zero_grad:
            self.zero_grad()

    def _forget_reuse_direction(self) -> None:
        """A SAM step that failed after :meth:`first_step` copied ``g`` over the stored ``g_v`` (the reuse buffer
        doubles as ``g``'s, see :meth:`_clean_grad_key`): drop ``g_v``, as before the first SAM step, so reuse
        steps add nothing until the next SAM step stores a direction, instead of adding the failed step's ``g``
        at the old ``||g_v||``."""
        if self.reuse_alpha is None or self._clean_grad_key() != _REUSE:
            return
        for p in self._all_params():
            self.state.get(p, {}).pop(_REUSE, None)
        self._reuse_norm = None

    def _keeps_reuse_direction(self) -> bool:
        """Whether ``g_v`` (LookSAM's stored direction) outlives a step and goes into the checkpoint."""
        return self.reuse_alpha is not None

    def _clean_grad_key(self) -> str:
        """Where a LookSAM SAM step keeps ``g`` until ``g_s`` is known: in the reuse buffer itself (``g_v`` is
        then built over it, so LookSAM keeps two parameter-sized buffers, not three), except under a
        GradScaler, whose overflow skip must leave the previous ``g_v`` intact."""
        return _CLEAN_GRAD if self._scaler_enabled() else _REUSE

    def _gradient_pair(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor] | None:
        """After a SAM step's restore: ``(params, g, g_s, <g, g_s>)`` over the parameters with a perturbed gradient,
        ``g`` as first_step kept it and ``g_s`` in ``p.grad`` (None when no parameter has one)."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return None
        key = self._clean_grad_key()
        clean = [self.state[p][key] for p in params]
        sam_grads = [p.grad for p in params]
        # on a device, <g, g_s> from two fused norms in the weights' backup (free once they are restored), not one
        # dot per tensor (one launch each); on the CPU per-tensor dots cost no launch
        scratch = None if _foreach.host_read_is_free(sam_grads[0]) else self._scratch(params, _BACKUP)
        return params, clean, sam_grads, dot(clean, sam_grads, scratch=scratch)

    def _store_reuse_direction(self, params: list[Tensor]) -> GradWitness | None:
        r"""LookSAM: ``g_v = g_s - (<g, g_s> / ||g||^2) g``, the part of the SAM gradient orthogonal to ``g``.

        A ``g_v`` at rounding level (``||g_v|| <= 32 eps ||g_s||``, e.g. ``rho = 0`` where ``g_s = g``) is
        stored as exactly zero: normalizing rounding noise to ``alpha ||g||`` would inject a random direction.
        ``||g_v||`` is cached for the reuse steps (recomputed after a checkpoint load). Returns ``||g_s||^2``
        over the parameters it used, for the finite check (None when no parameter has a gradient).
        """
        over_clean = self._clean_grad_key() == _REUSE
        if over_clean:  # a parameter without a perturbed gradient holds g, not a g_v: it adds no direction
            for p in params:
                if p.grad is None:
                    self.state[p][_REUSE].zero_()
        pair = self._gradient_pair(params)
        if pair is None:
            return None
        params, clean, sam_grads, inner = pair
        # a number on the CPU (no 0-d kernels), a 0-d tensor elsewhere (no host synchronisation)
        neg_coef = -_foreach.divide_floored(inner, squared_norm(clean))
        direction = clean if over_clean else self._scratch(params, _REUSE)
        for dst, g_s, g in group_by_device_dtype(direction, sam_grads, clean):
            c = _foreach.like(neg_coef, dst[0])
            if over_clean:
                _foreach.mul_(dst, c)  # dst <- -coef * g, over g itself
                _foreach.add_(dst, g_s)  # dst <- g_s - coef * g
            else:
                _foreach.copy_(dst, g_s)
                _foreach.add_scaled_(dst, g, c)  # dst <- g_s - coef * g, in place
        eps = max(torch.finfo(dtype).eps for dtype in {p.dtype for p in params})
        sq, sam_sq, level = squared_norm(direction), squared_norm(sam_grads), (32 * eps) ** 2
        if _foreach.host_read_is_free(sq) and _foreach.host_read_is_free(sam_sq):
            if float(sq) > level * float(sam_sq):
                self._reuse_norm = self._norm_from_squared(sq)
            else:  # rounding noise: no pass over the direction unless it must be zeroed
                for (bucket,) in group_by_device_dtype(direction):
                    _foreach.zero_(bucket)
                self._reuse_norm = 0.0
            return params, sam_sq
        keep = (sq > level * sam_sq).to(sq.dtype)
        for (bucket,) in group_by_device_dtype(direction):
            _foreach.mul_(bucket, _foreach.like(keep, bucket[0]))
        self._reuse_norm = self._norm_from_squared(sq * keep)
        return params, sam_sq

    @staticmethod
    def _norm_from_squared(sq: Tensor) -> Tensor | float:
        """``||g_v||`` from ``||g_v||^2`` for the reuse steps: a number on the CPU, a 0-d tensor elsewhere (one
        formula for a step and for a checkpoint load, so a resumed run stays bit-identical)."""
        return math.sqrt(float(sq)) if _foreach.host_read_is_free(sq) else sq.sqrt()

    def _apply_reuse_direction(self, params: list[Tensor], grad_norm: float | None = None) -> GradWitness | None:
        r"""LookSAM reuse step: ``g <- g + alpha * ||g|| / ||g_v|| * g_v`` (no-op before the first SAM step) over
        ``params``, those first_step found with a gradient; ``grad_norm``: their ``||g||`` when already read.
        Returns the ``||g||`` it took itself, for the finite check (which then reads no gradient), else None."""
        reusing = [p for p in params if p.grad is not None and _REUSE in self.state[p]]
        if len(reusing) != len(params):  # ||g|| over another set of tensors
            grad_norm = None
        params = reusing
        if not params:
            return None
        grads = [p.grad for p in params]
        direction = [self.state[p][_REUSE] for p in params]
        if self._reuse_norm is None:  # after a checkpoint load: the same formula as _store_reuse_direction's
            self._reuse_norm = self._norm_from_squared(squared_norm(direction))
        # numbers on the CPU (or when ||g|| was read for the policy), 0-d tensors (no host read) elsewhere
        norm = _foreach.read_if_free(global_norm(grads)) if grad_norm is None else grad_norm
        scale = self.reuse_alpha * norm / (self._reuse_norm + 1e-12)
        for g, v in group_by_device_dtype(grads, direction):
            _foreach.add_scaled_(g, v, scale)  # g <- g + scale * g_v, in place
        return (params, norm) if grad_norm is None else None

    # ------------------------------------------------------------------ checkpoints
    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's ``state_dict`` plus a ``"sharpness"`` entry with the wrapper's own state.

        Param groups (with ``rho``, ``initial_lr``, ...) are shared, so they are saved once, by the base.
        """
        if self._phase is not _Phase.IDLE:
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() called between first_step() and second_step(); "
                "save the optimizer between steps"
            )
        state = self.base_optimizer.state_dict()
        param_state = {}
        keeps_reuse = self._keeps_reuse_direction()
        for index, p in enumerate(self._all_params()):
            kept = {k: v.clone() for k, v in self.state.get(p, {}).items() if k in _PERSISTENT_KEYS}
            if keeps_reuse and p.requires_grad and not p.is_meta and _REUSE not in kept:
                # no direction yet (it adds nothing then, as a zero one does): saved as zeros, so that a fresh
                # optimizer's state has the entries of a trained one's (DCP loads a checkpoint into it; a meta
                # model's state dict has no data to load from, so it gets none)
                kept[_REUSE] = torch.zeros_like(p)
            if kept:
                param_state[index] = kept
        state["sharpness"] = {
            "version": 1,
            "optimizer": type(self).__name__,  # a load into another class is refused before anything changes
            "counters": {
                "steps": self.steps,
                "sam_steps": self.sam_steps,
                "grad_evals": self.grad_evals,
                "skipped_steps": self.skipped_steps,
            },
            "policy": self.policy.state_dict(),
            "param_state": param_state,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict):
            raise TypeError(f"Invalid state_dict type: {type(state_dict).__name__} (expected a dict)")
        state_dict = dict(state_dict)
        extra = state_dict.pop("sharpness", None)
        if extra is None:
            raise ValueError(
                f"This state_dict has no 'sharpness' entry, so it was not saved by a sharpness optimizer; "
                f"to load a plain torch optimizer's state use {type(self).__name__}.base_optimizer.load_state_dict()"
            )
        if extra.get("version") != 1:
            raise ValueError(f"Unsupported sharpness state_dict version: {extra.get('version')!r} (expected 1)")
        name = type(self).__name__
        saved_by = "SALR" if "salr" in extra else "EntropySGD" if "entropy_sgd" in extra else extra.get("optimizer")
        if saved_by is not None and saved_by != name:
            raise ValueError(f"This state_dict was saved by {saved_by}, not {name}; nothing was loaded (build the "
                             f"same optimizer class to resume, or load the base state with "
                             f"{name}.base_optimizer.load_state_dict())")
        # (an empty "policy" or "param_state" may be absent: DCP's flattening, as under broadcast_from_rank0,
        # drops empty dicts)
        missing = [key for key in ("counters",) if key not in extra]
        if missing:
            raise ValueError(f"Invalid state_dict: its 'sharpness' entry has no {missing} (saved by another "
                             "optimizer?); nothing was loaded")
        self.base_optimizer.load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self._wrapper_defaults.items():
                group.setdefault(key, value)
        counters = extra["counters"]
        self.steps = int(counters["steps"])
        self.sam_steps = int(counters["sam_steps"])
        self.grad_evals = int(counters["grad_evals"])
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.policy.load_state_dict(extra.get("policy", {}))
        params = self._all_params()
        self._reuse_norm = None
        self._scratch_lists.clear()
        for p in params:
            for key in _PERSISTENT_KEYS:
                self.state[p].pop(key, None)
        for index, saved in extra.get("param_state", {}).items():
            index = int(index)
            if not 0 <= index < len(params):
                raise ValueError(f"Invalid parameter index {index} in state_dict (the optimizer has {len(params)})")
            p = params[index]
            for key, value in saved.items():
                if key in _PERSISTENT_KEYS:  # (a subclass reads its own keys)
                    self.state[p][key] = value.detach().clone().to(device=p.device, dtype=p.dtype)

    def __repr__(self) -> str:
        rho = sorted({group["rho"] for group in self.param_groups})
        rho_text = rho[0] if len(rho) == 1 else rho
        parts = [f"rho={rho_text}", f"rule={self.rule!r}", f"policy={self.policy!r}"]
        if self.reuse_alpha is not None:
            parts.append(f"alpha={self.reuse_alpha}")
        base = "\n    ".join(repr(self.base_optimizer).splitlines())
        return f"{type(self).__name__}({', '.join(parts)},\n  base={base})"
