"""Sharpness-aware optimizers: the shared engine and one method per module."""

from .aelooksam import AELookSAM
from .aesam import AESAM
from .asam import ASAM
from .closure import make_closure
from .engine import SharpnessAwareOptimizer
from .erm import ERM
from .esam import ESAM
from .gnr import GNR
from .gsam import GSAM
from .looksam import LookSAM
from .sam import SAM
from .smoothout import SmoothOut
from .ssamf import SSAMF
from .sssam import SSSAM
from .universal_sam import DetSAM, FrobSAM, TraceSAM, UniversalSAM

__all__ = [
    "AESAM", "ASAM", "ERM", "GNR", "SAM", "SSSAM", "AELookSAM", "LookSAM", "SharpnessAwareOptimizer", "make_closure",
]
__all__ += ["DetSAM", "FrobSAM", "TraceSAM", "UniversalSAM"]
__all__ += ["ESAM", "GSAM", "SSAMF", "SmoothOut"]
