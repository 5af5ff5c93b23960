"""Transformers through the second-order paths: attention's fused kernels (flash attention, on the CPU too)
have no double backward, no forward-mode derivative and no vmap batching rule. GNR's exact HVPs, the Hessian
measures and per-example gradients select the math kernel (``sharpness._attention``); each test fails with
that selection removed."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import sharpness
from sharpness.measures import hvp
from sharpness.measures._per_sample import per_sample_gradients
from sharpness.models import create_model


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("vit", num_classes=3, input_shape=(1, 8, 8), patch_size=4, dim=8, depth=2, heads=2,
                        mlp_ratio=2.0).double()


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=generator))


def test_fused_attention_is_what_fails_without_the_math_kernel():
    """The premise: a plain double backward through the ViT raises on this torch build."""
    model, (x, y) = tiny_vit(), batch()
    model.train()  # no fast path: the layer calls F.scaled_dot_product_attention
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    try:
        torch.autograd.grad(sum(g.square().sum() for g in grads), list(model.parameters()))
    except RuntimeError as error:
        assert "scaled_dot_product" in str(error)
    else:
        pytest.skip("this torch build differentiates its fused attention twice")


@pytest.mark.parametrize("method", ["double_backward", "func"])
def test_hessian_vector_products_of_a_transformer(method):
    """Exact HVPs (double backward; forward-over-reverse) against central differences of gradients."""
    model, data = tiny_vit(), batch()
    generator = torch.Generator().manual_seed(2)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    loss_fn = F.cross_entropy
    exact = hvp(model, loss_fn, data, vector, method=method)
    reference = hvp(model, loss_fn, data, vector, method="finite_difference", fd_eps=1e-5)
    scale = max(float(r.abs().max()) for r in reference)
    assert scale > 1e-3
    for a, b in zip(exact, reference):
        torch.testing.assert_close(a, b, atol=1e-6 * scale, rtol=1e-5)


def test_gnr_exact_trains_a_transformer_as_its_finite_difference_mode_does():
    """The difference of the two modes shrinks linearly with the radius here (0.9e-4 at 1e-6)."""
    data = batch()
    steps = {}
    for mode in ("exact", "finite_difference"):
        model = tiny_vit()
        opt = sharpness.GNR(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, alpha=0.5, hvp=mode,
                            fd_radius=1e-8)
        closure = sharpness.make_closure(opt, lambda reduction, m=model: F.cross_entropy(
            m(data[0]), data[1], reduction=reduction))
        for _ in range(2):
            opt.step(closure)
        steps[mode] = [p.detach().clone() for p in model.parameters()]
        assert opt.sam_steps == 2
    moved = max(float((a - b).abs().max()) for a, b in zip(steps["exact"], tiny_vit().parameters()))
    assert moved > 1e-3
    for a, b in zip(steps["exact"], steps["finite_difference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_per_example_gradients_of_a_transformer_are_batched():
    """vmap over the examples equals one backward per example, and runs batched (no per-example fallback)."""
    model, (x, y) = tiny_vit(), batch(4)
    model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        losses, grads = per_sample_gradients(model, F.cross_entropy, x, y)
    for j in range(len(x)):
        model.zero_grad()
        loss = F.cross_entropy(model(x[j:j + 1]), y[j:j + 1])
        loss.backward()
        torch.testing.assert_close(losses[j], loss.detach())
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g[j], p.grad, atol=1e-12, rtol=1e-9)
