"""Perturbation rules: how a sharpness-aware optimizer picks the ascent point ``w + e(w)``."""

from .asam import ASAMPerturbation
from .base import ParamGroupView, PerturbationRule
from .sam import SAMPerturbation

__all__ = ["ASAMPerturbation", "ParamGroupView", "PerturbationRule", "SAMPerturbation"]
