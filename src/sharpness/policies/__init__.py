"""Policies: when a sharpness-aware optimizer spends its extra gradient pass."""

from .adaptive import Adaptive
from .always import Always
from .base import Policy
from .bernoulli import Bernoulli
from .never import Never
from .periodic import Periodic

__all__ = ["Adaptive", "Always", "Bernoulli", "Never", "Periodic", "Policy"]
