"""SALR: a sharpness-aware learning rate for any optimizer (Yue, Nouiehed, Al Kontar; TNNLS 2023)."""

from __future__ import annotations

import functools
import heapq
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import _foreach
from .._compile import EagerUnderCompile
from .._foreach import group_by_device_dtype, squared_norm, uses_foreach_option
from .._validation import (
    check_bool,
    check_choice,
    check_dense_grads,
    check_int_at_least,
    check_positive,
    check_wrapper_options,
)
from .._walk import per_sample_inverse_norms
from ..batchnorm import RunningStatsGuard
from ..distributed import all_reduce_grads_mean_, all_reduce_mean_, check_not_sharded, ddp_module, is_distributed
from ._checkpoint import unpack
from ._finite import FiniteLossCheck
from ._state import SharesBaseParamGroups, scratch_buffers

__all__ = ["SALR"]

Closure = Callable[[], Any]

NORMALIZATIONS = ("batch", "per_sample")

# Scratch buffers (per parameter, allocated once, never checkpointed).
_WEIGHT = "salr_weight"  # w, restored bit for bit after the walks
_GRAD = "salr_grad"  # the training gradient at w, restored after the walks
_FIRST = "salr_first_direction"  # per-sample mode: d(w), the reused first step of both walks
_DIRECTION = "salr_direction"  # per-sample mode: d(w + e) at the current point of a walk


class _RunningMedian:
    """Median of a growing list of floats in O(log k) per insert (two heaps), equal to ``statistics.median``."""

    def __init__(self) -> None:
        self._low: list[float] = []  # max-heap of the lower half (negated)
        self._high: list[float] = []  # min-heap of the upper half

    def push(self, value: float) -> None:
        if self._low and value > -self._low[0]:
            heapq.heappush(self._high, value)
        else:
            heapq.heappush(self._low, -value)
        if len(self._low) > len(self._high) + 1:
            heapq.heappush(self._high, -heapq.heappop(self._low))
        elif len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))

    @classmethod
    def of(cls, values: list[float]) -> _RunningMedian:
        """The running median of ``values`` pushed in order."""
        median = cls()
        for value in values:
            median.push(value)
        return median

    def median(self) -> float:
        if not self._low:
            return math.nan
        if len(self._low) > len(self._high):
            return -self._low[0]
        return (-self._low[0] + self._high[0]) / 2


