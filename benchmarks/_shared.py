"""Helpers shared by the benchmark scripts (``bench_step.py``, ``bench_hessian.py``).

The scripts are run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``, so they
import it as ``from _shared import ...``.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any

import torch

import sharpness
from sharpness._io import write_text_atomically

_HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------- statistics
def quartiles(values: list[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``values`` (inclusive method); all three equal for a single value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


# ---------------------------------------------------------------------------------------------- environment
def block_order(n: int, repeat: int) -> list[int]:
    """The order of ``n`` interleaved cases in repeat ``repeat``: rotated by ``repeat // 2`` and reversed on odd
    repeats. Each case runs at every position, and each neighbouring pair in both orders (a rotation alone
    always ran B right after A, so whatever A leaves behind, caches or allocator state, always fell on B)."""
    shift = (repeat // 2) % n if n else 0
    order = list(range(shift, n)) + list(range(shift))
    return order[::-1] if repeat % 2 else order


def paired_ratio(numerators: list[float], denominators: list[float], scale: float = 1.0) -> dict[str, float]:
    """The median of the per-repeat paired ratios ``n_i / (scale d_i)`` (a drift common to both sides of a
    repeat cancels in its ratio), their quartiles, and the ratio of the medians (the headline estimator before
    session 15, kept for comparison with the older logs in docs/benchmarks.md)."""
    q1, median, q3 = quartiles([n / (scale * d) for n, d in zip(numerators, denominators, strict=True)])
    return {"value": median, "q1": q1, "q3": q3,
            "ratio_of_medians": statistics.median(numerators) / (scale * statistics.median(denominators))}


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``; None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """stdout of ``git <args>`` run in this folder; None if git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10, cwd=_HERE)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info(untracked: bool = False) -> dict[str, Any]:
    """HEAD and whether the work tree has uncommitted changes (both None outside a git checkout).

    ``untracked``: whether files git does not track (and does not ignore) count as changes.
    """
    head = _git("rev-parse", "HEAD")
    status = None
    if head:
        status = _git("status", "--porcelain", *([] if untracked else ["--untracked-files=no"]))
    return {"commit": head or None, "dirty": None if status is None else bool(status)}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of the file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def environment(*, packages: Iterable[str] = (), extra: Mapping[str, Any] | None = None,
                git_untracked: bool = False, hashed_files: Mapping[str, str] | None = None,
                options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a result file records about the run: date, versions, machine, git state.

    ``packages``: distributions whose versions to record (None where not installed); ``extra``: further
    entries placed before ``git``; ``git_untracked``: see :func:`git_info`; ``hashed_files``: label -> path,
    recorded as ``sha256`` {label: digest}; ``options``: the script's settings, recorded last.
    """
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: package_version(name) for name in packages},
        "sharpness": sharpness.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **(extra or {}),
        "git": git_info(untracked=git_untracked),
    }
    if hashed_files is not None:
        env["sha256"] = {label: file_sha256(path) for label, path in hashed_files.items()}
    if options is not None:
        env["options"] = dict(options)
    return env


# ---------------------------------------------------------------------------------------------- output
def write_json_atomically(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically (a reader never sees a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")
