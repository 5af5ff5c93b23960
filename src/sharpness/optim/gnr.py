"""GNR: the gradient norm regularizer, added to the loss (SGD, AdamW, ...) or SAM gradient."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _foreach
from .._attention import math_attention
from .._compile import is_compiled_double_backward_error
from .._foreach import global_norm, group_by_device_dtype, squared_norm, uses_foreach_option
from .._validation import check_choice, check_int_at_least, check_non_negative, check_positive
from ..distributed import check_not_sharded, ddp_module
from ..policies.base import Policy
from ..policies.periodic import Periodic
from ..rules.base import ParamGroupView, PerturbationRule
from ..rules.sam import SAMPerturbation, climb_
from .engine import _BACKUP, SharpnessAwareOptimizer

__all__ = ["GNR"]

HVP_MODES = ("exact", "finite_difference")
ORACLES = ("sgd", "sam")

# Scratch buffer (allocated once, reused every step; never checkpointed: nothing outlives a step); the backup of w
# is the engine's (_displace / _restore_perturbed).
_ORACLE_GRAD = "oracle_grad"


class GNR(SharpnessAwareOptimizer):
    r"""Gradient norm regularizer: descend on ``L_oracle(w) + alpha * rho * max_{||e|| <= rho} ||grad L(w + e)||``.

    Algorithm 1 of the paper, per step on the mini-batch ``B`` (``g(w) = grad L_B(w)``, ``H(w)`` its Hessian):

    .. math::
        f = \frac{H(w)\, g(w)}{\|g(w)\| + \xi}, \qquad
        w_{adv} = w + \rho \frac{f}{\|f\| + \xi}, \qquad
        h_{norm} = \rho\, \frac{H(w_{adv})\, g(w_{adv})}{\|g(w_{adv})\| + \xi}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ h_{loss} + \alpha\, h_{norm}\big)

    ``h_loss`` is the oracle gradient: ``g(w)`` (``oracle="sgd"``, with any base optimizer: SGD+GNR,
    AdamW+GNR), the SAM gradient ``g(w + rho_o g/||g||)`` (``oracle="sam"``) or the gradient at the ascent
    point of any :class:`~sharpness.rules.PerturbationRule` (e.g. ASAM's). Momentum, Adam moments, weight decay
    and LR schedulers of the base optimizer act on the combined gradient. The weights are restored bit-exactly
    from a backup after each shifted pass.

    **Hessian-vector products.** ``hvp="exact"``: the closure calls ``loss.backward(create_graph=True)`` (the
    instance attribute ``needs_graph`` is True; :func:`sharpness.make_closure` and the harness read it), so
    ``p.grad`` carries its graph and ``H v = d<g, v>/dw`` is one extra backward pass through it
    (``torch.autograd.grad(grads, params, grad_outputs=v)``); the graph is released right afterwards (the
    gradients are replaced by detached tensors: no ``param -> grad -> graph -> param`` reference cycle
    survives the step). ``hvp="finite_difference"``: ``H v ~ (g(w + r v) - g(w)) / r`` with the unit vector
    ``v`` and ``r = fd_radius`` (one extra closure call, any standard closure, error O(r)).

    **Passes per step.** One *gradient evaluation* (``grad_evals``) is one closure call (forward + backward)
    or one extra backward through a gradient's graph (a double-backward HVP; it costs about one to two
    backward passes). With ``o`` the oracle's passes (1 for ``"sgd"``, 2 for ``"sam"`` or a rule):

    * a step without GNR (the policy says no, or ``alpha=0``): the oracle alone, ``o`` evaluations;
    * a GNR step, ``hvp="exact"``: ``o + 1`` closure calls (``w``, [the oracle's ascent point], ``w_adv``) and
      2 double backwards (at ``w`` and at ``w_adv``): ``o + 3`` evaluations;
    * a GNR step, ``hvp="finite_difference"``: ``o + 3`` closure calls (``w``, ``w + r u``, [the oracle's
      ascent point], ``w_adv``, ``w_adv + r u'``): ``o + 3`` evaluations.

    So ``grad_evals == steps * o + gnr_steps * 3``. The oracle gradient ``g(w)`` and the first HVP share the
    first pass. With the SAM oracle the SAM ascent point ``w + rho_o g/||g||`` and ``w_adv`` (along
    ``f = Hg/||g||``) are different points, so the SAM pass cannot be shared with ``w_adv``: ``o + 3`` is the
    floor for this algorithm without further approximation. In exact mode every closure call of a GNR-capable
    step builds a graph (the closure cannot know which passes will need it); ``alpha=0`` switches it off.

    ``alpha=0`` (``neutral_options``) is the oracle optimizer exactly, at the oracle's cost: no graph, no HVP,
    the policy is not consulted. SAM+GNR with ``alpha=0`` is :class:`~sharpness.SAM` bit for bit.

    **Fraction of iterations** (the paper's Table 4): ``every=k`` runs GNR on steps ``0, k, 2k, ...``
    (:class:`~sharpness.policies.Periodic`); any policy instance may be given instead (e.g.
    ``policies.Bernoulli(0.1)``). ``sam_steps`` counts the GNR steps (alias ``gnr_steps``), ``sam_fraction``
    their fraction. The paper raises ``alpha`` when GNR runs on fewer steps.

    **Schedules.** ``rho`` is read from each param group (``group["rho"]``) at every step, like ``lr``;
    Theorem 2.3 assumes ``lr_t = lr_0/sqrt(t)`` and ``rho_t = rho_0/sqrt(t)``::

        opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, alpha=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / math.sqrt(t + 1))
        for t, (x, y) in enumerate(loader):
            for group in opt.param_groups:
                group["rho"] = 0.1 / math.sqrt(t + 1)
            opt.step(sharpness.make_closure(opt, lambda red: F.cross_entropy(model(x), y, reduction=red)))
            sched.step()

    A zero gradient gives ``f = 0``, ``w_adv = w`` and ``h_norm = 0`` (``xi`` guards every division): no NaN.

    Args:
        params_or_base: a base optimizer instance, e.g. ``torch.optim.AdamW(model.parameters(), lr=1e-3)``;
            or parameters together with ``base_class`` and its keyword options (davda54 form).
        base_class: optimizer class for the davda54 form.
        rho: the GNR radius (> 0; paper 0.1 on CIFAR, grid {0.05, ..., 2.0}); per param group as ``rho``.
        alpha: weight of the regularizer (>= 0; paper 0.1 on CIFAR, larger when ``every > 1``).
        xi: small constant guarding the three normalizations (> 0; paper's xi).
        hvp: ``"exact"`` (double backward, needs the create_graph closure) or ``"finite_difference"``.
        oracle: ``"sgd"`` (the loss gradient), ``"sam"`` or a :class:`~sharpness.rules.PerturbationRule`.
        oracle_rho: radius of the oracle's perturbation (>= 0; default: ``rho``), per group as ``oracle_rho``.
        every: GNR on every ``every``-th step (integer >= 1), or a :class:`~sharpness.policies.Policy`.
        fd_radius: step ``r`` of the finite-difference HVP (> 0; the vectors are unit vectors, so ``r`` is a
            distance in weight space; the error is O(r), the rounding error O(eps ||g|| / r)).
        **kwargs: engine options ``model`` (BatchNorm statistics from the first pass only) and
            ``max_grad_norm`` (clips the combined gradient); ``grad_scaler`` is not supported (use bf16
            autocast). In the davda54 form, the base optimizer's options.

    Example::

        opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1, alpha=0.1)
        loss = opt.step(sharpness.make_closure(opt, lambda red: F.cross_entropy(model(x), y, reduction=red)))

    Reference: Gradient Norm Regularizer Seeks Flat Minima and Improves Generalization. Anonymous authors,
    ICLR 2023 submission (OpenReview), Algorithm 1, eqs. (1)-(6), section 3.5.
    """

    supports_complex: ClassVar[bool] = True  # equal to the real view (tested)
    min_grad_evals_per_step = 1
    max_grad_evals_per_step = 5
    needs_graph = True  # class flag: *can* need the graph; the instance attribute says whether it does
    neutral_options: ClassVar[dict[str, Any]] = {"alpha": 0.0}
    standard_closure_options: ClassVar[dict[str, Any]] = {"hvp": "finite_difference"}
    supports_grad_scaler: ClassVar[bool] = False
    supports_sync_perturbation: ClassVar[bool] = False  # no per-worker pass: DDP all-reduces every pass
    description = "GNR: oracle (loss or SAM) gradient + alpha rho grad||g(w_adv)|| via Hessian-vector products"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.1, alpha: float = 0.1,
                 xi: float = 1e-12, hvp: str = "exact", oracle: str | PerturbationRule = "sgd",
                 oracle_rho: float | None = None, every: int | Policy = 1, fd_radius: float = 1e-3,
                 **kwargs: Any) -> None:
        rho = check_positive("rho", rho)
        alpha = check_non_negative("alpha", alpha)
        xi = check_positive("xi", xi)
        hvp = check_choice("hvp", hvp, HVP_MODES)
        fd_radius = check_positive("fd_radius", fd_radius)
        if oracle_rho is not None:
            oracle_rho = check_non_negative("oracle_rho", oracle_rho)
        if isinstance(oracle, PerturbationRule):
            rule: PerturbationRule | None = oracle
        elif isinstance(oracle, str):
            rule = SAMPerturbation() if check_choice("oracle", oracle, ORACLES) == "sam" else None
        else:
            raise TypeError(f"Invalid oracle type: {type(oracle).__name__} (expected 'sgd', 'sam' or a "
                            "sharpness.rules.PerturbationRule)")
        if isinstance(every, Policy):
            policy = every
        else:
            policy = Periodic(check_int_at_least("every", every, 1))
        if kwargs.get("grad_scaler") is not None:
            raise ValueError("GNR does not support grad_scaler (an exact HVP of a scaled loss would need its own "
                             "unscaling); train in float32 or with bf16 autocast, which needs no scaler")
        model = kwargs.get("model")
        if hvp == "exact" and ddp_module(model) is not None:
            raise ValueError("GNR(hvp='exact') does not support DistributedDataParallel (DDP does not support "
                             "double backward); use hvp='finite_difference'")
        # The engine needs a rule object; GNR drives its own passes and uses self.rule only as the oracle.
        super().__init__(params_or_base, base_class, rule=rule or SAMPerturbation(), policy=policy, rho=rho,
                         **kwargs)
        self.rule = rule
        self.alpha = alpha
        self.xi = xi
        self.hvp = hvp
        self.fd_radius = fd_radius
        self.oracle = oracle if isinstance(oracle, str) else oracle.name
        #: closure calls of the oracle alone (1 or 2); a GNR step adds ``extra_grad_evals``
        self.oracle_grad_evals = 1 if rule is None else 2
        self.extra_grad_evals = 3
        # truthful per-instance flags (the class's are the registry's bounds over every setting)
        self.max_grad_evals_per_step = self.oracle_grad_evals + (self.extra_grad_evals if alpha > 0 else 0)
        every_step = isinstance(policy, Periodic) and policy.k == 1
        self.min_grad_evals_per_step = self.max_grad_evals_per_step if every_step else self.oracle_grad_evals
        #: instance flag: the closure must call ``loss.backward(create_graph=True)``
        self.needs_graph = hvp == "exact" and alpha > 0
        if self.needs_graph:
            check_not_sharded("GNR", self.param_groups, "hvp='exact'", "FSDP2 reduce-scatters gradients without "
                              "their graph (no double backward); use GNR(..., hvp='finite_difference')")
        if oracle_rho is not None:
            self._wrapper_defaults["oracle_rho"] = oracle_rho
            self.defaults["oracle_rho"] = oracle_rho
            for group in self.param_groups:
                group.setdefault("oracle_rho", oracle_rho)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_positive("rho", self.param_groups[-1]["rho"])

    @property
    def gnr_steps(self) -> int:
        """Steps that applied the regularizer (the engine's ``sam_steps`` counter)."""
        return self.sam_steps

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    @uses_foreach_option
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One GNR step (``o`` or ``o + 3`` gradient evaluations, see the class docstring); returns the loss at w."""
        if closure is None:
            raise TypeError(
                "GNR.step() requires a closure that clears the gradients, runs forward and backward and returns the "
                "loss; build it with sharpness.make_closure(opt, compute_loss) so that exact HVPs get create_graph"
            )
        if not callable(closure):
            raise TypeError(f"Invalid closure type: {type(closure).__name__} (expected a callable)")

        closure = self._watch_losses(closure)
        self._perturbed_params = []
        try:
            return self._step(closure)
        except BaseException as error:
            if self._perturbed_params:  # a pass raised while the weights were moved: back to w
                self._restore_perturbed()
            self._undo_decision()
            if self.hvp == "exact" and is_compiled_double_backward_error(error):
                raise RuntimeError(
                    "GNR(hvp='exact') differentiates the gradients again (double backward), which a torch.compile'd "
                    "model does not support: use hvp='finite_difference' (one more forward and backward pass "
                    "instead) or the eager model"
                ) from error
            raise

    def _step(self, closure: Callable[[], Any]) -> Any:
        loss = self._evaluate(closure)  # pass 1 at w: g(w) (with its graph in exact mode)
        self._check_losses_if_free()  # a NaN pass 1 stops before the passes at shifted weights
        if isinstance(loss, Tensor) and loss.requires_grad:
            loss = loss.detach()  # the returned loss must not pin the forward graph (create_graph mode)
        groups = [(view.group, view.params) for view in self._views() if view.params]
        params = [p for _, ps in groups for p in ps]
        if not params:
            self.steps += 1  # nothing to update; the base step is a no-op
            return loss
        grads = [p.grad for p in params]
        gnr = False
        if self.alpha > 0:
            grad_sq_norm = None
            if self.policy.needs_grad_sq_norm:
                grad_sq_norm = squared_norm([g.detach() for g in grads]).item()
                self.last_grad_sq_norm = grad_sq_norm
            gnr = self._decide(grad_sq_norm)

        if not gnr:
            del grads
            self._release_graph(params)
            if self.rule is not None:
                self._oracle_pass(closure, groups, params, [p.grad for p in params])  # SAM gradient in p.grad
            self._apply(params)
            return loss

        if self.hvp == "exact" and not any(g.requires_grad for g in grads):
            raise RuntimeError(
                "GNR(hvp='exact') needs gradients with a graph: the closure must call "
                "loss.backward(create_graph=True) when optimizer.needs_graph is True (sharpness.make_closure does), "
                "or use hvp='finite_difference'"
            )
        backup = self._displace(params)  # w and pass 1's BatchNorm statistics; an exception restores them
        oracle_grad = self._scratch(params, _ORACLE_GRAD)  # g(w) now, h_loss later
        _foreach.copy_grouped_(oracle_grad, [g.detach() for g in grads])
        grad_sq_norm_t = squared_norm(oracle_grad)

        # f = H(w) g(w) / (||g(w)|| + xi): shares pass 1 (exact: one double backward; FD: one more pass)
        # No list may hold pass 1's gradient tensors through a later closure call (nor, after the climb, f): the
        # closure clears p.grad, and they must be freed before its backward allocates new ones (peak memory).
        # The finite difference takes g(w) from its copy in oracle_grad, so it gets no reference to them at all.
        graph_grads = grads if self.hvp == "exact" else []
        del grads
        f = self._normalized_hvp(closure, params, graph_grads, oracle_grad, grad_sq_norm_t.sqrt(), backup)
        del graph_grads

        # h_loss: the oracle gradient (g(w) is already in oracle_grad for the plain-loss oracle)
        if self.rule is not None:
            self._oracle_pass(closure, groups, params, oracle_grad, grad_sq_norm=grad_sq_norm_t, restore=False)
            _foreach.copy_grouped_(oracle_grad, [p.grad for p in params])
            self._restore(params, backup)

        # w_adv = w + rho f / (||f|| + xi), per-group rho: SAM's climb along f (f is scratch afterwards)
        views, offset = [], 0
        for group, ps in groups:
            views.append(ParamGroupView(group, ps, f[offset:offset + len(ps)]))
            offset += len(ps)
        climb_(views, global_norm(f), self.xi)
        del views, f

        # h_norm / rho = H(w_adv) g(w_adv) / (||g(w_adv)|| + xi)
        self._evaluate(closure)
        adv_grads = [self._grad_or_zeros(p) for p in params]
        adv_plain = [g.detach() for g in adv_grads]
        adv_norm = global_norm(adv_plain)
        h_norm = self._normalized_hvp(closure, params, adv_grads, adv_plain, adv_norm, None)
        self._restore_perturbed()

        # p.grad <- h_loss + alpha * rho * h_norm / rho, per-group rho
        offset = 0
        for group, ps in groups:
            hs = h_norm[offset:offset + len(ps)]
            ls = oracle_grad[offset:offset + len(ps)]
            offset += len(ps)
            for bucket_h, bucket_l in group_by_device_dtype(hs, ls):
                _foreach.mul_(bucket_h, self.alpha * group["rho"])
                _foreach.add_(bucket_h, bucket_l)
            for p, h in zip(ps, hs):
                p.grad = h
        self._apply(params)
        self.sam_steps += 1  # counted once applied (a failed check raises in _apply)
        return loss

    # ------------------------------------------------------------------ passes
    def _evaluate(self, closure: Callable[[], Any]) -> Any:
        # exact HVPs differentiate the closure's backward again, which attention's fused kernels cannot
        with torch.enable_grad(), math_attention() if self.hvp == "exact" else contextlib.nullcontext():
            loss = closure()
        self.grad_evals += 1
        return loss

    @staticmethod
    def _grad_or_zeros(p: Tensor) -> Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)

    @staticmethod
    def _release_graph(params: list[Tensor]) -> None:
        """Replace graph-carrying gradients by detached ones (breaks the param -> grad -> graph cycle)."""
        for p in params:
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()

    def _restore(self, params: list[Tensor], backup: list[Tensor]) -> None:
        for dst, src in group_by_device_dtype(params, backup):
            _foreach.copy_(dst, src)  # back to w, bit-exact

    def _oracle_pass(self, closure: Callable[[], Any], groups: list[tuple[dict[str, Any], list[Tensor]]],
                     params: list[Tensor], direction: list[Tensor], *, grad_sq_norm: Tensor | None = None,
                     restore: bool = True) -> None:
        """Climb with the oracle's rule along ``direction`` (overwritten), take the pass; p.grad holds h_loss.

        With ``restore=True`` the weights are backed up before and restored after (the non-GNR path);
        otherwise the caller restores them.
        """
        # without restore: the caller's backup, equal to w now
        backup = self._displace(params) if restore else self._scratch(params, _BACKUP)
        views, offset = [], 0
        for group, ps in groups:
            rule_group = group if "oracle_rho" not in group else {**group, "rho": group["oracle_rho"]}
            views.append(ParamGroupView(rule_group, ps, direction[offset:offset + len(ps)]))
            offset += len(ps)
        self._perturb(views, backup, grad_sq_norm=grad_sq_norm)
        self._evaluate(closure)
        self._release_graph(params)
        if restore:
            self._restore_perturbed()

    def _normalized_hvp(self, closure: Callable[[], Any], params: list[Tensor], grads: list[Tensor],
                        vector: list[Tensor], vector_norm: Tensor, backup: list[Tensor] | None) -> list[Tensor]:
        """``H(w) g / (||g|| + xi)`` (= grad ||g|| for xi -> 0) at the current weights, ``g = vector``.

        ``vector`` must be the (detached) gradient at the current weights and ``grads`` the same gradients as
        p.grad holds them (with their graph in exact mode).

        Exact: one double backward through ``grads`` (then the graph is released). Finite difference: one
        closure call at ``w + r u`` with ``u = vector / (||vector|| + xi)``; the weights are then restored from
        ``backup``, or left for the caller to restore (``backup=None``).
        """
        inv = 1.0 / (_foreach.read_if_free(vector_norm) + self.xi)  # a number on the CPU, else a 0-d tensor
        if self.hvp == "exact":
            used = [i for i, g in enumerate(grads) if g.requires_grad]
            parts: tuple[Tensor | None, ...] = (None,) * len(params)
            if used:  # d<g, v>/dw; gradients without a graph are constant in w (zero Hessian rows)
                with torch.enable_grad():
                    parts = torch.autograd.grad([grads[i] for i in used], params,
                                                grad_outputs=[vector[i] for i in used], allow_unused=True)
            out = [part if part is not None else torch.zeros_like(p) for part, p in zip(parts, params)]
            self.grad_evals += 1
            self._release_graph(params)
            for (bucket,) in group_by_device_dtype(out):
                _foreach.mul_(bucket, _foreach.like(inv, bucket[0]))
            return out
        # finite difference: (g(w + r u) - g(w)) / r, with g(w) = vector (its own gradients)
        shift = self.fd_radius * inv
        for bucket_p, bucket_v in group_by_device_dtype(params, vector):
            _foreach.add_scaled_(bucket_p, bucket_v, shift)
        # The shifted pass gets fresh gradient buffers, and the result is not left in them: ``vector`` may be
        # the current buffers (g(w_adv)), and the caller keeps the result across later passes, so a closure that
        # zeroes in place (zero_grad(set_to_none=False)) would overwrite either.
        for p in params:
            p.grad = None
        self._evaluate(closure)
        shifted = [self._grad_or_zeros(p) for p in params]
        for p in params:
            p.grad = None
        if backup is not None:
            self._restore(params, backup)
        for bucket_s, bucket_v in group_by_device_dtype(shifted, vector):
            _foreach.sub_(bucket_s, bucket_v)
            _foreach.mul_(bucket_s, 1.0 / self.fd_radius)
        return shifted

    def _apply(self, params: list[Tensor]) -> None:
        self._check_losses()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.base_optimizer.step()
        self.steps += 1

    # ------------------------------------------------------------------ the two-phase API does not apply
    def first_step(self, zero_grad: bool = False, *, local_grads: bool = False) -> bool:
        raise NotImplementedError("GNR takes up to five passes per step: use step(closure) "
                                  "(sharpness.make_closure builds the closure), not first_step()/second_step()")

    def second_step(self, zero_grad: bool = False) -> None:
        raise NotImplementedError("GNR takes up to five passes per step: use step(closure) "
                                  "(sharpness.make_closure builds the closure), not first_step()/second_step()")

    def __repr__(self) -> str:
        rho = sorted({group["rho"] for group in self.param_groups})
        rho_text = rho[0] if len(rho) == 1 else rho
        parts = [f"rho={rho_text}", f"alpha={self.alpha}", f"xi={self.xi}", f"hvp={self.hvp!r}",
                 f"oracle={self.oracle!r}", f"policy={self.policy!r}"]
        if self.hvp == "finite_difference":
            parts.append(f"fd_radius={self.fd_radius}")
        base = "\n    ".join(repr(self.base_optimizer).splitlines())
        return f"GNR({', '.join(parts)},\n  base={base})"
