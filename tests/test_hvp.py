"""The shared Hessian-vector product against a dense Hessian from torch.func.hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sharpness.measures import HVP_METHODS, HessianOperator, hvp


def _problem(batchnorm: bool = False):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5)] + ([nn.BatchNorm1d(5)] if batchnorm else []) + [nn.Tanh(), nn.Linear(5, 2)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    return model, x, y


def _dense_hessian(model, x, y):
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(w):
        pieces, i = [], 0
        for p in params:
            pieces.append(w[i:i + p.numel()].view_as(p))
            i += p.numel()
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, pieces)), (x,)), y)

    return hessian(loss)(flat)


def _flat(vectors):
    return torch.cat([v.reshape(-1) for v in vectors])


@pytest.mark.parametrize("method", HVP_METHODS)
@pytest.mark.parametrize("split", [False, True], ids=["one-batch", "two-batches"])
def test_hvp_matches_dense_hessian(method, split):
    model, x, y = _problem()
    model.eval()
    dense = _dense_hessian(model, x, y)
    torch.manual_seed(1)
    v = [torch.randn_like(p) for p in model.parameters()]
    data = [(x[:5], y[:5]), (x[5:], y[5:])] if split else (x, y)
    out = _flat(hvp(model, nn.functional.cross_entropy, data, v, method=method))
    tol = 1e-7 if method == "finite_difference" else 1e-12
    torch.testing.assert_close(out, dense @ _flat(v), rtol=0, atol=tol)


def test_operator_reuses_graph_and_counts_products():
    model, x, y = _problem()
    model.eval()
    dense = _dense_hessian(model, x, y)
    op = HessianOperator(model, nn.functional.cross_entropy, (x, y))
    for seed in range(3):
        torch.manual_seed(seed)
        v = [torch.randn_like(p) for p in model.parameters()]
        torch.testing.assert_close(_flat(op(v)), dense @ _flat(v), rtol=0, atol=1e-12)
    assert op.matvecs == 3 and op.dim == sum(p.numel() for p in model.parameters())


def test_mode_and_batchnorm_buffers_are_restored():
    model, x, y = _problem(batchnorm=True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v = [torch.ones_like(p) for p in model.parameters()]
    for mode in ("eval", "train"):
        hvp(model, nn.functional.cross_entropy, (x, y), v, mode=mode)
        assert model.training and all(m.training for m in model.modules())
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_bad_inputs():
    model, x, y = _problem()
    v = [torch.ones_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="no samples"):
        hvp(model, nn.functional.cross_entropy, [], v)
    with pytest.raises(ValueError, match="scalar"):
        hvp(model, lambda out, t: nn.functional.cross_entropy(out, t, reduction="none"), (x, y), v)
    with pytest.raises(ValueError, match="method"):
        hvp(model, nn.functional.cross_entropy, (x, y), v, method="lanczos")
    with pytest.raises(ValueError, match="mode"):
        hvp(model, nn.functional.cross_entropy, (x, y), v, mode="test")
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        hvp(model, nn.functional.cross_entropy, (x, y), v[:-1])
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        hvp(frozen, nn.functional.cross_entropy, (x, y), [])


def test_tuple_inputs_and_non_module_model():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2).double()
            self.b = nn.Linear(3, 2).double()

        def forward(self, x1, x2):
            return self.a(x1) + self.b(x2)

    torch.manual_seed(0)
    model = Pair()
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    v = [torch.ones_like(p) for p in model.parameters()]
    single = hvp(model, nn.functional.cross_entropy, ((x1, x2), y), v)
    listed = hvp(model, nn.functional.cross_entropy, [((x1, x2), y)], v)
    assert all(torch.equal(a, b) for a, b in zip(single, listed))
    with pytest.raises(TypeError, match="Invalid model type"):
        hvp(lambda t: t, nn.functional.cross_entropy, (x1, y), v)
