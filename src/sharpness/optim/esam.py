"""ESAM: efficient SAM by stochastic weight perturbation and sharpness-sensitive data selection (Du et al., 2022)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._foreach import local
from .._validation import check_choice, check_real
from ..policies.always import Always
from ..rules.masked import MaskedSAMPerturbation
from ._generator import GeneratorCheckpoint, LazyGenerator, shard_stream
from .engine import Closure, SharpnessAwareOptimizer

__all__ = ["ESAM"]



def _check_unit_interval(name: str, value: object) -> float:
    value = check_real(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Invalid {name} value: {value} (expected 0 < {name} <= 1)")
    return value


class PerSampleLossStep:
    """``step`` of an engine optimizer whose closure returns per-sample losses (ESAM's selection, SSAM-F's Fisher).

    When the instance's ``needs_per_sample_losses`` is True, the closure (from :func:`sharpness.make_closure`)
    returns the loss vector ``[B]`` without backward, and one step is: pass 1 at ``w`` (under DDP ``no_sync``
    unless ``sync_perturbation``) then :meth:`_first_backward`; the engine's ``first_step``; pass 2 at
    ``w + e`` then :meth:`_second_backward`; ``second_step`` (the engine's step, through its pass hooks).
    Both backward hooks back-propagate the mean unless overridden. Otherwise the engine's ordinary passes run.
    List it before the engine in the bases.
    """

    #: when the instance needs per-sample losses, for the error message (e.g. ``"gamma < 1"``)
    per_sample_condition: ClassVar[str]

    def _closure_step(self, closure: Closure | None) -> Any:
        """The engine's step; with per-sample losses its passes are :meth:`_first_pass` / :meth:`_second_pass`
        below and the mean loss at ``w`` is returned."""
        if self.needs_per_sample_losses and (closure is None or not callable(closure)):
            raise TypeError(
                f"{type(self).__name__}.step() requires a closure returning per-sample losses; build it with "
                "sharpness.make_closure(opt, compute_loss)"
            )
        per_sample = self.needs_per_sample_losses
        loss = super()._closure_step(closure)  # type: ignore[misc]
        return loss.mean() if per_sample else loss

    def _first_pass(self, closure: Closure) -> Any:
        """With per-sample losses: pass 1 and :meth:`_first_backward`; returns the detached losses at ``w``."""
        if not self.needs_per_sample_losses:
            return super()._first_pass(closure)  # type: ignore[misc]
        losses = self._per_sample(closure())
        self._first_backward(losses)
        return losses.detach()

    def _second_pass(self, closure: Closure, first: Any) -> None:
        """With per-sample losses: pass 2 and :meth:`_second_backward` (``first``: the losses at ``w``)."""
        if not self.needs_per_sample_losses:
            return super()._second_pass(closure, first)  # type: ignore[misc]
        self._second_backward(self._per_sample(closure()), first)

    def _first_backward(self, losses: Tensor) -> None:
        """Pass 1, at ``w``: back-propagate the mean loss."""
        self._backward(losses.mean())

    def _second_backward(self, losses: Tensor, before: Tensor) -> None:
        """Pass 2, at ``w + e`` (``before``: the detached losses at ``w``): back-propagate the mean loss."""
        self._backward(losses.mean())

    def _per_sample(self, out: Any) -> Tensor:
        if not (isinstance(out, Tensor) and out.dim() == 1 and out.requires_grad):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(
                f"{type(self).__name__} with {self.per_sample_condition} expects the closure to return the "
                f"per-sample losses (shape [B], with their graph, backward not called); got {shape}. Build the "
                "closure with sharpness.make_closure(opt, compute_loss), which follows opt.needs_per_sample_losses"
            )
        return out

    def _backward(self, loss: Tensor, weights: Tensor | None = None) -> None:
        if self._scaler_enabled():
            loss = self.grad_scaler.scale(loss)
        loss.backward(weights)


class ESAM(PerSampleLossStep, GeneratorCheckpoint, SharpnessAwareOptimizer):
    r"""Efficient SAM: perturb a random subset of the weights, descend on the samples the perturbation hurts most.

    With ``g = grad L_B(w)``, a Bernoulli(beta) mask ``m`` and per-sample losses ``l_i``:

    .. math::
        e = \frac{\rho}{\beta} \frac{m \odot g}{\|g\| + \epsilon}, \qquad
        B^+ = \operatorname{top}_{\lfloor\gamma |B|\rfloor} \big(l_i(w + e) - l_i(w)\big), \qquad
        w \leftarrow \mathrm{base\_step}\Big(w, \nabla \tfrac{1}{|B^+|}\textstyle\sum_{i \in B^+} l_i(w + e)\Big)

    **Stochastic weight perturbation (SWP).** ``mask="coordinate"`` (default, the paper): every coordinate is
    kept with probability ``beta``; the ``1/beta`` factor makes ``E[e]`` equal to SAM's perturbation.
    ``mask="tensor"`` (the authors' public code): whole tensors are kept with probability ``beta`` and the
    norm is taken over the kept tensors, ``e = rho/beta * m ⊙ g/||m ⊙ g||``. Masks come from a private
    generator on the parameters' device (seeded with ``seed``, checkpointed). The public code saves compute
    by not back-propagating into the unselected tensors; here the first pass computes every gradient, so SWP
    changes the perturbation, not the cost.

    **Sharpness-sensitive data selection (SDS)** when ``gamma < 1``: the instance sets
    ``needs_per_sample_losses = True``, so its closure (built by :func:`sharpness.make_closure`) returns the
    per-sample loss vector without calling backward. ESAM back-propagates ``losses.mean()`` in the first
    pass and ``losses.backward(weights)`` with ``weights = 1/k`` on the ``k = floor(gamma |B|)`` selected
    samples (0 elsewhere) in the second. The second forward runs on the whole batch (the paper also needs
    every ``l_i(w + e)``), so the saving is only in the paper's accounting, not here. With ``gamma = 1`` the
    closure is the ordinary one. ``beta = 1, gamma = 1`` is SAM, bit for bit.

    Two gradient evaluations per step.

    Args:
        params_or_base, base_class, rho, eps: as for :class:`SAM`.
        beta: probability of perturbing a coordinate (or tensor), 0 < beta <= 1 (paper 0.5 to 0.6).
        gamma: fraction of the batch back-propagated in the second pass, 0 < gamma <= 1 (paper 0.5).
        mask: ``"coordinate"`` (paper) or ``"tensor"`` (public code).
        seed: seed of the mask generator (integer >= 0; the same on every rank).
        **kwargs: engine options and, in the davda54 form, the base optimizer's options.

    Example::

        opt = sharpness.ESAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rho=0.05,
                             beta=0.6, gamma=0.5)
        closure = sharpness.make_closure(opt, lambda reduction: F.cross_entropy(model(x), y, reduction=reduction))
        loss = opt.step(closure)

    Reference: J. Du, H. Yan, J. Feng, J. T. Zhou, L. Zhen, R. S. M. Goh, V. Y. F. Tan. Efficient
    Sharpness-aware Minimization for Improved Training of Neural Networks. ICLR 2022.
    """

    min_grad_evals_per_step = 2
    max_grad_evals_per_step = 2
    needs_per_sample_losses: ClassVar[bool] = True  # capability; the instance flag is gamma < 1
    neutral_options: ClassVar[dict[str, Any]] = {"rho": 0.0, "gamma": 1.0}
    standard_closure_options: ClassVar[dict[str, Any]] = {"gamma": 1.0}  # stochastic weight perturbation only
    per_sample_condition = "gamma < 1"
    _rng_key = "esam"  # state_dict()["param_groups"][0]["sharpness"]["esam"]: the mask generator
    description = "ESAM: random-subset perturbation (beta) + top-gamma sharpness data selection (Du et al., 2022)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.05, beta: float = 0.6,
                 gamma: float = 0.5, mask: str = "coordinate", seed: int = 0, eps: float = 1e-12,
                 **kwargs: Any) -> None:
        self.beta = _check_unit_interval("beta", beta)
        self.gamma = _check_unit_interval("gamma", gamma)
        self.mask = check_choice("mask", mask, ("coordinate", "tensor"))
        self._rng = LazyGenerator(seed)
        self.needs_per_sample_losses = self.gamma < 1.0
        rule = MaskedSAMPerturbation(self._draw_masks, scale=1.0 / self.beta,
                                     norm="full" if self.mask == "coordinate" else "masked", eps=eps)
        super().__init__(params_or_base, base_class, rule=rule, policy=Always(), rho=rho, **kwargs)

    # ------------------------------------------------------------------ stochastic weight perturbation
    def _draw_masks(self, params: list[Tensor], scratch: list[Tensor] | None = None) -> list[Tensor]:
        """This step's masks: per tensor (``mask="tensor"``) or Bernoulli(beta) per coordinate, drawn into
        ``scratch`` (the engine's backed-up parameters, so SWP keeps no buffer of its own) when given."""
        generator = self._rng.get(params[0].device)
        if self.mask == "tensor":
            keep = torch.rand(len(params), generator=generator, device=generator.device) < self.beta
            return [keep[i].to(p.device) for i, p in enumerate(params)]
        masks = scratch if scratch is not None else [torch.empty_like(p) for p in params]
        generator = shard_stream(generator, params[0])  # FSDP2: each shard its own coordinates' draws
        # Bernoulli(beta) as U(0, 1) < beta: the same distribution, about 2.5x faster than bernoulli_ on CPU
        # (16.9 ms vs 6.6 ms for 670k coordinates, one thread).
        for m in local(masks):
            if m.device == generator.device:
                m.uniform_(generator=generator).lt_(self.beta)
            else:  # model parallel: draw on the generator's device
                m.copy_(torch.empty(m.shape, dtype=m.dtype, device=generator.device).uniform_(
                    generator=generator).lt_(self.beta))
        return masks

    # ------------------------------------------------------------------ sharpness-sensitive data selection
    def selection_weights(self, sharpness: Tensor) -> Tensor:
        """``1/k`` on the ``k = max(1, floor(gamma B))`` samples with the largest loss increase, 0 elsewhere."""
        n = sharpness.shape[0]
        k = max(1, math.floor(self.gamma * n + 1e-9))
        weights = torch.zeros_like(sharpness)
        weights.index_fill_(0, torch.topk(sharpness, k).indices, 1.0 / k)
        return weights

    def _second_backward(self, losses: Tensor, before: Tensor) -> None:
        """Back-propagate the mean over the ``k`` samples whose loss rose most from ``w`` to ``w + e``."""
        self._backward(losses, self.selection_weights(losses.detach() - before))

    def __repr__(self) -> str:
        text = super().__repr__()
        name = type(self).__name__
        return text.replace(f"{name}(", f"{name}(beta={self.beta}, gamma={self.gamma}, mask={self.mask!r}, ", 1)
