"""sharpness: sharpness-aware training, sharpness measures and fair comparisons for PyTorch."""

from . import policies, rules
from .batchnorm import frozen_running_stats
from .optim import (
    AESAM,
    ASAM,
    ERM,
    ESAM,
    GNR,
    GSAM,
    SALR,
    SAM,
    SSAMF,
    SSSAM,
    AELookSAM,
    DetSAM,
    EntropySGD,
    FrobSAM,
    LookSAM,
    SharpnessAwareOptimizer,
    SmoothOut,
    TraceSAM,
    UniversalSAM,
    make_closure,
)
from .param_groups import weight_decay_groups
from .registry import OptimizerInfo, create, get_optimizer_info, list_optimizers, register_optimizer

__version__ = "0.1.0"

__all__ = [
    "AESAM",
    "ASAM",
    "ERM",
    "ESAM",
    "GNR",
    "GSAM",
    "SALR",
    "SAM",
    "SSAMF",
    "SSSAM",
    "AELookSAM",
    "DetSAM",
    "EntropySGD",
    "FrobSAM",
    "LookSAM",
    "OptimizerInfo",
    "SharpnessAwareOptimizer",
    "SmoothOut",
    "TraceSAM",
    "UniversalSAM",
    "create",
    "frozen_running_stats",
    "get_optimizer_info",
    "list_optimizers",
    "make_closure",
    "policies",
    "register_optimizer",
    "rules",
    "weight_decay_groups",
]
