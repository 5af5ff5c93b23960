"""The harness: training on an equal compute budget, the experiments store, sweeps and reports."""

from .store import RunRecord, Store, run_key

__all__ = ["RunRecord", "Store", "run_key"]
