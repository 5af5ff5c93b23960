"""Argument checks shared by every optimizer: one message format, name + value + valid range."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__: list[str] = []


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _type_and_value(value: object) -> str:
    """``str 'abc'``: the type and a short repr of a value of the wrong type (a CLI ``--opt rho=abc`` shows it)."""
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def check_real(name: str, value: object) -> float:
    if not _is_real(value):
        raise TypeError(f"Invalid {name} type: {_type_and_value(value)} (expected a real number)")
    value = float(value)  # type: ignore[arg-type]
    if math.isnan(value):
        raise ValueError(f"Invalid {name} value: nan (expected a finite number)")
    return value


def check_non_negative(name: str, value: object) -> float:
    value = check_real(name, value)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"Invalid {name} value: {value} (expected {name} >= 0 and finite)")
    return value


def check_finite(name: str, value: object) -> float:
    value = check_real(name, value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value} (expected a finite number)")
    return value


def check_positive(name: str, value: object) -> float:
    value = check_real(name, value)
    if not (0.0 < value < math.inf):
        raise ValueError(f"Invalid {name} value: {value} (expected {name} > 0 and finite)")
    return value


def check_open_unit(name: str, value: object) -> float:
    value = check_real(name, value)
    if not (0.0 < value < 1.0):
        raise ValueError(f"Invalid {name} value: {value} (expected 0 < {name} < 1)")
    return value


def check_probability(name: str, value: object) -> float:
    value = check_real(name, value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"Invalid {name} value: {value} (expected 0 <= {name} <= 1)")
    return value


def check_bool(name: str, value: object) -> bool:
    """A flag must be a real bool: ``"False"``, ``None`` or ``nan`` would otherwise read as a truth value."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name} type: {_type_and_value(value)} (expected bool)")
    return value


def check_int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {name} type: {_type_and_value(value)} (expected an integer >= {minimum})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"Invalid {name} value: {value} (expected an integer {name} >= {minimum})")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` must be one of ``choices`` (strings); the error lists them."""
    if value not in choices:
        raise ValueError(f"Invalid {name} value: {value!r} (expected one of {', '.join(map(repr, choices))})")
    return value  # type: ignore[return-value]


def check_wrapper_options(model: object, max_grad_norm: object, foreach: object) -> float | None:
    """The options every optimizer wrapper takes: ``model`` (an ``nn.Module`` or None), ``max_grad_norm``
    (> 0 or None) and ``foreach`` (None, True or False). Returns the checked ``max_grad_norm``."""
    from torch import nn

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model type: {type(model).__name__} (expected a torch.nn.Module)")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"Invalid foreach value: {foreach!r} (expected None, True or False)")
    return None if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)


def check_dense_grads(owner: str, grads: Sequence[Any]) -> None:
    """Refuse sparse gradients (``nn.Embedding(sparse=True)``; ``None`` entries are skipped): the perturbations
    are dense tensor algebra."""
    if any(g is not None and g.is_sparse for g in grads):
        raise RuntimeError(f"{owner} does not support sparse gradients (use nn.Embedding(..., sparse=False))")