class SALR(EagerUnderCompile, FiniteLossCheck, SharesBaseParamGroups, torch.optim.Optimizer):
    r"""Sharpness-aware learning rate: scale every group's learning rate by the relative local sharpness.

    Every ``every`` steps (the paper's ``c``) the step sharpness ``S_k`` is estimated on the current batch
    (Definition 1 / Algorithm 2) and the learning rate of every param group becomes (Algorithm 1)

    .. math::
        w_-^{(i+1)} = w_-^{(i)} - \gamma\, d(w_-^{(i)}), \quad w_+^{(i+1)} = w_+^{(i)} + \gamma\, d(w_+^{(i)}),
        \quad w_\pm^{(0)} = w, \qquad S_k = L_B(w_+^{(n_2)}) - L_B(w_-^{(n_1)}),

        \eta_k = \eta_0 \, \frac{S_k}{\mathrm{median}(S_1, \dots, S_k)}

    with ``d = g / ||g||`` (``normalization="batch"``, Definition 1 on the mini-batch) or
    ``d = (1/|B|) sum_j g_j / ||g_j||`` (``"per_sample"``, Algorithm 2). In between estimates the last factor
    is reused. The wrapped optimizer then takes its own step with ``lr = factor * lr_0``: SGD gives SGD-SALR
    (Algorithm 3), Adam gives Adam-SALR (Algorithm 4), :class:`~sharpness.optim.EntropySGD` gives
    Entropy-SGD-SALR, and a sharpness optimizer of the engine (SAM, AE-SAM, ...) gives SAM-SALR: there the
    estimate starts from the gradient of SAM's first pass at ``w`` and SAM then takes its own perturbed pass,
    so only the learning rate of SAM's update is sharpness-aware.

    **Learning-rate schedulers.** ``param_groups`` are the wrapped optimizer's (shared dicts), so any torch
    LR scheduler composes: the scheduler (or the harness) owns ``group["lr"]``, the base rate ``lr_0`` of the
    step; SALR multiplies it by the factor for the inner step only and restores the exact base value after,
    so schedulers keep seeing their own values. The effective rate is ``schedule(t) * factor_k``.

    **Cost.** The first descent and the first ascent step both start at ``w``; both use the gradient of the
    training pass (no extra evaluation). An estimate step therefore runs the closure
    ``1 + (n_1 - 1) + (n_2 - 1) + 2 = n_1 + n_2 + 1`` times (the two endpoint losses
    ``L(w_\pm)`` need a pass each; with a standard closure its backward is wasted), i.e. ``(n_1 + n_2) / c``
    extra passes per step on average, as the paper counts -- a literal implementation needs two more
    gradients (at ``w`` for each walk) plus two forwards. SALR sets ``needs_per_sample_losses``: a closure built
    by :func:`sharpness.make_closure` (and the harness's) returns the per-sample losses without backward, SALR
    back-propagates their mean where it needs a gradient, and the endpoints cost a forward only (counted in
    ``loss_evals``): ``n_1 + n_2 - 1`` gradient evaluations per estimate step, the floor of this design, in
    both normalizations. A hand-written closure that back-propagates a scalar loss is accepted too (batch
    normalization), at the paper's count.
    Per-sample gradients come from one forward and a ``vmap``-ed backward
    (``torch.autograd.grad(..., is_grads_batched=True)``): memory ``|B| x`` the parameter count per pass, or
    ``per_sample_chunk x`` with the backward run over that many samples at a time (the same total work in
    more, smaller launches; the sums then differ from one chunk's in rounding only).
    The walks move the live weights (``w <- w + sign gamma d``) and restore them bit for bit; SALR keeps two
    parameter-sized buffers (``w`` and ``g(w)``) in batch mode, four in per-sample mode (``+ d(w), d(w + e)``).

    **Degenerate estimates.** A non-finite ``S_k`` is not recorded (``skipped_estimates``) and the last factor
    is kept. If ``S_k <= 0`` (a flat point: the walks stay put where ``g = 0``; or a noise-dominated estimate)
    or the median is ``<= 0`` (a run started at a stationary point), the ratio is undefined and the factor is
    1 (the base optimizer's rate). The factor is then clamped to ``[min_factor, max_factor]`` (unbounded by
    default, as in the paper). The learning rate is therefore never NaN nor negative.

    Args:
        optimizer: the optimizer *instance* to wrap (torch optimizer, :class:`EntropySGD`, SAM-family...).
        n_descent: ``n_1 >= 1`` normalized descent steps.
        n_ascent: ``n_2 >= 1`` normalized ascent steps.
        gamma: step length ``> 0`` of the walks (paper 0.002 for MNIST/CIFAR).
        every: estimate every ``c >= 1`` steps (paper 2).
        normalization: ``"batch"`` or ``"per_sample"`` (see above).
        per_sample_chunk: ``"per_sample"`` only: samples per vmapped backward (``>= 1``; None: the whole batch
            at once), which bounds the per-sample gradients' memory (see above).
        min_factor, max_factor: optional bounds ``> 0`` on the factor (``min_factor <= max_factor``);
            ``min_factor = max_factor = 1`` makes SALR its inner optimizer exactly (``neutral_options``).
        inner: a registered optimizer name (``"sam"``, ``"entropysgd"``, ...) to build around ``optimizer``
            with ``model``, ``max_grad_norm``, ``inner_options`` and ``**kwargs``; None wraps ``optimizer`` as
            given.
        inner_options: the inner optimizer's options as a mapping. Needed where an inner option shares a name
            with SALR's own (Entropy-SGD's scope ``gamma``: ``gamma=0.002, inner_options={"gamma": 0.03}``);
            other inner options may equally be given as keywords (``inner="sam", rho=0.05``). A name in both is
            an error.
        model: the model; enables the BatchNorm guard (the walks' passes leave the running statistics as the
            training pass left them).
        max_grad_norm: clip the training gradient (plain inner optimizers) or passed to ``inner``.
        check_finite: check the losses of the step's passes once before the update (one host read per step); a
            NaN or inf raises ``FloatingPointError`` with the weights and the inner state unchanged.
        foreach: fused ``torch._foreach_*`` list ops (None/True) or one tensor at a time (False; same results).

    Counters: ``steps``, ``grad_evals`` (closure calls with a backward), ``loss_evals`` (forward-only calls),
    ``estimates``, ``skipped_estimates``, ``sam_steps`` and ``skipped_steps`` (the inner optimizer's, 0 for a
    plain one),
    ``sam_fraction``. For plots: ``last_sharpness``, ``last_factor``, ``sharpness_history`` (one per
    estimate), ``factor_history`` and ``lr_history`` (group 0's effective rate, one per step).

    Example::

        opt = sharpness.SALR(torch.optim.SGD(model.parameters(), lr=0.01), gamma=0.002, every=2)
        loss = opt.step(sharpness.make_closure(opt, lambda r: F.cross_entropy(model(x), y, reduction=r)))

    Reference: X. Yue, M. Nouiehed, R. Al Kontar. SALR: Sharpness-aware Learning Rate Scheduler for Improved
    Generalization. IEEE TNNLS 2023 (ICLR 2021 submission).
    """

    supports_complex: ClassVar[bool] = True  # equal to the real view (tested)
    #: Flags of the default configuration (n_1 = n_2 = 5, batch normalization, plain inner optimizer); each
    #: instance overrides them with its own values.
    min_grad_evals_per_step: ClassVar[int] = 1
    max_grad_evals_per_step: ClassVar[int] = 11
    needs_closure: ClassVar[bool] = True
    needs_graph: ClassVar[bool] = False
    needs_per_sample_losses: ClassVar[bool] = False
    neutral_options: ClassVar[dict[str, Any]] = {"min_factor": 1.0, "max_factor": 1.0}
    standard_closure_options: ClassVar[dict[str, Any]] = {}
    supports_grad_scaler: ClassVar[bool] = False
    has_unperturbed_pass: ClassVar[bool] = True  # the training pass at w; the walks' passes keep no BN statistics
    scales_base_lr: ClassVar[bool] = True  # the inner step uses lr * factor (the sharpness-aware rate)
    base_gradient_is_displacement: ClassVar[bool] = False
    supports_sync_perturbation: ClassVar[bool] = False  # no per-worker pass: DDP all-reduces every pass
    supports_maximize: ClassVar[bool] = True  # S is the same for -L (the walks swap ends); the inner decides
    description: ClassVar[str] = "SALR: lr = lr_0 * S_hat / median(S_hat) from normalized walks (Yue et al., 2023)"

    def __init__(self, optimizer: torch.optim.Optimizer, *, n_descent: int = 5, n_ascent: int = 5,
                 gamma: float = 0.002, every: int = 2, normalization: str = "batch",
                 per_sample_chunk: int | None = None,
                 min_factor: float | None = None, max_factor: float | None = None, inner: str | None = None,
                 model: nn.Module | None = None, max_grad_norm: float | None = None,
                 check_finite: bool = True, foreach: bool | None = None,
                 inner_options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer type: {type(optimizer).__name__} (expected a torch.optim.Optimizer "
                            "instance, e.g. torch.optim.SGD(model.parameters(), lr=0.01))")
        if isinstance(optimizer, SALR):
            raise TypeError("SALR cannot wrap another SALR (wrap its inner optimizer instead)")
        self.n_descent = check_int_at_least("n_descent", n_descent, 1)
        self.n_ascent = check_int_at_least("n_ascent", n_ascent, 1)
        self.gamma = check_positive("gamma", gamma)
        self.every = check_int_at_least("every", every, 1)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        if per_sample_chunk is not None:
            per_sample_chunk = check_int_at_least("per_sample_chunk", per_sample_chunk, 1)
            if self.normalization != "per_sample":
                raise ValueError(f"Invalid per_sample_chunk value: {per_sample_chunk} with normalization="
                                 f"{normalization!r} (it bounds the per-sample gradients of "
                                 "normalization='per_sample' only)")
        self.per_sample_chunk = per_sample_chunk
        self.min_factor = None if min_factor is None else check_positive("min_factor", min_factor)
        self.max_factor = None if max_factor is None else check_positive("max_factor", max_factor)
        if self.min_factor is not None and self.max_factor is not None and self.min_factor > self.max_factor:
            raise ValueError(f"Invalid min_factor/max_factor values: {min_factor} > {max_factor} "
                             "(expected min_factor <= max_factor)")
        max_grad_norm = check_wrapper_options(model, max_grad_norm, foreach)
        self.foreach = foreach
        self.check_finite = check_bool("check_finite", check_finite)
        self._ddp = ddp_module(model)
        lrs = [group["lr"] for group in optimizer.param_groups]
        if any(not isinstance(lr, (int, float, Tensor)) or float(lr) < 0 or math.isnan(float(lr)) for lr in lrs):
            raise ValueError(f"Invalid lr value: {lrs} (expected lr_0 >= 0 in every param group)")
        if all(float(lr) == 0 for lr in lrs):
            raise ValueError("Invalid lr value: 0 in every param group (expected lr_0 > 0: SALR scales lr_0, so "
                             "nothing would move)")

        if inner_options is not None and not isinstance(inner_options, Mapping):
            raise TypeError(f"Invalid inner_options type: {type(inner_options).__name__} (expected a mapping of the "
                            "inner optimizer's option names to values)")
        twice = sorted(set(inner_options or {}) & set(kwargs))
        if twice:
            raise ValueError(f"Invalid inner options: {twice} given both as keywords and in inner_options (give "
                             "each once)")
        inner_options = {**(inner_options or {}), **kwargs}
        if inner is not None:
            from ..registry import create  # the registry imports this module

            optimizer = create(inner, optimizer, model=model, max_grad_norm=max_grad_norm, **inner_options)
            max_grad_norm = None  # the inner optimizer clips its own final gradient
        elif inner_options:
            raise TypeError(f"SALR got unexpected keyword arguments {sorted(inner_options)} (options of an inner "
                            "optimizer need inner=NAME, e.g. inner='sam', rho=0.05)")
        self.optimizer = optimizer
        self.inner = inner
        self.model = model
        self.max_grad_norm = max_grad_norm
        self._bn_guard = RunningStatsGuard(model) if model is not None else None
        # Instance flags: this configuration's cost (the class flags describe the defaults).
        inner_min = int(getattr(optimizer, "min_grad_evals_per_step", 1))
        inner_max = int(getattr(optimizer, "max_grad_evals_per_step", 1))
        walk = self.n_descent + self.n_ascent - 2  # gradient passes of the walks (first steps reused)
        per_sample = self.normalization == "per_sample"
        # Both normalizations take per-sample-loss closures (forward-only endpoints); the batch one also takes a
        # standard closure, whose endpoint passes then include a wasted backward (the +2 below).
        self.needs_per_sample_losses = True
        self.max_grad_evals_per_step = inner_max + walk + (0 if per_sample else 2)
        self.min_grad_evals_per_step = inner_min if self.every > 1 else self.max_grad_evals_per_step

        self.steps = 0
        self.grad_evals = 0
        self.loss_evals = 0
        self.estimates = 0
        self.skipped_estimates = 0
        self.last_sharpness: float | None = None
        self.last_factor = 1.0
        self.sharpness_history: list[float] = []
        self.factor_history: list[float] = []
        self.lr_history: list[float] = []
        self._median = _RunningMedian()
        super().__init__(list(optimizer.param_groups), dict(optimizer.defaults))
        if per_sample:
            check_not_sharded("SALR", self.param_groups, "normalization='per_sample'", "its per-sample gradients "
                              "(autograd.grad with is_grads_batched) bypass FSDP2's reduce-scatter; use "
                              "normalization='batch'")

    # ------------------------------------------------------------------ shared param groups (SharesBaseParamGroups)
    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer (its ``param_groups`` are this optimizer's)."""
        return self.optimizer

    @property
    def sam_steps(self) -> int:
        """The inner optimizer's perturbed (SAM) steps; 0 for a plain optimizer."""
        return int(getattr(self.optimizer, "sam_steps", 0))

    @property
    def skipped_steps(self) -> int:
        """The inner optimizer's skipped steps (GradScaler overflow); 0 for a plain optimizer."""
        return int(getattr(self.optimizer, "skipped_steps", 0))

    @property
    def sam_fraction(self) -> float:
        return self.sam_steps / self.steps if self.steps else 0.0

    @property
    def median_sharpness(self) -> float | None:
        """``median(S_1..S_k)`` of the recorded estimates (None before the first)."""
        return self._median.median() if self.sharpness_history else None

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    @uses_foreach_option
    def step(self, closure: Closure | None = None, **inner_closures: Closure) -> Any:  # type: ignore[override]
        """One SALR step; returns the loss at ``w``. The closures run ``1`` to ``max_grad_evals_per_step`` times.

        Args:
            closure: the step's closure (the estimate's walks run it on the step's mini-batch).
            **inner_closures: further closures the inner optimizer's ``step`` takes by keyword, e.g.
                Entropy-SGD's ``langevin_closure`` (a fresh mini-batch per Langevin step), in ``closure``'s
                convention; each call is one of SALR's passes (counted in ``grad_evals``, its loss checked).
        """
        if closure is None or not callable(closure):
            raise TypeError("SALR.step() requires a closure (clear grads, forward, backward, return the loss; with "
                            "normalization='per_sample' return the per-sample losses without backward: build it "
                            "with sharpness.make_closure(opt, compute_loss))")
        if inner_closures:  # refused before any pass is spent
            taken = inspect.signature(self.optimizer.step).parameters
            unknown = sorted(set(inner_closures) - set(taken))
            if unknown:
                raise TypeError(f"Invalid SALR.step() keyword(s) {unknown}: {type(self.optimizer).__name__}.step() "
                                "takes no such closure")
            for name, extra in inner_closures.items():
                if not callable(extra):
                    raise TypeError(f"Invalid {name} type: {type(extra).__name__} (expected a closure)")
        closure = self._watch_losses(closure)
        extras = {name: self._watch_losses(extra, same_step=True) for name, extra in inner_closures.items()}
        saved = self._history_marks()
        try:
            return self._step(closure, extras)
        except BaseException:
            self._rewind(saved)  # a failed step records no estimate, factor or rate
            raise

    def _history_marks(self) -> tuple[Any, ...]:
        """The estimator's counters and last values, and the lengths of its histories (what a step adds to)."""
        return (self.estimates, self.skipped_estimates, self.last_sharpness, self.last_factor,
                len(self.sharpness_history), len(self.factor_history), len(self.lr_history))

    def _rewind(self, marks: tuple[Any, ...]) -> None:
        """Back to :meth:`_history_marks`' values: the running median is rebuilt only if an estimate was added."""
        (self.estimates, self.skipped_estimates, self.last_sharpness, self.last_factor,
         sharpness, factors, rates) = marks
        if len(self.sharpness_history) != sharpness:
            del self.sharpness_history[sharpness:]
            self._median = _RunningMedian.of(self.sharpness_history)
        del self.factor_history[factors:]
        del self.lr_history[rates:]

    def _step(self, closure: Closure, inner_closures: dict[str, Closure]) -> Any:
        estimate = self.steps % self.every == 0
        per_sample = self.normalization == "per_sample"
        if per_sample and estimate:
            params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
            loss = self._per_sample_pass(closure, params, first=True)
            params = [p for p in params if p.grad is not None]  # as after a backward: unused ones keep None
        else:
            loss = self._pass(closure, backward=True)
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        check_dense_grads(type(self).__name__, [p.grad for p in params])
        if estimate and params:
            self._estimate(closure, params)

        # the training pass and the estimate's walks, before the factor or the update is used; the gradients too,
        # unless the inner optimizer checks those it applies (a sharpness wrapper: one gradient probe per step)
        inner = self.optimizer
        self._check_losses(gradients=not (isinstance(inner, FiniteLossCheck) and inner.check_finite))
        factor = self.last_factor
        base_lrs = [group["lr"] for group in self.param_groups]
        replayed = False

        def inner_closure() -> Any:  # the inner optimizer's first pass is the one already done
            nonlocal replayed
            if not replayed:
                replayed = True
                return loss
            return self._pass(closure, backward=True)

        try:
            for group, lr in zip(self.param_groups, base_lrs):
                group["lr"] = lr * factor
            self.lr_history.append(float(self.param_groups[0]["lr"]))
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_grad_norm)
            self.optimizer.step(inner_closure, **{name: functools.partial(self._pass, extra, backward=True)
                                                  for name, extra in inner_closures.items()})
        finally:
            for group, lr in zip(self.param_groups, base_lrs):
                group["lr"] = lr  # the scheduler's own value, bit for bit
        self.factor_history.append(factor)
        self.steps += 1
        return loss

    # ------------------------------------------------------------------ passes
    def _pass(self, closure: Closure, *, backward: bool) -> Tensor:
        """Run the closure once; per-sample losses are averaged (and back-propagated if ``backward``)."""
        with torch.enable_grad():
            out = closure()
        if not isinstance(out, Tensor):
            raise TypeError(f"Invalid closure output: {type(out).__name__} (expected a loss tensor)")
        if out.dim() == 0:
            self.grad_evals += 1  # a standard closure always back-propagates
            return out.detach()
        with torch.enable_grad():  # step() runs under no_grad; the mean must stay on the graph
            loss = out.mean()
        if backward:
            with torch.enable_grad():
                loss.backward()
            self.grad_evals += 1
        else:
            self.loss_evals += 1
        return loss.detach()

    def _per_sample_pass(self, closure: Closure, params: list[Tensor], *, first: bool,
                         out: list[Tensor] | None = None) -> Tensor:
        """One forward of the per-sample losses and a vmapped backward: writes ``(1/|B|) sum_j g_j/||g_j||``
        into ``out`` (or, at ``w``, the first direction buffer and the mean gradient into ``p.grad``)."""
        with torch.enable_grad():
            losses = closure()
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"Invalid closure output: shape {shape} (normalization='per_sample' needs the "
                             "per-sample losses, shape [B], without backward: use sharpness.make_closure)")
        self.grad_evals += 1
        size = losses.shape[0]
        chunk = size if self.per_sample_chunk is None else min(self.per_sample_chunk, size)
        eye = torch.eye(size, dtype=losses.dtype, device=losses.device)
        target = out if out is not None else self._scratch(params, _FIRST)
        unused: list[bool] = []
        for start in range(0, size, chunk):
            rows = eye[start:start + chunk]  # the backward of these samples' losses, vmapped
            grads = torch.autograd.grad(losses, params, grad_outputs=rows, is_grads_batched=True, allow_unused=True,
                                        retain_graph=start + chunk < size)
            unused = [g is None for g in grads]
            grads = [torch.zeros((len(rows), *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                     for g, p in zip(grads, params)]
            scale = per_sample_inverse_norms(grads) / size
            for dst, g in zip(target, grads):
                if start == 0:
                    torch.tensordot(scale.to(g.dtype), g, dims=1, out=dst)
                else:
                    dst.add_(torch.tensordot(scale.to(g.dtype), g, dims=1))
            if first:
                self._accumulate_mean_grad(params, grads, unused, start, len(rows), size)
            del grads
        if is_distributed():  # autograd.grad bypasses DDP's reducer: average as it would (equal local batches)
            all_reduce_grads_mean_(target)  # the direction over the global batch, the same on every rank
            if first:
                self._average_grads(params, unused)
        return losses.detach().mean()

    @staticmethod
    def _accumulate_mean_grad(params: list[Tensor], grads: list[Tensor], unused: list[bool], start: int,
                              count: int, size: int) -> None:
        """``p.grad`` <- the mean of the per-sample gradients, from the chunk of ``count`` samples from ``start``
        of ``size`` (one chunk: ``mean``; several: their sum, divided by ``size`` after the last). A parameter
        the losses do not use keeps its ``p.grad`` (None after zero_grad), as backward leaves it."""
        whole, last = count == size, start + count >= size
        for p, g, skip in zip(params, grads, unused):
            if skip:
                continue
            if whole:
                if p.grad is None:
                    p.grad = g.mean(0)
                else:
                    torch.mean(g, 0, out=p.grad)
                continue
            if start == 0:
                if p.grad is None:
                    p.grad = g.sum(0)
                else:
                    torch.sum(g, 0, out=p.grad)
            else:
                p.grad.add_(g.sum(0))
            if last:
                p.grad.div_(size)

    @staticmethod
    def _average_grads(params: list[Tensor], unused: list[bool]) -> None:
        """``p.grad`` <- its mean over the ranks, as DDP's reducer (``find_unused_parameters=True``) leaves it: a
        parameter this rank's losses do not use counts as zeros, one no rank's losses use keeps its ``p.grad``."""
        grads = [torch.zeros_like(p) if skip else p.grad for p, skip in zip(params, unused)]
        found = all_reduce_grads_mean_(grads, [not skip for skip in unused])
        for p, g, skip, computed in zip(params, grads, unused, found or ()):
            if skip and computed:
                p.grad = g

    def _scratch(self, params: list[Tensor], key: str) -> list[Tensor]:
        return scratch_buffers(self.state, params, key)

    # ------------------------------------------------------------------ the estimate
    def _estimate(self, closure: Closure, params: list[Tensor]) -> None:
        """Both walks on the live weights (``w <- w + sign * gamma * d(w)``, Definition 1 as written), then the
        endpoint losses; the weights, ``p.grad`` and the BatchNorm statistics are restored bit for bit."""
        weight = self._scratch(params, _WEIGHT)
        grad = self._scratch(params, _GRAD)
        per_sample = self.normalization == "per_sample"
        for dst, src in group_by_device_dtype(weight, params):
            _foreach.copy_(dst, src)
        _foreach.copy_grouped_(grad, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        # per-sample mode: d(w) comes from the training pass (first buffer), d(w + e) is built in a buffer; batch
        # mode steps along the gradient itself, scaled by gamma / ||g|| (no direction buffer, no offset buffer)
        first = self._scratch(params, _FIRST) if per_sample else grad
        direction = self._scratch(params, _DIRECTION) if per_sample else None

        if self._bn_guard is not None:
            self._bn_guard.save()
        devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
        # the last walk pass's gradient tensors: the endpoint pass clears p.grad (zero_grad), and g(w) is then
        # handed back in them instead of in a fresh clone (no parameter-sized allocation)
        spare: list[Tensor | None] = [None] * len(params)
        try:
            # The walks' passes draw dropout masks from a forked RNG: the training randomness is unchanged.
            with torch.random.fork_rng(devices=devices):
                ends = []
                for sign, steps in ((-1.0, self.n_descent), (1.0, self.n_ascent)):
                    if ends:  # the ascent starts from w again (after the last walk, the finally block restores)
                        for dst, src in group_by_device_dtype(params, weight):
                            _foreach.copy_(dst, src)
                    for i in range(steps):
                        if i == 0:  # d(w): both walks reuse the training pass
                            moved, along = params, first
                        elif per_sample:
                            self._per_sample_pass(closure, params, first=False, out=direction)
                            moved, along = params, direction
                        else:
                            # No reference to the last pass's gradient tensors is held through the next pass (its
                            # closure clears them, and they must be freed before its backward allocates new ones)
                            spare, moved, along = [None] * len(params), [], []
                            self._pass(closure, backward=True)
                            spare = [p.grad for p in params]
                            moved = [p for p in params if p.grad is not None]  # no gradient: no move
                            along = [p.grad for p in moved]
                        if per_sample:
                            _add_scaled_grouped(moved, along, sign * self.gamma)
                        else:
                            _normalized_step_(moved, along, sign * self.gamma)
                    ends.append(self._pass(closure, backward=False))
        finally:
            for dst, src in group_by_device_dtype(params, weight):
                _foreach.copy_(dst, src)  # back to w, bit for bit
            for p, g, s in zip(params, grad, spare):
                if p.grad is None:
                    p.grad = g.clone() if s is None else s.copy_(g)
                else:
                    p.grad.copy_(g)
            if self._bn_guard is not None:
                self._bn_guard.restore()
        losses = torch.stack([end.to(torch.float64) for end in ends])
        if is_distributed():  # the endpoint losses are this rank's: average them so every rank records the same S_k
            all_reduce_mean_(losses)
        self._record(float(losses[1] - losses[0]))

    def _record(self, sharpness: float) -> None:
        """Append ``S_k`` to the history and set the factor (guards in the class docstring)."""
        self.estimates += 1
        if not math.isfinite(sharpness):
            self.skipped_estimates += 1
            return
        self.last_sharpness = sharpness
        self.sharpness_history.append(sharpness)
        self._median.push(sharpness)
        median = self._median.median()
        factor = sharpness / median if sharpness > 0 and median > 0 else 1.0
        if not math.isfinite(factor):
            factor = 1.0
        if self.min_factor is not None:
            factor = max(factor, self.min_factor)
        if self.max_factor is not None:
            factor = min(factor, self.max_factor)
        self.last_factor = factor

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's ``state_dict`` with SALR's state under ``state["sharpness"]["salr"]``."""
        state = unpack(self.optimizer.state_dict())  # a sharpness wrapper's entry, native, joins SALR's
        extra = dict(state.get("sharpness", {"version": 1}))
        extra["salr"] = {
            "version": 1,
            "counters": {"steps": self.steps, "grad_evals": self.grad_evals, "loss_evals": self.loss_evals,
                         "estimates": self.estimates, "skipped_estimates": self.skipped_estimates},
            "last_sharpness": self.last_sharpness,
            "last_factor": self.last_factor,
            "sharpness_history": list(self.sharpness_history),
            "factor_history": list(self.factor_history),
            "lr_history": list(self.lr_history),
        }
        state["sharpness"] = extra
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict):
            raise TypeError(f"Invalid state_dict type: {type(state_dict).__name__} (expected a dict)")
        state_dict = dict(state_dict)
        extra = dict(state_dict.pop("sharpness", {}) or {})
        salr = extra.pop("salr", None)
        if salr is None:
            raise ValueError("This state_dict has no SALR entry (state['sharpness']['salr']); to load the inner "
                             "optimizer's own state use SALR.optimizer.load_state_dict()")
        if salr.get("version") != 1:
            raise ValueError(f"Unsupported SALR state_dict version: {salr.get('version')!r} (expected 1)")
        if isinstance(self.optimizer, SharesBaseParamGroups):  # a sharpness wrapper: its entry goes back to it
            state_dict["sharpness"] = extra
        self.optimizer.load_state_dict(state_dict)
        counters = salr["counters"]
        self.steps = int(counters["steps"])
        self.grad_evals = int(counters["grad_evals"])
        self.loss_evals = int(counters["loss_evals"])
        self.estimates = int(counters["estimates"])
        self.skipped_estimates = int(counters["skipped_estimates"])
        self.last_sharpness = salr["last_sharpness"]
        self.last_factor = float(salr["last_factor"])
        self.sharpness_history = [float(s) for s in salr["sharpness_history"]]
        self.factor_history = [float(s) for s in salr["factor_history"]]
        self.lr_history = [float(s) for s in salr["lr_history"]]
        self._median = _RunningMedian.of(self.sharpness_history)

    def __repr__(self) -> str:
        parts = [f"n_descent={self.n_descent}", f"n_ascent={self.n_ascent}", f"gamma={self.gamma}",
                 f"every={self.every}", f"normalization={self.normalization!r}"]
        if self.per_sample_chunk is not None:
            parts.append(f"per_sample_chunk={self.per_sample_chunk}")
        if self.min_factor is not None or self.max_factor is not None:
            parts.append(f"factor_bounds=({self.min_factor}, {self.max_factor})")
        inner = "\n    ".join(repr(self.optimizer).splitlines())
        return f"SALR({', '.join(parts)},\n  optimizer={inner})"


def _add_scaled_grouped(params: list[Tensor], along: list[Tensor], scale: Tensor | float) -> None:
    for p, d in group_by_device_dtype(params, along):
        _foreach.add_scaled_(p, d, scale)


def _normalized_step_(params: list[Tensor], grads: list[Tensor], step: float) -> None:
    """``w <- w + step * g / ||g||`` (the global norm over all tensors); no move where ``g = 0``.

    On the CPU the squared norm is read (free there) and ``step / ||g||`` is Python arithmetic, one fused pass
    per tensor; on a device it stays a 0-d tensor (no host read)."""
    sq = _foreach.read_if_free(squared_norm(grads)) if grads else 0.0
    if isinstance(sq, Tensor):
        scale: Tensor | float = torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).rsqrt() * step,
                                            torch.zeros_like(sq))
    elif sq != 0:  # a NaN gradient propagates (the endpoint loss is then non-finite: the estimate is skipped)
        scale = step / math.sqrt(sq)
    else:
        return
    _add_scaled_grouped(params, grads, scale)
