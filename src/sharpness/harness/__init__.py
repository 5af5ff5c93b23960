"""The harness: training on an equal compute budget, the experiments store, sweeps and reports."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .report import RunGroup, build_report, group_runs
from .store import RunRecord, Store, run_key
from .sweep import SweepPlan, SweepResult, load_sweep_file, plan_sweep, run_sweep, run_sweep_parallel
from .train import TrainResult, environment, lr_factor, resolve_device, train

__all__ = ["RunGroup", "RunRecord", "Store", "SweepPlan", "SweepResult", "TrainConfig", "TrainResult",
           "build_report", "environment", "group_runs", "load_checkpoint", "load_sweep_file", "lr_factor",
           "plan_sweep", "resolve_device", "run_key", "run_sweep", "run_sweep_parallel", "save_checkpoint", "train"]
