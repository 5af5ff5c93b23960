"""What the SALR comparison scripts share: a resumable results file, one recorded run, mean ± sd."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from sharpness._io import write_text_atomically
from sharpness.harness.config import TrainConfig
from sharpness.harness.train import TrainResult, train


def load_results(out: Path, budget: int) -> dict[str, Any]:
    """The runs saved in ``out`` (an interrupted sweep resumes from them), or an empty record for ``budget``."""
    results = json.loads(out.read_text()) if out.exists() else {"budget_grad_evals": budget, "runs": []}
    if results["budget_grad_evals"] != budget:
        raise SystemExit(f"{out} holds budget {results['budget_grad_evals']}, not {budget}; use another --out")
    return results


def add_run(results: dict[str, Any], out: Path, row: dict[str, Any]) -> None:
    """Append ``row`` and rewrite ``out`` atomically (a run is never lost or half-written)."""
    results["runs"].append(row)
    write_text_atomically(out, json.dumps(results, indent=1))


def train_recorded(config: TrainConfig, results: dict[str, Any], out: Path, key: dict[str, Any], name: str,
                   **train_kwargs: Any) -> tuple[TrainResult, float] | None:
    """Train ``config``; a divergence is recorded under ``key`` (the table counts it) and gives None, otherwise
    the result and the wall time of the whole call."""
    start = time.perf_counter()
    try:
        result = train(config, log=None, **train_kwargs)
    except FloatingPointError as exc:  # recorded, not hidden
        print(f"{name}: DIVERGED ({exc})", flush=True)
        add_run(results, out, {**key, "diverged": str(exc)})
        return None
    return result, time.perf_counter() - start


def mean_sd(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"
