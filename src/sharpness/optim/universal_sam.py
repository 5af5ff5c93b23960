r"""Universal SAM: descend on ``L + lam * phi(E psi(x(d)))`` (Tahmasebi et al., ICML 2024), and its presets.

The (phi, psi, mu)-sharpness-aware objective (the paper's Definition 2) replaces the quadratic form ``d^T H d``
of a :class:`~sharpness.measures.SharpnessMeasure` by a zeroth-order proxy and estimates the expectation with
``m`` directions ``d_i ~ mu`` per step:

.. math::
    x_i = \kappa\,\frac{L(w + \rho d_i) - L(w)}{\rho^2}, \qquad
    s = \frac1m \sum_i \psi(x_i), \qquad
    \mathcal L_\rho(w) = L(w) + \lambda\, \beta_m\, \phi(s),

differentiated by the chain rule with ``g_0 = grad L(w)``, ``g_i = grad L(w + rho d_i)``:

.. math::
    G = g_0 + \lambda\, \beta_m \sum_{j=1}^{n} \frac{\partial\phi}{\partial s_j}(s)\,
        \frac1m \sum_{i=1}^m \psi_j'(x_i)\, \gamma\, (g_i - g_0), \qquad w \leftarrow \mathrm{base\_step}(w, G).

``beta_m = m / (m - 1)`` for a variance-type measure (Frobenius), else 1. Two scalings:

* ``scaling="paper"``: ``kappa = 2`` and ``gamma = 2 / rho^2`` (Definition 2 exactly: ``x_i -> d_i^T H d_i``);
* ``scaling="authors"`` (default, the authors' public code, whose published hyper-parameters it reproduces):
  ``kappa = 1`` and ``gamma = 1`` (no factor 2, the ``1/rho^2`` of the chain rule folded into ``lam``).
  For trace and Frobenius this is the paper's update with ``lam_paper = lam * rho^2 / 2`` (trace) and
  ``lam * rho^2 / 4`` (Frobenius); for the determinant the two differ beyond a constant (``exp(x)`` weights).

Cost: ``1 + m`` closure calls (forward + backward) per step; steps a policy skips (or all steps with ``lam=0``)
cost one and equal the base optimizer's step bit for bit. Directions are drawn from a ``torch.Generator`` on the
parameters' device, created at the first draw (so the optimizer can be built on a ``meta`` model; its state is in
``state_dict()["param_groups"][0]["sharpness"]["generator"]``), into the gradient buffers, so
a step needs ``2 + min(m - 1, n)`` parameter-sized buffers, all preallocated: the weights backup, ``g_0``, and for
passes ``1..m-1`` either their gradients (``m - 1 <= n``) or ``n`` running sums ``sum_i psi_j'(x_i) g_i``; the
last pass's gradient is combined where it lies. So 2 for Trace-SAM and Det-SAM (``m = 1``), 3 for Frob-SAM
(``m = 2``).
A param group's own ``rho`` scales its part of the perturbation (a group with ``rho=0`` is not perturbed), while
the normalization above uses the optimizer's ``rho``: this measures the sharpness of ``D H D`` with ``D`` the
diagonal of group ``rho`` ratios, itself a (phi, psi, mu) measure.

Presets: :class:`TraceSAM` (``psi = id``: ``G = (1 - lam) g_0 + lam mean g_i`` in the authors' scaling),
:class:`FrobSAM` (``G = g_0 + lam / (rho^2 (m - 1)) sum_i (L_i - mean L)(g_i - mean g)``, the cross-covariance of
perturbed losses and gradients) and :class:`DetSAM` (``d ~ U[-a, a]^p``; with one sample
``G = g_0 + lam exp(L_1 - L_0)(g_1 - g_0)`` for the authors' ``rho = 1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _foreach
from .._foreach import group_by_device_dtype, squared_norm, uses_foreach_option
from .._validation import check_choice, check_int_at_least, check_non_negative, check_positive
from ..amp import record_step, unscale_
from ..distributed import all_reduce_mean_, is_distributed
from ..measures.universal import SharpnessMeasure, resolve_measure
from ..policies.always import Always
from ..policies.base import Policy
from ..rules.base import ParamGroupView, PerturbationRule
from ._generator import LazyGenerator, draw_device, shard_stream
from .engine import SharpnessAwareOptimizer

__all__ = ["SCALINGS", "DetSAM", "FrobSAM", "RandomDirectionPerturbation", "TraceSAM", "UniversalSAM"]

SCALINGS = ("authors", "paper")

# Scratch buffers (allocated once per parameter, reused every step; not checkpointed).
_BACKUP = "unperturbed_weight"
_CLEAN_GRAD = "unperturbed_grad"
_KEPT = "perturbed_grad_{}"  # g_i of an earlier pass, or a running sum over them


class RandomDirectionPerturbation(PerturbationRule):
    """``w <- w + rho_group * d`` with one direction ``d ~ mu`` drawn by ``sampler`` from ``generator``.

    ``d`` is drawn into the gradient buffers (free scratch once the optimizer has used them), all parameters
    with a gradient at once and in param-group order, so a test can draw the same ``d`` from a copy of the
    generator. ``generator`` is a ``torch.Generator`` or a :class:`LazyGenerator` (created at the first draw on
    the device of the gradients).
    """

    name = "random_direction"

    def __init__(self, sampler: Any, generator: torch.Generator | LazyGenerator) -> None:
        self.sampler = sampler
        self.generator = generator

    def perturb_(self, views: list[ParamGroupView], *, grad_sq_norm: Tensor | None = None) -> None:
        grads = [g for view in views for g in view.grads]
        if not grads:
            return
        generator = self.generator
        if isinstance(generator, LazyGenerator):
            generator = generator.get(grads[0].device)
        self.sampler(grads, shard_stream(generator, grads[0]))
        for view in views:
            rho = view.group["rho"]
            if rho == 0 or not view.params:
                continue
            for params, directions in group_by_device_dtype(view.params, view.grads):
                _foreach.add_(params, directions, alpha=rho)

    def extra_repr(self) -> str:
        return f"sampler={self.sampler!r}"


class UniversalSAM(SharpnessAwareOptimizer):
    r"""Minimize ``L + lam * phi(E_mu psi(x(d)))`` for any (phi, psi, mu) (see the module docstring).

    Args:
        params_or_base: a base optimizer instance (or parameters with ``base_class``, davda54 form).
        base_class: optimizer class for the davda54 form.
        measure: a preset name (``"trace"``, ``"frobenius"``, ``"det"``, ``"worst"``) or a
            :class:`~sharpness.measures.SharpnessMeasure`.
        phi, psi, sampler, n: optional overrides of the measure's parts (``n`` = components of ``psi``).
        rho: perturbation scale ``rho > 0`` (also per group as ``group["rho"]``, see the module docstring).
        lam: regularization strength ``lam >= 0``; ``lam = 0`` is the base optimizer (one pass per step).
        num_samples: directions ``m`` per step (>= the measure's ``min_samples``, 2 for Frobenius).
        scaling: ``"authors"`` (default) or ``"paper"``, see the module docstring.
        half_width, q: options of the ``det`` and ``worst`` presets (defaults 1.0 and 8); refused with any
            other measure, where they would do nothing.
        policy: when to take the ``m`` extra passes (default :class:`~sharpness.policies.Always`); any engine
            policy works, e.g. ``Periodic`` or ``Adaptive``; skipped steps cost one pass.
        seed: seed of the direction generator, created on the parameters' device at the first draw (again, from
            ``seed``, if the parameters later move to another device type); ignored when ``generator`` is given.
        generator: a ``torch.Generator`` to draw the directions from; it stays on its device, so it must be on
            the device the parameters train on.
        **kwargs: engine options ``model`` (BatchNorm running statistics from the unperturbed pass only) and
            ``max_grad_norm`` and ``grad_scaler`` (every pass is unscaled; an inf/NaN in any pass skips the step
            with the weights restored; the closure must return the *unscaled* loss); in the davda54 form, the
            base optimizer's options.

    Example::

        opt = sharpness.UniversalSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                     measure="frobenius", rho=0.01, lam=0.005, num_samples=2)
        loss = opt.step(closure)  # closure: zero_grad, forward, backward, return loss

    Reference: B. Tahmasebi, A. Soleymani, D. Bahri, S. Jegelka, P. Jaillet. A Universal Class of
    Sharpness-Aware Minimization Algorithms. ICML 2024 (code: github.com/dbahri/universal_sam).
    """

    min_grad_evals_per_step = 2
    max_grad_evals_per_step = 2
    neutral_options: ClassVar[dict[str, Any]] = {"lam": 0.0}
    supports_sync_perturbation: ClassVar[bool] = False  # no per-worker pass: DDP all-reduces every pass
    description = "Universal SAM: L + lam * phi(E psi(2 (L(w + rho d) - L(w)) / rho^2)), 1 + m passes"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, measure: str | SharpnessMeasure = "trace",
                 phi: Any = None, psi: Any = None, sampler: Any = None, n: int | None = None, rho: float = 0.01,
                 lam: float = 1.0, num_samples: int = 1, scaling: str = "authors", half_width: float | None = None,
                 q: int | None = None, policy: Policy | None = None, seed: int = 0, generator: torch.Generator | None = None,
                 **kwargs: Any) -> None:
        measure = resolve_measure(measure, half_width=half_width, q=q)
        overrides = {key: value for key, value in (("phi", phi), ("psi", psi), ("sampler", sampler), ("n", n))
                     if value is not None}
        if "psi" in overrides or "n" in overrides:
            overrides["psi_prime"] = None  # the preset's closed forms belong to its own psi and phi
        if "phi" in overrides or "n" in overrides:
            overrides["phi_grad"] = None
        if overrides:
            measure = dataclasses.replace(measure, name=f"custom({measure.name})", **overrides)
        rho = check_positive("rho", rho) if rho != 0 else _zero_rho()
        self.lam = check_non_negative("lam", lam)
        self.num_samples = measure.check_num_samples(num_samples)
        self.scaling = check_choice("scaling", scaling, SCALINGS)
        seed = check_int_at_least("seed", seed, 0)
        if kwargs.pop("reuse_alpha", None) is not None:
            raise ValueError(f"{type(self).__name__} does not support reuse_alpha (LookSAM-style reuse of a SAM "
                             "direction); use a policy to skip the extra passes")
        if policy is None:
            policy = Always()
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator type: {type(generator).__name__} (expected a torch.Generator)")
        self.measure = measure
        self.rho = rho
        rule = RandomDirectionPerturbation(measure.sampler, LazyGenerator(seed) if generator is None else generator)
        super().__init__(params_or_base, base_class, rule=rule, policy=policy, rho=rho, **kwargs)
        self.seed = seed
        self.last_quadratic_forms: Tensor | None = None  # x_1..x_m of the last perturbed step (on device)
        self._set_flags()

    def _set_flags(self) -> None:
        """Truthful per-instance pass counts (the class flags are the registry defaults)."""
        extra = 0 if self.lam == 0 else self.num_samples
        self.max_grad_evals_per_step = 1 + extra
        self.min_grad_evals_per_step = 1 + extra if isinstance(self.policy, Always) else 1

    # ------------------------------------------------------------------ the step
    def first_step(self, zero_grad: bool = False, *, local_grads: bool = False) -> bool:
        raise RuntimeError(f"{type(self).__name__} has no two-phase API: its update needs the loss of each of its "
                           "1 + m passes; call step(closure)")

    def second_step(self, zero_grad: bool = False) -> None:
        self.first_step()

    def _loss_value(self, loss: Any, device: torch.device) -> Tensor:
        """The closure's loss as a detached 0-d tensor (checked; numbers become float64 tensors on ``device``)."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"Invalid closure output: shape {tuple(loss.shape)} (expected the scalar mean loss)")
            return loss.detach().reshape(())
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.tensor(float(loss), dtype=torch.float64, device=device)
        raise TypeError(f"Invalid closure output type: {type(loss).__name__} (expected the loss tensor)")

    def _forms(self, base_loss: Tensor, losses: list[Tensor], device: torch.device) -> Tensor:
        """``x_i = kappa (L_i - L_0) / rho^2`` in float64 on ``device`` (shape ``[len(losses)]``); one stack, and
        under DDP one all-reduce of every loss at once (the mean loss over the ranks)."""
        scale = (2.0 if self.scaling == "paper" else 1.0) / self.rho ** 2  # kappa / rho^2
        distributed = is_distributed()
        if not distributed and all(_foreach.host_read_is_free(v) for v in (base_loss, *losses)):
            base = float(base_loss)  # CPU losses: the same float64 arithmetic in Python, one tensor built
            return torch.tensor([(float(v) - base) * scale for v in losses], dtype=torch.float64, device=device)
        values = torch.stack([v.to(device=device, dtype=torch.float64) for v in [base_loss, *losses]])
        if distributed:
            all_reduce_mean_(values)
        return (values[1:] - values[0]) * scale

    @torch.no_grad()
    @uses_foreach_option
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One step: ``1 + m`` closure calls (one when the policy skips or ``lam = 0``). Returns ``L(w)``."""
        if closure is None or not callable(closure):
            raise TypeError(f"{type(self).__name__}.step() requires a closure that clears the gradients, runs "
                            "forward and backward and returns the loss")
        closure = self._watch_losses(closure)
        with torch.enable_grad():
            loss = closure()
        self.grad_evals += 1
        self._check_losses_if_free()  # a NaN pass 1 stops before the passes at w + rho d_i
        views = self._views()
        params = [p for view in views for p in view.params]
        grads = [g for view in views for g in view.grads]
        self._found_inf = None
        if self._scaler_enabled():
            self._found_inf = torch.zeros(1, dtype=torch.float32, device=self._grad_device(grads))
            unscale_(self.grad_scaler, grads, self._found_inf)
            if self._overflowed():
                return loss
        grad_sq_norm = None
        if self.policy.needs_grad_sq_norm:
            grad_sq_norm = squared_norm(grads).item()
            self.last_grad_sq_norm = grad_sq_norm
        perturb = self.lam != 0 and bool(grads) and self._decide(grad_sq_norm)
        del views, grads  # no reference to the pass-1 gradients across the closure calls below: once the closure
        # clears them (set_to_none) they are freed before its backward allocates new ones (peak memory)
        try:
            if perturb and not self._sharpness_gradient(closure, loss, params):
                return loss  # inf/NaN in a perturbed pass (GradScaler): step skipped, weights restored
            self._check_losses()
        except BaseException:
            self._undo_decision()  # (a failed pass has already put the weights back at w)
            raise
        self.sam_steps += int(perturb)  # counted once the step is sure to be applied
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for view in self._views() for p in view.params], self.max_grad_norm)
        self.base_optimizer.step()
        self.steps += 1
        if self._found_inf is not None:
            record_step(self.grad_scaler, self, self._found_inf)
        return loss

    def _overflowed(self) -> bool:
        """On an inf/NaN in the passes unscaled so far, record the skipped step and return True (one host sync)."""
        if is_distributed():
            all_reduce_mean_(self._found_inf)
        if self._found_inf.item() > 0:
            self._skip()
            return True
        return False

    def _sharpness_gradient(self, closure: Any, loss: Any, params: list[Tensor]) -> bool:
        """Run the ``m`` perturbed passes and write ``G`` into ``p.grad`` (weights restored bit for bit).

        Returns False when a pass overflowed under a GradScaler (the step is then skipped).
        """
        m, n = self.num_samples, self.measure.n
        device = params[0].device
        gamma = 2.0 / self.rho ** 2 if self.scaling == "paper" else 1.0
        base_loss = self._loss_value(loss, device)
        backup = self._scratch(params, _BACKUP)
        clean = self._scratch(params, _CLEAN_GRAD)
        # Passes 1..m-1 are kept as their gradients when m - 1 <= n, else as n running sums sum_i psi_j'(x_i) g_i;
        # the last pass's gradient is combined straight from p.grad (no buffer at all for m = 1).
        raw = m - 1 <= n
        kept = [self._scratch(params, _KEPT.format(k)) for k in range(min(m - 1, n))]
        _foreach.copy_grouped_(backup, params)
        _foreach.copy_grouped_(clean, [q.grad for q in params])  # (a function: no name outlives it, see its doc)
        for total in [] if raw else kept:
            for (bucket,) in group_by_device_dtype(total):
                _foreach.zero_(bucket)
        losses: list[Tensor] = []  # L(w + rho d_i)
        if self._bn_guard is not None:
            self._bn_guard.save()
        try:
            for i in range(m):
                if i > 0:
                    for dst, src in group_by_device_dtype(params, backup):
                        _foreach.copy_(dst, src)
                self.rule.perturb_(self._param_views(params))  # w <- w + rho d_i (d_i drawn into p.grad)
                with torch.enable_grad():
                    perturbed_loss = closure()
                self.grad_evals += 1
                losses.append(self._loss_value(perturbed_loss, device))
                # the last pass's gradient stays in p.grad for the combination below
                self._take_pass(params, kept[i] if raw and i < m - 1 else None,
                                kept if not raw and i < m - 1 else None, base_loss, losses[-1], device)
        finally:
            for dst, src in group_by_device_dtype(params, backup):
                _foreach.copy_(dst, src)  # back to w, bit-exact
            if self._bn_guard is not None:
                self._bn_guard.restore()
        if self._found_inf is not None and self._overflowed():
            return False
        forms = self.last_quadratic_forms = self._forms(base_loss, losses, device)
        derivatives = self.measure.psi_derivatives(forms)  # psi_j'(x_i), shape [m, n]
        # G = g0 + sum_j c_j (sum_i psi_j'(x_i) g_i - (sum_i psi_j'(x_i)) g0), c_j = lam beta gamma phi_j'(s) / m,
        # with the i = m term taken from p.grad
        phi_grad = self.measure.phi_gradient(self.measure.psi_values(forms).mean(dim=0), m)  # Bessel included
        coefficients = (self.lam * gamma / m) * phi_grad
        clean_coefficient = 1.0 - (coefficients * derivatives.sum(dim=0)).sum()
        pass_coefficients = derivatives @ coefficients  # sum_j c_j psi_j'(x_i) per pass i
        kept_coefficients = pass_coefficients[:-1] if raw else coefficients
        final = [_grad_or_zero(p) for p in params]  # g_m
        last = _foreach.read_if_free(pass_coefficients[-1])
        for dst, g0, *totals in group_by_device_dtype(final, clean, *kept):
            _foreach.mul_(dst, _foreach.like(last, dst[0]))
            _foreach.add_scaled_(dst, g0, clean_coefficient)
            for k, total in enumerate(totals):
                _foreach.add_scaled_(dst, total, kept_coefficients[k])
        return True

    def _take_pass(self, params: list[Tensor], copy_to: list[Tensor] | None, sums: list[list[Tensor]] | None,
                   base_loss: Tensor, loss: Tensor, device: torch.device) -> None:
        """After a perturbed pass: unscale its gradient (GradScaler; checked once after the ``m`` passes, one
        host sync), and keep it in ``copy_to`` or add ``psi_j'(x_i) g_i`` into the running sums ``sums``.

        A method of its own so that no reference to the pass's gradient tensors outlives it: the next closure
        clears them (set_to_none), and they must be freed before its backward allocates new ones (peak memory;
        a loop variable left bound in ``_sharpness_gradient`` kept one set alive)."""
        grads = [_grad_or_zero(p) for p in params]
        if self._found_inf is not None:
            unscale_(self.grad_scaler, grads, self._found_inf)
        if copy_to is not None:
            _foreach.copy_grouped_(copy_to, grads)
        elif sums is not None:
            derivative = self.measure.psi_derivatives(self._forms(base_loss, [loss], device))[0]
            for j, total in enumerate(sums):
                for dst, g in group_by_device_dtype(total, grads):
                    _foreach.add_scaled_(dst, g, derivative[j])  # sum_i psi_j'(x_i) g_i

    def _param_views(self, params: list[Tensor]) -> list[ParamGroupView]:
        """Views of ``params`` (those of the first pass) per group, with their current gradient buffers."""
        chosen = {id(p) for p in params}
        views = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in chosen]
            views.append(ParamGroupView(group, ps, [_grad_or_zero(p) for p in ps]))
        return views

    # ------------------------------------------------------------------ the direction stream
    @property
    def generator(self) -> torch.Generator:
        """The ``torch.Generator`` the directions are drawn from (the one given, or the seeded one on the
        parameters' device, created now if no direction was drawn yet)."""
        stream = self.rule.generator
        return stream.get(self._stream_device()) if isinstance(stream, LazyGenerator) else stream

    def _stream_device(self) -> torch.device:
        stream = self.rule.generator
        if isinstance(stream, torch.Generator):
            return stream.device
        return draw_device(self) or torch.device("cpu")

    # ------------------------------------------------------------------ checkpoints and repr
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Also carries the direction stream's state (on a ``meta`` model before the first draw, the state loaded
        into it, or None: a run resumed from it starts the stream from its own seed)."""
        state = super().state_dict()
        if self._stream_device().type == "meta":  # only a seeded stream: no torch.Generator lives on meta
            state["sharpness"]["generator"] = self.rule.generator.state_dict()["generator"]
        else:
            state["sharpness"]["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Also resumes the direction stream; a generator state saved on another device type (a CUDA
        checkpoint loaded into a CPU optimizer, say) is refused before anything is loaded."""
        sharpness_state = state_dict.get("sharpness", {})
        saved = sharpness_state.get("generator")
        device = self._stream_device()
        if saved is not None:
            saved = saved.detach().to("cpu", torch.uint8)
            if device.type != "meta":  # checked again at the first draw, once the parameters are materialized
                probe = torch.Generator(device=device)
                try:
                    probe.set_state(saved)
                except RuntimeError as error:
                    raise ValueError(
                        f"Cannot resume the direction stream on {device}: the checkpoint's generator "
                        f"state was saved on another device type ({error}); nothing was loaded"
                    ) from error
        super().load_state_dict(state_dict)
        stream = self.rule.generator
        if isinstance(stream, LazyGenerator):
            if "generator" in sharpness_state:  # None: saved before the first draw, the stream is at its seed
                stream.load_state_dict({"seed": stream.seed, "generator": saved})
        elif saved is not None:
            stream.set_state(saved)

    def __repr__(self) -> str:
        parts = [f"measure={self.measure.name!r}", f"rho={self.rho}", f"lam={self.lam}",
                 f"num_samples={self.num_samples}", f"scaling={self.scaling!r}", f"sampler={self.measure.sampler!r}",
                 f"policy={self.policy!r}"]
        base = "\n    ".join(repr(self.base_optimizer).splitlines())
        return f"{type(self).__name__}({', '.join(parts)},\n  base={base})"


