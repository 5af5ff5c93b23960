"""sharpness: sharpness-aware training, sharpness measures and fair comparisons for PyTorch."""

from . import policies, rules
from .batchnorm import frozen_running_stats
from .optim import AESAM, ASAM, ERM, GNR, SAM, SSSAM, AELookSAM, LookSAM, SharpnessAwareOptimizer, make_closure
from .optim.esam import ESAM
from .optim.gsam import GSAM
from .optim.smoothout import SmoothOut
from .optim.ssamf import SSAMF
from .optim.universal_sam import DetSAM, FrobSAM, TraceSAM, UniversalSAM
from .registry import OptimizerInfo, create, get_optimizer_info, list_optimizers, register_optimizer

__version__ = "0.1.0"

__all__ = [
    "AESAM",
    "ASAM",
    "ERM",
    "GNR",
    "SAM",
    "SSSAM",
    "AELookSAM",
    "LookSAM",
    "OptimizerInfo",
    "SharpnessAwareOptimizer",
    "create",
    "frozen_running_stats",
    "get_optimizer_info",
    "list_optimizers",
    "make_closure",
    "policies",
    "register_optimizer",
    "rules",
]
__all__ += ["DetSAM", "FrobSAM", "TraceSAM", "UniversalSAM"]
__all__ += ["ESAM", "GSAM", "SSAMF", "SmoothOut"]
