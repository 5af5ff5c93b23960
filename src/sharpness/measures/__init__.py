"""Sharpness measures: Hessian spectra and traces, the papers' sharpness definitions, loss landscapes.

Every measure is a function of ``(model, loss_fn, data)`` returning a frozen :class:`Measurement`.
"""

from .hvp import HVP_METHODS, HessianOperator, hvp
from .result import Measurement

__all__ = ["HVP_METHODS", "HessianOperator", "Measurement", "hvp"]