def _zero_rho() -> float:
    raise ValueError("Invalid rho value: 0.0 (expected rho > 0: it divides the finite difference; use lam=0 for "
                     "the base optimizer)")


def _grad_or_zero(p: Tensor) -> Tensor:
    if p.grad is None:  # a parameter unused in this pass: its gradient is zero
        p.grad = torch.zeros_like(p)
    return p.grad


class TraceSAM(UniversalSAM):
    r"""Trace-SAM: the average-direction sharpness ``tr H`` (psi = phi = id, ``d ~ N(0, I)``).

    Authors' scaling: ``G = (1 - lam) g_0 + lam (1/m) sum_i grad L(w + rho d_i)``; paper scaling:
    ``G = g_0 + lam (2 / rho^2) (1/m) sum_i (g_i - g_0)``. ``1 + m`` passes per step.

    Args:
        rho: perturbation scale (> 0; authors 0.01). lam: strength (>= 0; authors 1, grid {0.01, 0.1, 1}).
        num_samples: m >= 1 (authors 1). Other options: see :class:`UniversalSAM`.

    Example::

        opt = sharpness.TraceSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.01, lam=1.0)
    """

    min_grad_evals_per_step = 2
    max_grad_evals_per_step = 2
    description = "Trace-SAM: gradient averaged over Gaussian perturbations, bias toward small tr H (Tahmasebi 2024)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.01, lam: float = 1.0,
                 num_samples: int = 1, **kwargs: Any) -> None:
        super().__init__(params_or_base, base_class, measure="trace", rho=rho, lam=lam, num_samples=num_samples,
                         **kwargs)


