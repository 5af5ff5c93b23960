"""SSAM-F: SAM perturbing only a sparse mask of weights chosen by an empirical Fisher estimate (Mi et al., 2022)."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import _foreach
from .._compile import accepts_compiled, is_compiled_double_backward_error
from .._validation import check_choice, check_dense_grads, check_int_at_least, check_real
from ..distributed import all_reduce_grads_mean_, check_not_sharded, is_distributed
from ..measures._common import measurement_mode
from ..measures._per_sample import check_per_sample_mode, per_sample_gradients
from ..policies.always import Always
from ..rules.masked import MaskedSAMPerturbation
from ._generator import LazyGenerator, draw_device
from .engine import SharpnessAwareOptimizer
from .esam import PerSampleLossStep

__all__ = ["SSAMF"]

_MASK = "perturbation_mask"  # persistent: bool, True where the weight is perturbed
_FISHER = "fisher_sum"  # persistent while a mask refresh collects samples: sum of squared per-sample gradients


class SSAMF(PerSampleLossStep, SharpnessAwareOptimizer):
    r"""Sparse SAM with a Fisher mask: perturb only the weights with the largest empirical Fisher information.

    Every ``update_freq`` steps the mask is rebuilt from ``num_samples`` training examples:

    .. math::
        F = \sum_{i=1}^{n} \big(\nabla l_i(w)\big)^2, \qquad
        m = \mathbb{1}\big[F \in \operatorname{top}_{\lfloor (1 - s) N \rfloor}(F)\big]

    (``s = sparsity``, ``N`` = number of weights, the top-k taken over all parameters together), and each
    step is SAM restricted to the mask:

    .. math::
        e = \rho \frac{m \odot g}{\|g\| + \epsilon}, \qquad w \leftarrow \mathrm{base\_step}(w, \nabla L_B(w + e))

    (the norm is over the whole gradient, as in the authors' code).

    **Fisher samples.** The per-sample gradients come from the training stream itself: the instance sets
    ``needs_per_sample_losses = True`` (when ``sparsity > 0``), so its closure (:func:`sharpness.make_closure`)
    returns the per-sample losses without backward. At a refresh step SSAM-F back-propagates each of the first
    examples of the batch separately (``torch.autograd.grad`` with ``retain_graph``), continuing over the next
    batches until ``num_samples`` examples are collected; then it builds the mask. Ordinary steps
    back-propagate ``losses.mean()`` (the usual gradient). Cost per refresh: ``num_samples`` extra backward
    passes through the batch graph, reported by ``fisher_backward_passes`` (not in ``grad_evals``, which counts
    mini-batch passes). Until the first mask is complete the mask is empty (no perturbation), like the
    authors' code before its first update. Under DDP the Fisher sums are averaged across ranks.

    **Sketched Fisher** (``fisher="sketch"``, an option of ours, not the paper's): instead of one backward pass
    per example, ``fisher_probes = K`` backward passes of the signed sum ``sum_i s_i l_i`` over the batch's
    examples, with Rademacher signs ``s_i = +-1`` from a private generator (``seed``, checkpointed), and

    .. math::
        \hat F = \frac1K \sum_{k=1}^{K} \Big(\sum_i s_{ik} \nabla l_i(w)\Big)^2, \qquad
        \mathbb E[\hat F] = \sum_i \big(\nabla l_i(w)\big)^2 = F

    (the cross terms vanish in expectation), with a per-weight relative standard deviation of at most
    ``sqrt(2/K)``. A refresh then costs ``K`` batch backward passes per batch instead of ``num_samples``: for
    ``num_samples = 128`` examples in one batch of 128 and ``K = 16``, 8x fewer. The mask is the top-k of an
    unbiased but noisy estimate, so weights near the threshold may swap; use the exact default to reproduce the
    paper. ``fisher_backward_passes`` counts the backward passes either way.

    **Vectorized exact Fisher** (``fisher="vmap"``): the exact ``F`` of the paper, from per-example gradients
    computed by ``torch.func`` (``vmap`` of ``grad``, each example run through the model as a batch of one, in
    chunks of ``fisher_chunk_size`` examples), at about the cost of one batch forward and backward instead of
    one backward per example. It needs the model and the examples, so the stream does not collect: the
    instance keeps the ordinary closure (two passes per step) and you refresh the mask with
    :meth:`update_mask` whenever :attr:`mask_due` says so (``steps % update_freq == 0``; the harness does this)::

        if opt.mask_due:
            opt.update_mask(model, F.cross_entropy, x, y)  # the first num_samples examples of the batch
        opt.step(closure)

    The model runs in eval mode for it (BatchNorm's running statistics, no dropout; ``fisher_mode``).
    ``sparsity = 0`` perturbs every weight: SAM, bit for bit, with the ordinary closure.

    Args:
        params_or_base, base_class, rho, eps: as for :class:`SAM`.
        sparsity: fraction of weights *not* perturbed, 0 <= sparsity < 1 (paper 0.5).
        num_samples: examples per Fisher estimate (integer >= 1; paper 128, universal-SAM notes 16).
        update_freq: optimizer steps between mask refreshes (integer >= 1; the paper refreshes every few epochs).
        fisher: ``"per_sample"`` (default, the paper: one backward pass per example), ``"sketch"`` or ``"vmap"``
            (both above).
        fisher_probes: ``K``, signed backward passes per batch for ``fisher="sketch"`` (integer >= 1).
        fisher_chunk_size: examples per ``vmap`` chunk for ``fisher="vmap"`` (integer >= 1; memory about
            ``fisher_chunk_size`` x the parameter count).
        fisher_mode: ``"eval"`` (default) or ``"train"`` (dropout on; rejected with BatchNorm) for ``"vmap"``.
        seed: seed of the sign generator of the sketch (integer >= 0; the same on every rank).
        **kwargs: engine options and, in the davda54 form, the base optimizer's options.

    Reference: P. Mi, L. Shen, T. Ren, Y. Zhou, X. Sun, R. Ji, D. Tao. Make Sharpness-Aware Minimization
    Stronger: A Sparsified Perturbation Approach. NeurIPS 2022.
    """

    min_grad_evals_per_step = 2
    max_grad_evals_per_step = 2
    needs_per_sample_losses: ClassVar[bool] = True  # capability; the instance flag is sparsity > 0
    per_sample_condition = "sparsity > 0"
    standard_closure_options: ClassVar[dict[str, Any]] = {"sparsity": 0.0}  # the Fisher needs per-sample losses
    description = "SSAM-F: SAM on the top-(1-sparsity) weights by empirical Fisher, refreshed periodically (Mi+ 2022)"

    def __init__(self, params_or_base: Any, base_class: Any = None, *, rho: float = 0.1, sparsity: float = 0.5,
                 num_samples: int = 128, update_freq: int = 100, fisher: str = "per_sample", fisher_probes: int = 16,
                 fisher_chunk_size: int = 16, fisher_mode: str = "eval", seed: int = 0, eps: float = 1e-12,
                 **kwargs: Any) -> None:
        sparsity = check_real("sparsity", sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"Invalid sparsity value: {sparsity} (expected 0 <= sparsity < 1)")
        self.sparsity = sparsity
        self.num_samples = check_int_at_least("num_samples", num_samples, 1)
        self.update_freq = check_int_at_least("update_freq", update_freq, 1)
        self.fisher = check_choice("fisher", fisher, ("per_sample", "sketch", "vmap"))
        self.fisher_probes = check_int_at_least("fisher_probes", fisher_probes, 1)
        self.fisher_chunk_size = check_int_at_least("fisher_chunk_size", fisher_chunk_size, 1)
        self.fisher_mode = check_choice("fisher_mode", fisher_mode, ("eval", "train"))
        self._rng = LazyGenerator(seed)
        self.needs_per_sample_losses = sparsity > 0.0 and self.fisher != "vmap"
        self.fisher_samples = 0  # examples that went into the Fisher estimates
        self.fisher_backward_passes = 0  # backward passes spent on them (not in grad_evals)
        self.mask_updates = 0
        self._collected = 0  # examples in the running Fisher sum (0: not collecting)
        rule = MaskedSAMPerturbation(self._masks if sparsity > 0.0 else None, norm="full", eps=eps)
        super().__init__(params_or_base, base_class, rule=rule, policy=Always(), rho=rho, **kwargs)
        if sparsity > 0.0:
            check_not_sharded("SSAMF", self.param_groups, f"sparsity={sparsity}", "its mask is the top "
                              "(1 - sparsity) of the Fisher over all the weights, not yet computed across shards; "
                              "use SAM, or SSAMF(..., sparsity=0.0) (plain SAM)")

    # ------------------------------------------------------------------ the mask
    def _fisher_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _masks(self, params: list[Tensor], scratch: list[Tensor] | None = None) -> list[Tensor]:
        """The persistent Fisher masks (``scratch`` is not needed: they live in the optimizer state)."""
        masks = []
        for p in params:
            mask = self.state[p].get(_MASK)
            if mask is None:  # before the first refresh (or a parameter added later): not perturbed
                mask = self.state[p][_MASK] = torch.zeros_like(p, dtype=torch.bool)
            masks.append(mask)
        return masks

    def _accumulate_fisher(self, losses: Tensor) -> None:
        """Add the squared gradients of the first examples of this batch to the running Fisher sum."""
        try:
            self._backward_fisher(losses)
        except RuntimeError as error:
            if is_compiled_double_backward_error(error):
                raise RuntimeError(
                    f"SSAMF(fisher={self.fisher!r}) back-propagates the batch's graph several times "
                    "(retain_graph=True), which this torch.compile'd graph refuses (donated buffers): use "
                    "fisher='vmap' (per-example gradients of the original module), or set "
                    "torch._functorch.config.donated_buffer = False before the model is first compiled"
                ) from error
            raise

    def _backward_fisher(self, losses: Tensor) -> None:
        params = self._fisher_params()
        fisher = self._fisher_sums(params, restart=self._collected == 0)
        take = min(losses.shape[0], self.num_samples - self._collected)

        def add_squares(grads: tuple[Tensor | None, ...], value: float) -> None:
            check_dense_grads(type(self).__name__, grads)  # before the first sum: no half-built Fisher
            present = [(f, g) for f, g in zip(fisher, grads, strict=True) if g is not None]
            if present:
                _foreach.addcmul_([f for f, _ in present], [g for _, g in present], [g for _, g in present], value)

        if self.fisher == "per_sample":
            for i in range(take):
                add_squares(torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True), 1)
            self.fisher_backward_passes += take
        else:
            generator = self._rng.get(losses.device)
            weights = torch.zeros_like(losses)
            for _ in range(self.fisher_probes):
                signs = torch.randint(0, 2, (take,), generator=generator, device=generator.device)
                weights[:take] = signs.to(device=losses.device, dtype=losses.dtype) * 2 - 1
                grads = torch.autograd.grad(losses, params, grad_outputs=weights, retain_graph=True,
                                            allow_unused=True)
                add_squares(grads, 1.0 / self.fisher_probes)
            self.fisher_backward_passes += self.fisher_probes
        self._collected += take
        self.fisher_samples += take

    @property
    def mask_due(self) -> bool:
        """True when a ``fisher="vmap"`` instance should get :meth:`update_mask` before this step
        (``steps % update_freq == 0``); always False in the other modes, which refresh from the stream."""
        return self.fisher == "vmap" and self.sparsity > 0.0 and self.steps % self.update_freq == 0

    @accepts_compiled
    def update_mask(self, model: nn.Module, loss_fn: Any, inputs: Any, targets: Any) -> None:
        """Rebuild the mask now from the exact empirical Fisher of the first ``num_samples`` examples.

        ``F = sum_i (grad l_i(w))^2`` with ``l_i = loss_fn(model(x_i), y_i)`` per example (``torch.func``,
        ``fisher_chunk_size`` examples per ``vmap`` call, the model in ``fisher_mode``; its training flags and
        BatchNorm buffers are restored after). ``inputs`` is a tensor (or tuple of tensors) with the examples
        on dimension 0, ``targets`` likewise; a DDP-wrapped model is unwrapped and the Fisher is averaged
        across ranks. Any refresh the stream had under way is dropped. Works in every ``fisher`` mode; the
        ``"vmap"`` mode relies on it.
        """
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model type: {type(model).__name__} (expected a torch.nn.Module)")
        if not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn type: {type(loss_fn).__name__} (expected a callable)")
        check_per_sample_mode(model, self.fisher_mode)
        first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        if not isinstance(first, Tensor) or first.dim() == 0 or first.shape[0] == 0:
            raise ValueError("Invalid inputs: expected a tensor (or tuple of tensors) with at least one example "
                             "on dimension 0")
        params = self._fisher_params()
        index = {id(p): i for i, p in enumerate(p for _, p in model.named_parameters() if p.requires_grad)}
        missing = [i for i, p in enumerate(params) if id(p) not in index]
        if missing:
            raise ValueError(f"Invalid model: {len(missing)} of the optimizer's {len(params)} trainable parameters "
                             "are not trainable parameters of the model")
        take = min(first.shape[0], self.num_samples)

        def head(data: Any, start: int, stop: int) -> Any:
            return type(data)(t[start:stop] for t in data) if isinstance(data, (tuple, list)) else data[start:stop]

        fisher = self._fisher_sums(params, restart=True)
        with measurement_mode(model, self.fisher_mode):
            for start in range(0, take, self.fisher_chunk_size):
                stop = min(start + self.fisher_chunk_size, take)
                _, grads = per_sample_gradients(model, loss_fn, head(inputs, start, stop), head(targets, start, stop))
                rows = [grads[index[id(p)]] for p in params]
                with torch.no_grad():
                    for i in range(stop - start):  # in place, no temporary (an einsum was 15x slower on CPU)
                        example = [g[i] for g in rows]
                        _foreach.addcmul_(fisher, example, example, 1)
        self.fisher_samples += take
        self._rebuild_mask()

    def _fisher_sums(self, params: list[Tensor], *, restart: bool) -> list[Tensor]:
        """The running Fisher sums: zeroed when a collection (re)starts, else kept; a parameter without one (it
        became trainable during the collection) starts from zero. Buffers are reused while the shapes match."""
        fisher = []
        for p in params:
            buf = self.state[p].get(_FISHER)
            if buf is None or buf.shape != p.shape:
                buf = self.state[p][_FISHER] = torch.zeros_like(p)
            elif restart:
                buf.zero_()
            fisher.append(buf)
        return fisher

    @torch.no_grad()
    def _rebuild_mask(self) -> None:
        params = self._fisher_params()
        fisher = [self.state[p][_FISHER] for p in params]
        if is_distributed():
            all_reduce_grads_mean_(fisher)  # every rank must perturb the same weights
        flat = torch.cat([f.reshape(-1).float() for f in fisher])  # one allocation per refresh
        if not bool(torch.isfinite(flat).all()):  # one host read per refresh: NaN/inf gradients rank nothing
            for p in params:
                self.state[p].pop(_FISHER, None)
            self._collected = 0
            warnings.warn("SSAMF: the Fisher sums are not finite (NaN or inf gradients); the mask is kept and the "
                          "collection starts again at the next refresh step", RuntimeWarning, stacklevel=3)
            return
        # the top (1 - s) N weights; rounded first, since 1 - 0.9 = 0.0999...98 would keep 9 of 100
        keep = math.floor(round(flat.numel() * (1.0 - self.sparsity), 6))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[torch.topk(flat, keep, sorted=False).indices] = True
        for p, part in zip(params, chosen.split([p.numel() for p in params]), strict=True):
            self._masks([p])[0].copy_(part.view_as(p))
        for p in params:
            self.state[p].pop(_FISHER, None)
        self._collected = 0
        self.mask_updates += 1

    @property
    def mask_density(self) -> float:
        """Fraction of weights currently perturbed (one host synchronisation)."""
        masks = self._masks(self._fisher_params())
        total = sum(m.numel() for m in masks)
        if not total:
            return 0.0
        kept = torch.stack([m.count_nonzero().to(masks[0].device) for m in masks]).sum()
        return kept.item() / total

    # ------------------------------------------------------------------ the step
    def _first_backward(self, losses: Tensor) -> None:
        """Pass 1: at a refresh the first examples go into the Fisher sum first; a complete sum rebuilds the mask."""
        if self._collected > 0 or self.steps % self.update_freq == 0:
            self._accumulate_fisher(losses)
        self._backward(losses.mean())
        if self._collected >= self.num_samples:
            self._rebuild_mask()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The mask and, while a refresh collects, the Fisher sum go into ``param_state`` (per parameter); with
        ``sparsity > 0`` every trainable parameter has both entries, zeros where none exists yet (the mask
        before the first refresh is all False, as :meth:`_masks` starts it), so a fresh optimizer's state has
        the entries of a trained one's (DCP loads a checkpoint into it)."""
        state = super().state_dict()
        param_state = state["sharpness"]["param_state"]
        for index, p in enumerate(self._all_params()):
            saved = self.state.get(p, {})
            placeholder = self.sparsity > 0.0 and p.requires_grad and not p.is_meta
            entries = {}
            if _MASK in saved:
                entries[_MASK] = saved[_MASK].clone()
            elif placeholder:
                entries[_MASK] = torch.zeros_like(p, dtype=torch.bool)
            if self._collected > 0 and _FISHER in saved:
                entries[_FISHER] = saved[_FISHER].clone()
            elif placeholder:
                entries[_FISHER] = torch.zeros_like(p)
            if entries:
                param_state.setdefault(index, {}).update(entries)
        state["sharpness"]["ssamf"] = {
            "collected": self._collected,
            "fisher_samples": self.fisher_samples,
            "fisher_backward_passes": self.fisher_backward_passes,
            "mask_updates": self.mask_updates,
            "generator": self._rng.state_dict(draw_device(self)),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Also reads the masks and Fisher sums of the earlier layout (``ssamf["masks"]``/``["fisher_sum"]``)."""
        super().load_state_dict(state_dict)
        extra = state_dict["sharpness"].get("ssamf")
        if extra is None:
            raise ValueError("This state_dict has no SSAM-F entry (saved by another optimizer); cannot restore masks")
        params = self._all_params()
        for p in params:
            self.state[p].pop(_MASK, None)
            self.state[p].pop(_FISHER, None)
        collected = int(extra["collected"])
        saved = {(int(index), key): value for index, entries in state_dict["sharpness"].get("param_state", {}).items()
                 for key, value in entries.items() if key in (_MASK, _FISHER)}
        for key, legacy in ((_MASK, "masks"), (_FISHER, "fisher_sum")):
            saved.update({(int(index), key): value for index, value in extra.get(legacy, {}).items()})
        for (index, key), value in saved.items():
            if key == _FISHER and collected == 0:  # a placeholder: no refresh was collecting
                continue
            if not 0 <= index < len(params):
                raise ValueError(f"Invalid parameter index {index} in state_dict (the optimizer has {len(params)})")
            p = params[index]
            dtype = torch.bool if key == _MASK else p.dtype
            self.state[p][key] = value.detach().clone().to(device=p.device, dtype=dtype)
        self._collected = collected
        self.fisher_samples = int(extra["fisher_samples"])
        self.fisher_backward_passes = int(extra.get("fisher_backward_passes", self.fisher_samples))
        if "generator" in extra:
            self._rng.load_state_dict(extra["generator"])
        self.mask_updates = int(extra["mask_updates"])

    def __repr__(self) -> str:
        text = super().__repr__()
        name = type(self).__name__
        return text.replace(f"{name}(", f"{name}(sparsity={self.sparsity}, num_samples={self.num_samples}, "
                                        f"update_freq={self.update_freq}, fisher={self.fisher!r}, ", 1)
