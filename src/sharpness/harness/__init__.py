"""The harness: training on an equal compute budget, the experiments store, sweeps and reports."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .store import RunRecord, Store, run_key
from .train import TrainResult, environment, lr_factor, train

__all__ = ["RunRecord", "Store", "TrainConfig", "TrainResult", "environment", "load_checkpoint", "lr_factor",
           "run_key", "save_checkpoint", "train"]
from .sweep import SweepPlan, SweepResult, load_sweep_file, plan_sweep, run_sweep

__all__ += ["SweepPlan", "SweepResult", "load_sweep_file", "plan_sweep", "run_sweep"]
from .report import RunGroup, build_report, group_runs

__all__ += ["RunGroup", "build_report", "group_runs"]
