"""Bad input gets a clear error naming the argument, the value and the valid range (table-driven)."""

from __future__ import annotations

import pytest
import torch

import sharpness
from helpers import classification_data, make_closure, mlp


def _base():
    return torch.optim.SGD(mlp(0).parameters(), lr=0.1)


BAD_ARGUMENTS = [
    # (constructor, kwargs, exception, fragments the message must contain)
    (sharpness.SAM, {"rho": -0.1}, ValueError, ["rho", "-0.1", "rho >= 0"]),
    (sharpness.SAM, {"rho": float("nan")}, ValueError, ["rho", "nan"]),
    (sharpness.SAM, {"rho": float("inf")}, ValueError, ["rho", "inf", ">= 0"]),
    (sharpness.SAM, {"rho": "0.05"}, TypeError, ["rho", "str"]),
    (sharpness.SAM, {"eps": -1.0}, ValueError, ["eps", "-1.0", ">= 0"]),
    (sharpness.SAM, {"max_grad_norm": 0.0}, ValueError, ["max_grad_norm", "0.0", "> 0"]),
    (sharpness.SAM, {"model": "net"}, TypeError, ["model", "str", "Module"]),
    (sharpness.SAM, {"grad_scaler": object()}, TypeError, ["grad_scaler", "GradScaler"]),
    (sharpness.ASAM, {"eta": -0.01}, ValueError, ["eta", "-0.01", ">= 0"]),
    (sharpness.LookSAM, {"k": 0}, ValueError, ["k", "0", ">= 1"]),
    (sharpness.LookSAM, {"k": 2.5}, TypeError, ["k", "float", "integer"]),
    (sharpness.LookSAM, {"alpha": -1.0}, ValueError, ["alpha", "-1.0", ">= 0"]),
    (sharpness.SSSAM, {"p": 1.5}, ValueError, ["p", "1.5", "0 <= p <= 1"]),
    (sharpness.SSSAM, {"p": -0.1}, ValueError, ["p", "-0.1", "0 <= p <= 1"]),
    (sharpness.SSSAM, {"seed": -3}, ValueError, ["seed", "-3", ">= 0"]),
    (sharpness.AESAM, {"total_steps": 0}, ValueError, ["total_steps", "0", ">= 1"]),
    (sharpness.AESAM, {"total_steps": -5}, ValueError, ["total_steps", "-5", ">= 1"]),
    (sharpness.AESAM, {"total_steps": 10, "lambda1": 2.0, "lambda2": 1.0}, ValueError,
     ["lambda1", "2.0", "lambda1 <= lambda2"]),
    (sharpness.AESAM, {"total_steps": 10, "delta": 1.0}, ValueError, ["delta", "1.0", "0 < delta < 1"]),
    (sharpness.AESAM, {"total_steps": 10, "delta": 0.0}, ValueError, ["delta", "0.0", "0 < delta < 1"]),
    (sharpness.AESAM, {"total_steps": 10, "lambda2": float("inf")}, ValueError, ["lambda2", "inf", "finite"]),
    (sharpness.AELookSAM, {"total_steps": 10, "alpha": -0.5}, ValueError, ["alpha", "-0.5", ">= 0"]),
    (sharpness.AELookSAM, {"total_steps": 10, "lambda1": 3.0}, ValueError, ["lambda1", "3.0", "lambda2"]),
]


@pytest.mark.parametrize(
    "cls, kwargs, exc, fragments", BAD_ARGUMENTS, ids=[f"{c.__name__}-{sorted(k)}" for c, k, _, _ in BAD_ARGUMENTS]
)
def test_bad_argument(cls, kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        cls(_base(), **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"


def test_missing_total_steps_is_a_type_error():
    with pytest.raises(TypeError, match="total_steps"):
        sharpness.AESAM(_base())


def test_step_without_closure():
    opt = sharpness.SAM(_base())
    with pytest.raises(TypeError, match=r"SAM.step\(\) requires a closure.*first_step\(\)"):
        opt.step()
    with pytest.raises(TypeError, match="closure type"):
        opt.step(42)


def test_phase_errors():
    model = mlp(0)
    x, y = classification_data(0)
    opt = sharpness.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"second_step\(\) called without first_step\(\)"):
        opt.second_step()
    make_closure(opt, model, x, y)()
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"first_step\(\) called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"state_dict\(\) called between"):
        opt.state_dict()


def test_constructor_forms():
    params = list(mlp(0).parameters())
    with pytest.raises(TypeError, match="needs a base optimizer"):
        sharpness.SAM(params)
    with pytest.raises(TypeError, match="Invalid base_class"):
        sharpness.SAM(params, "sgd")
    with pytest.raises(TypeError, match="instance and a base optimizer class"):
        sharpness.SAM(torch.optim.SGD(params, lr=0.1), torch.optim.SGD)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['lr'\]"):
        sharpness.SAM(torch.optim.SGD(params, lr=0.1), lr=0.2)
    with pytest.raises(TypeError, match="cannot wrap another sharpness-aware optimizer"):
        sharpness.SAM(sharpness.SAM(torch.optim.SGD(params, lr=0.1)))


def test_unknown_registry_name_lists_choices():
    with pytest.raises(ValueError) as info:
        sharpness.create("adamw-sam", _base())
    assert "adamw-sam" in str(info.value)
    for name in ("sam", "asam", "looksam", "sssam", "aesam", "aelooksam"):
        assert name in str(info.value)


def test_foreign_state_dict_is_rejected():
    model = mlp(0)
    opt = sharpness.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no 'sharpness' entry"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    with pytest.raises(TypeError, match="state_dict type"):
        opt.load_state_dict([1, 2])
