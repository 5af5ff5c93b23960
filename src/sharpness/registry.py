"""A registry of optimizers by name, with their capability flags (timm style: variants are data, not code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import optim

__all__ = ["OptimizerInfo", "create", "get_optimizer_info", "list_optimizers", "register_optimizer"]


@dataclass(frozen=True)
class OptimizerInfo:
    """One registered optimizer: its name, class, one-line description and capability flags."""

    name: str
    cls: type[torch.optim.Optimizer]
    description: str
    min_grad_evals_per_step: int
    max_grad_evals_per_step: int
    needs_closure: bool
    needs_graph: bool
    #: the closure returns per-sample losses without backward (see ``SharpnessAwareOptimizer``)
    needs_per_sample_losses: bool
    #: options under which the method equals its base optimizer exactly, e.g. ``{"rho": 0.0}``
    neutral_options: dict[str, Any]
    #: keyword arguments without defaults that ``create`` must receive (e.g. ``total_steps``)
    required: tuple[str, ...] = ()


_REGISTRY: dict[str, OptimizerInfo] = {}


def register_optimizer(name: str, cls: type[torch.optim.Optimizer], *, required: tuple[str, ...] = ()) -> None:
    """Register ``cls`` under ``name`` (lower case); flags and description are read from the class."""
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"Optimizer name already registered: {key!r}")
    _REGISTRY[key] = OptimizerInfo(
        name=key,
        cls=cls,
        description=cls.description,
        min_grad_evals_per_step=cls.min_grad_evals_per_step,
        max_grad_evals_per_step=cls.max_grad_evals_per_step,
        needs_closure=cls.needs_closure,
        needs_graph=cls.needs_graph,
        needs_per_sample_losses=getattr(cls, "needs_per_sample_losses", False),
        neutral_options=dict(getattr(cls, "neutral_options", {})),
        required=required,
    )


def list_optimizers() -> list[OptimizerInfo]:
    """All registered optimizers, sorted by name (``info.name``, ``info.description``, flags)."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_optimizer_info(name: str) -> OptimizerInfo:
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"Unknown optimizer name: {name!r} (expected one of {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[key]


def create(name: str, base: torch.optim.Optimizer, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` around the base optimizer instance ``base``.

    Example: ``sharpness.create("aesam", torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1000)``.
    """
    info = get_optimizer_info(name)
    missing = [key for key in info.required if key not in kwargs]
    if missing:
        raise TypeError(f"Optimizer {info.name!r} requires the keyword argument(s) {missing}")
    return info.cls(base, **kwargs)


# The built-in methods (a table, not code: name, class, keyword arguments ``create`` must receive).
_BUILTIN: tuple[tuple[str, type[torch.optim.Optimizer], tuple[str, ...]], ...] = (
    ("erm", optim.ERM, ()),
    ("sam", optim.SAM, ()),
    ("asam", optim.ASAM, ()),
    ("looksam", optim.LookSAM, ()),
    ("sssam", optim.SSSAM, ()),
    ("aesam", optim.AESAM, ("total_steps",)),
    ("aelooksam", optim.AELookSAM, ("total_steps",)),
    ("gsam", optim.GSAM, ()),
    ("esam", optim.ESAM, ()),
    ("ssamf", optim.SSAMF, ()),
    ("smoothout", optim.SmoothOut, ()),
    ("gnr", optim.GNR, ()),
    ("tracesam", optim.TraceSAM, ()),
    ("frobsam", optim.FrobSAM, ()),
    ("detsam", optim.DetSAM, ()),
    ("salr", optim.SALR, ()),
    ("entropysgd", optim.EntropySGD, ()),
)
for _name, _cls, _required in _BUILTIN:
    register_optimizer(_name, _cls, required=_required)
