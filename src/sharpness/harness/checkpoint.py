"""Checkpoints: written atomically, read safely (``weights_only=True``: a checkpoint runs no code)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_open

__all__ = ["load_checkpoint", "save_checkpoint"]

_FORMAT = "sharpness-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace`` (all or nothing)."""
    with atomic_open(path, "wb") as handle:
        torch.save({"format": _FORMAT, **state}, handle)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/unsafe files
        raise ValueError(f"Cannot read checkpoint {path}: truncated, corrupted or not a safe torch checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"Not a sharpness checkpoint: {path} (expected format {_FORMAT!r})")
    return state