class FrobSAM(UniversalSAM):
    r"""Frob-SAM: bias toward a small Hessian Frobenius norm (psi = (t^2, t), phi = (a - b^2)/2, Gaussian d).

    Authors' scaling (the paper's Algorithm 2 with the unbiased cross-covariance)::

        G = g_0 + lam / (rho^2 (m - 1)) * sum_i (L_i - mean L) (g_i - mean g),   L_i = L(w + rho d_i)

    i.e. the gradient of ``lam / (2 rho^2) * Var_i L(w + rho d_i)`` for fixed samples; the paper scaling
    multiplies the correction by ``4 / rho^2``. Needs ``m >= 2``; ``1 + m`` passes per step.

    Args:
        rho: perturbation scale (> 0; authors 0.005 CIFAR, 0.01 MNIST). lam: strength (>= 0; authors 0.005,
            grid {1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1}). num_samples: m >= 2 (authors 2).
        Other options: see :class:`UniversalSAM`.
    """

    min_grad_evals_per_step = 3
    max_grad_evals_per_step = 3
    description = "Frob-SAM: cross-covariance of perturbed losses and gradients, bias toward small ||H||_F"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.01, lam: float = 0.005,
                 num_samples: int = 2, **kwargs: Any) -> None:
        super().__init__(params_or_base, base_class, measure="frobenius", rho=rho, lam=lam,
                         num_samples=num_samples, **kwargs)


