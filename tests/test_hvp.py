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


def _dropout_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 2)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    return model, [(x[:5], y[:5]), (x[5:], y[5:])]


def _fixed_mask_hessian(model, batches):
    """By hand: batch i's forward draws its dropout masks right after ``torch.manual_seed(i)``; the loss is the
    size-weighted mean. ``torch.autograd.functional.hessian`` runs the function once (one forward per batch)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    total = sum(len(y) for _, y in batches)

    def loss(*ws):
        out = 0.0
        for i, (x, y) in enumerate(batches):
            torch.manual_seed(i)
            out = out + len(y) / total * nn.functional.cross_entropy(
                functional_call(model, dict(zip(names, ws)), (x,)), y)
        return out

    model.train()
    blocks = torch.autograd.functional.hessian(loss, tuple(params))
    sizes = [p.numel() for p in params]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
                      for i in range(len(params))], 0)


@pytest.mark.parametrize("method", HVP_METHODS)
def test_train_mode_dropout_hvp_is_the_fixed_mask_hessian_and_leaves_the_global_stream(method):
    model, batches = _dropout_problem()
    dense = _fixed_mask_hessian(model, batches)
    model.eval()
    v = [torch.randn_like(p) for p in model.parameters()]
    state = torch.get_rng_state()
    out = [_flat(hvp(model, nn.functional.cross_entropy, batches, v, method=method, mode="train")) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)  # measuring draws nothing from the global stream
    assert not model.training
    tol = 1e-7 if method == "finite_difference" else 1e-12
    for o in out:  # each product (and each side of the finite difference) sees the same masks
        torch.testing.assert_close(o, dense @ _flat(v), rtol=0, atol=tol)
    # the masks matter: the same product without dropout is far from it
    model_no_drop = nn.Sequential(*[m for m in model if not isinstance(m, nn.Dropout)])
    plain = _flat(hvp(model_no_drop, nn.functional.cross_entropy, batches, v, mode="train"))
    assert (plain - dense @ _flat(v)).abs().max() > 1e-3


def test_train_mode_dropout_top_eigenvalue_matches_the_fixed_mask_dense_hessian():
    from sharpness.measures import hessian_eigenvalues, hessian_trace
    model, batches = _dropout_problem()
    eigs = torch.linalg.eigvalsh(_fixed_mask_hessian(model, batches))
    for hvp_method in HVP_METHODS:
        top = hessian_eigenvalues(model, nn.functional.cross_entropy, batches, mode="train",
                                  hvp_method=hvp_method)
        assert top.value == pytest.approx(float(eigs[-1]), rel=1e-6 if hvp_method == "finite_difference" else 1e-9)
    trace = hessian_trace(model, nn.functional.cross_entropy, batches, mode="train", samples=400, seed=0)
    assert abs(trace.value - float(eigs.sum())) < 4 * trace.stderr


def test_train_mode_dropout_losses_and_gradient_moments_are_those_of_the_fixed_masks():
    from sharpness.measures import gradient_variance, loss_along_direction
    model, batches = _dropout_problem()
    direction = [torch.randn_like(p) for p in model.parameters()]
    curve = loss_along_direction(model, nn.functional.cross_entropy, batches, direction, span=(-0.5, 0.5),
                                 points=3, mode="train")
    model.train()
    for alpha, loss in zip(curve.coordinates, curve.losses):  # by hand: batch i after torch.manual_seed(i)
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.add_(d, alpha=float(alpha))
            expected = 0.0
            for i, (x, y) in enumerate(batches):
                torch.manual_seed(i)
                expected += len(y) / 12 * float(nn.functional.cross_entropy(model(x), y))
            for p, d in zip(model.parameters(), direction):
                p.sub_(d, alpha=float(alpha))
        assert loss == pytest.approx(expected, rel=1e-12)
    # sum_B (n_B/N) g_B = g_D only when each batch's gradient sees the masks it had in the full gradient
    var = gradient_variance(model, nn.functional.cross_entropy, batches, mode="train")
    identity = var.settings["mean_squared_norm"] - var.settings["full_gradient_squared_norm"]
    assert var.value == pytest.approx(identity, rel=1e-10)
