"""Where data files live, and the error raised when they are missing."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV", "default_root", "missing_data_error", "resolve_root"]

#: environment variable naming the default data folder
DATA_ENV = "SHARPNESS_DATA"


def default_root() -> Path:
    """``$SHARPNESS_DATA`` if set, else ``~/.cache/sharpness/data``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "sharpness" / "data").expanduser()


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """``root`` as a ``Path`` (``~`` expanded), or :func:`default_root` for ``None``."""
    if root is None:
        return default_root()
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"Invalid root type: {type(root).__name__} (expected a path or None)")
    return Path(root).expanduser()


def missing_data_error(title: str, expected: Path | str, *, detail: str = "") -> FileNotFoundError:
    """The error for data that is not on disk: where it was expected, and the fix (``download=True``)."""
    detail = f" ({detail})" if detail else ""
    return FileNotFoundError(
        f"{title} data not found at {expected}{detail}. Pass download=True (command line: `sharpness train --download`) to "
        f"fetch it, or point at the folder that holds it: root=... in Python, ${DATA_ENV} on the command line "
        "(default: ~/.cache/sharpness/data)."
    )
