"""Sharpness-aware optimizers: the shared engine and one method per module."""

from .aelooksam import AELookSAM
from .aesam import AESAM
from .asam import ASAM
from .closure import make_closure
from .engine import SharpnessAwareOptimizer
from .entropy_sgd import EntropySGD
from .erm import ERM
from .esam import ESAM
from .gnr import GNR
from .gsam import GSAM
from .looksam import LookSAM
from .salr import SALR
from .sam import SAM
from .smoothout import SmoothOut
from .ssamf import SSAMF
from .sssam import SSSAM
from .universal_sam import DetSAM, FrobSAM, TraceSAM, UniversalSAM

__all__ = [
    "AESAM", "ASAM", "ERM", "ESAM", "GNR", "GSAM", "SALR", "SAM", "SSAMF", "SSSAM", "AELookSAM", "DetSAM", "EntropySGD",
    "FrobSAM", "LookSAM", "SharpnessAwareOptimizer", "SmoothOut", "TraceSAM", "UniversalSAM", "make_closure",
]