class DetSAM(UniversalSAM):
    r"""Det-SAM: bias toward a small (scale-invariant) Hessian determinant (psi = exp(-t/2), phi = 1/s^2).

    ``d ~ U[-a, a]^p`` (the Lebesgue measure truncated to a hypercube of half-width ``a``). Authors' scaling,
    one sample: ``G = g_0 + lam * exp((L_1 - L_0) / rho^2) (g_1 - g_0)``; in general
    ``G = g_0 + lam gamma / (m s^3) sum_i exp(-x_i / 2) (g_i - g_0)`` with ``s = mean_i exp(-x_i / 2)``.

    Args:
        rho: perturbation scale (> 0; authors 1.0, the cube's half-width then sets the perturbation size).
        half_width: ``a > 0`` (authors 0.01). lam: strength (>= 0; authors grid {0.01, 0.1, 1}).
        num_samples: m >= 1 (authors 1). Other options: see :class:`UniversalSAM`.
    """

    supports_complex: ClassVar[bool] = True  # equal to the real view (tested)
    min_grad_evals_per_step = 2
    max_grad_evals_per_step = 2
    description = "Det-SAM: exp-weighted gradients at uniform hypercube perturbations, bias toward small det H"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 1.0, half_width: float = 0.01,
                 lam: float = 1.0, num_samples: int = 1, **kwargs: Any) -> None:
        super().__init__(params_or_base, base_class, measure="det", half_width=half_width, rho=rho, lam=lam,
                         num_samples=num_samples, **kwargs)
