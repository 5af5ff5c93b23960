"""MNIST-1D (Greydanus, 2020), generated in memory: 4000 training and 1000 test signals of length 40."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .._io import atomic_open
from .record import SourceSplits

__all__ = ["load_mnist1d", "mnist1d_args"]


def mnist1d_args() -> dict[str, object]:
    """The generator settings of ``mnist1d.data.get_dataset_args()`` (the package's defaults, seed 42)."""
    from mnist1d.data import get_dataset_args

    return {key: value for key, value in vars(get_dataset_args()).items() if key != "url"}


def load_mnist1d(root: Path | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate MNIST-1D in memory: ``(x_train, y_train, x_test, y_test)``, 4000 / 1000 signals of length 40.

    ``mnist1d.data.make_dataset`` only computes (the package's ``get_dataset`` is the one that downloads and
    pickles); it reseeds Python's and NumPy's global generators, which are restored afterwards. Generating
    takes seconds, so the result is cached for the process and, with ``root``, on disk (see
    :func:`_generated`): later processes -- a sweep's workers, the next ``sharpness train`` -- read it back
    instead of generating it again. Treat the tensors as read-only.
    """
    return _generated(root)[0]


_CACHE_FORMAT = 1
_CACHE_KEYS = ("x_train", "y_train", "x_test", "y_test")


@lru_cache(maxsize=2)
def _generated(root: Path | None) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], dict[str, object]]:
    """The four tensors and the generator's settings; with ``root``, through ``root/mnist1d/mnist1d-<digest>.pt``.

    The digest covers the ``mnist1d`` version (whose defaults are the settings) and the file format; the file
    holds the tensors and the settings as JSON (so a hit does not import ``mnist1d.data``, a second of
    matplotlib), is written atomically and read with ``weights_only``. A file that cannot be read or does not
    hold what :func:`_check` expects is regenerated and rewritten; a root that cannot be written to only costs
    the time.
    """
    path = None if root is None else _cache_path(root)
    if path is not None:
        cached = _read_cache(path)
        if cached is not None:
            return cached
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)

    tensors = (*as_tensors(data["x"], data["y"]), *as_tensors(data["x_test"], data["y_test"]))
    args = mnist1d_args()
    if path is not None:
        _write_cache(path, tensors, args)
    return tensors, args


def _cache_path(root: Path) -> Path:
    key = json.dumps({"format": _CACHE_FORMAT, "mnist1d": importlib.metadata.version("mnist1d")}, sort_keys=True)
    return root / "mnist1d" / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _read_cache(path: Path) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], dict[str, object]] | None:
    """What :func:`_write_cache` wrote, or None when the file is missing, unreadable or anything else."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- missing, truncated or foreign: regenerate and overwrite
        return None
    if not isinstance(stored, dict) or set(stored) != {*_CACHE_KEYS, "args"}:
        return None
    try:
        args = json.loads(stored["args"])
    except (TypeError, ValueError):
        return None
    tensors = tuple(stored[key] for key in _CACHE_KEYS)
    return (tensors, args) if _check(tensors, args) else None


def _check(tensors: tuple[object, ...], args: object) -> bool:
    """Four tensors of the shapes and dtypes the settings give, labels in 0..9."""
    if not isinstance(args, dict) or not all(isinstance(t, Tensor) for t in tensors):
        return False
    try:
        n_train = int(args["num_samples"] * args["train_split"])
        n_test, length = args["num_samples"] - n_train, args["final_seq_length"]
    except (KeyError, TypeError):
        return False
    x_train, y_train, x_test, y_test = tensors
    expected = ((x_train, (n_train, length), torch.float32), (y_train, (n_train,), torch.long),
                (x_test, (n_test, length), torch.float32), (y_test, (n_test,), torch.long))
    if any(t.shape != shape or t.dtype != dtype for t, shape, dtype in expected):
        return False
    return all(int(y.min()) >= 0 and int(y.max()) <= 9 for y in (y_train, y_test))


def _write_cache(path: Path, tensors: tuple[Tensor, ...], args: dict[str, object]) -> None:
    """Save atomically (:func:`~sharpness._io.atomic_open`); an unwritable root is left alone."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as handle:
            torch.save({**dict(zip(_CACHE_KEYS, tensors)), "args": json.dumps(args)}, handle)


def load(*, root: Path, download: bool) -> SourceSplits:
    """Registry loader: MNIST-1D as in-memory ``TensorDataset``s, generated once and cached under ``root``
    (``download`` is unused: nothing is fetched)."""
    (x_train, y_train, x_test, y_test), args = _generated(root)
    train = TensorDataset(x_train, y_train)
    settings = {f"mnist1d_{key}": value for key, value in args.items()}
    return SourceSplits(train=train, train_eval=train, test=TensorDataset(x_test, y_test), num_classes=10,
                        input_shape=(x_train.shape[1],), classes=tuple(str(digit) for digit in range(10)),
                        settings=settings)
