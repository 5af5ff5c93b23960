"""Perturbation rules: how a sharpness-aware optimizer picks the ascent point ``w + e(w)``."""

from .asam import ASAMPerturbation
from .base import ParamGroupView, PerturbationRule
from .masked import MaskedSAMPerturbation
from .sam import SAMPerturbation
from .scheduled import LRProportionalRho

__all__ = ["ASAMPerturbation", "ParamGroupView", "PerturbationRule", "SAMPerturbation"]
__all__ += ["LRProportionalRho", "MaskedSAMPerturbation"]
