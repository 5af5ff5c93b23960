"""Measure a trained checkpoint: the harness's bridge to :mod:`sharpness.measures`.

A checkpoint written by :func:`~sharpness.harness.train` carries its config, so the data set and model are
rebuilt exactly; the measures run on the first ``examples`` training examples (in order, deterministic).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .. import measures
from .._compile import accepts_compiled
from .._io import write_text_atomically
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .train import batches as iter_batches, make_loss

__all__ = ["LANDSCAPES", "MEASURE_NAMES", "check_landscape_kinds", "landscape_checkpoint", "load_for_measurement",
           "measure_checkpoint", "measure_model"]

Options = dict[str, Any]

#: name -> (function(model, loss_fn, data, options) -> Measurement, one-line description)
_MEASURES: dict[str, tuple[Callable[..., measures.Measurement], str]] = {
    "lambda_max": (lambda m, f, d, o: measures.hessian_eigenvalues(m, f, d, k=1, seed=o["seed"]),
                   "largest Hessian eigenvalue (Lanczos)"),
    "trace": (lambda m, f, d, o: measures.hessian_trace(m, f, d, samples=o["samples"], seed=o["seed"]),
              "Hessian trace (Hutchinson, Rademacher)"),
    "frobenius": (lambda m, f, d, o: measures.hessian_frobenius(m, f, d, samples=o["samples"], seed=o["seed"]),
                  "Hessian Frobenius norm from E||Hv||^2"),
    "sam": (lambda m, f, d, o: measures.sam_sharpness(m, f, d, o["rho"], seed=o["seed"]),
            "SAM sharpness max_{||e||<=rho} L(w+e) - L(w)"),
    "gnr": (lambda m, f, d, o: measures.gnr_sharpness(m, f, d, o["rho"], seed=o["seed"]),
            "GNR sharpness rho * max_{||e||<=rho} ||grad L(w+e)||"),
    "keskar": (lambda m, f, d, o: measures.keskar_sharpness(m, f, d, seed=o["seed"]),
               "Keskar epsilon-sharpness (box, epsilon=1e-3, x100 relative)"),
    "salr": (lambda m, f, d, o: measures.salr_sharpness_hat(m, f, d, gamma=o["rho"] / 5),
             "SALR S_hat = L(w+) - L(w-), 5 normalized ascent/descent steps of rho/5"),
}
MEASURE_NAMES = tuple(_MEASURES)


def describe_measures() -> dict[str, str]:
    return {name: description for name, (_, description) in _MEASURES.items()}


def _check_names(names: Sequence[str]) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"Invalid measures: none given (expected some of {', '.join(MEASURE_NAMES)})")
    unknown = [n for n in names if n not in _MEASURES]
    if unknown:
        raise ValueError(f"Unknown measure name(s): {unknown} (expected some of {', '.join(MEASURE_NAMES)})")
    return names


@accepts_compiled
def measure_model(model: nn.Module, loss_fn: Callable, data: Any, names: Sequence[str], *, rho: float = 0.05,
                  samples: int = 100, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Run the named measures; returns ``{name: Measurement.as_dict()}``."""
    options = {"rho": rho, "samples": samples, "seed": seed}
    return {name: _MEASURES[name][0](model, loss_fn, data, options).as_dict() for name in _check_names(names)}


SPLITS = ("train", "test")


def load_for_measurement(path: str | os.PathLike[str], *, examples: int = 1000, batch_size: int = 500,
                         split: str = "train"):
    """Rebuild a checkpoint's model (weights loaded) and the first ``examples`` of its data set's ``split``.

    The data set (with the run's seed, label noise and subset) comes from the checkpoint's config.

    Returns ``(state, config, model, loss_fn, batches)``.
    """
    from ..data import load_dataset
    from ..models import create_model

    if examples < 1 or batch_size < 1:
        raise ValueError(f"Invalid examples/batch_size: {examples}/{batch_size} (expected integers >= 1)")
    if split not in SPLITS:
        raise ValueError(f"Invalid split value: {split!r} (expected one of {', '.join(SPLITS)})")
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    data = load_dataset(config.dataset, **config.dataset_options())
    model = create_model(config.model, num_classes=data.num_classes, input_shape=data.input_shape,
                         **config.model_options)
    model.load_state_dict(state["model"])
    source = data.train if split == "train" else data.test
    xs, ys = next(iter_batches(source, min(examples, len(source)), None))  # in order, not augmented
    batches = list(zip(xs.split(batch_size), ys.split(batch_size)))
    return state, config, model, make_loss(config), batches


def measure_checkpoint(path: str | os.PathLike[str], names: Sequence[str], *, examples: int = 1000,
                       batch_size: int = 500, rho: float = 0.05, samples: int = 100, seed: int = 0,
                       split: str = "train", out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Rebuild the checkpoint's model and data, run the measures, optionally write JSON atomically."""
    names = _check_names(names)
    state, _, model, loss_fn, batches = load_for_measurement(path, examples=examples, batch_size=batch_size,
                                                             split=split)
    result = {
        "checkpoint": str(path), "config": state["config"], "epoch": state.get("epoch"), "split": split,
        "examples": sum(len(y) for _, y in batches),
        "measures": measure_model(model, loss_fn, batches, names, rho=rho, samples=samples, seed=seed),
    }
    if out is not None:
        write_text_atomically(out, json.dumps(result, indent=2))
    return result


LANDSCAPES = ("1d", "2d")


def check_landscape_kinds(kinds: Sequence[str]) -> list[str]:
    """``kinds`` if they are some of :data:`LANDSCAPES` (checked before anything is measured)."""
    unknown = [k for k in kinds if k not in LANDSCAPES]
    if unknown or not kinds:
        raise ValueError(f"Invalid landscape kinds: {list(kinds)} (expected some of {', '.join(LANDSCAPES)})")
    return list(kinds)


def landscape_checkpoint(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], kinds: Sequence[str], *,
                         examples: int = 1000, batch_size: int = 500, points: int = 21, span: float = 1.0,
                         seed: int = 0, split: str = "train") -> list[Path]:
    """Loss landscapes of a checkpoint along random filter-normalized directions (Li et al., 2018) as PNGs.

    ``"1d"``: ``L(w + a d)`` for ``a`` in ``[-span, span]``; ``"2d"``: a contour plot of
    ``L(w + a d_1 + b d_2)``, on the first ``examples`` of ``split``. The files are
    ``<checkpoint stem>_landscape_1d.png`` and ``..._2d.png`` in ``out_dir`` (one folder holds several
    checkpoints' pictures). Returns the written files.
    """
    kinds = check_landscape_kinds(kinds)
    _, _, model, loss_fn, batches = load_for_measurement(path, examples=examples, batch_size=batch_size,
                                                         split=split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(path).stem
    written = []
    if "1d" in kinds:
        target = out_dir / f"{stem}_landscape_1d.png"
        measures.loss_along_direction(model, loss_fn, batches, span=(-span, span), points=points, seed=seed,
                                      plot_path=target)
        written.append(target)
    if "2d" in kinds:
        target = out_dir / f"{stem}_landscape_2d.png"
        measures.loss_surface(model, loss_fn, batches, x_span=(-span, span), y_span=(-span, span), points=points,
                              seed=seed, plot_path=target)
        written.append(target)
    return written
