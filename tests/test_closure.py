"""sharpness.make_closure follows the optimizer's closure convention from its flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpness
from helpers import classification_data, make_optimizer, mlp, registered_names


def _setup(**flags):
    model = mlp(0)
    x, y = classification_data(0, n=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for key, value in flags.items():
        setattr(opt, key, value)
    calls = []

    def compute_loss(reduction):
        calls.append(reduction)
        return nn.functional.cross_entropy(model(x), y, reduction=reduction)

    return model, x, y, opt, calls, sharpness.make_closure(opt, compute_loss)


def test_default_closure_backpropagates_the_mean_loss():
    model, x, y, _opt, calls, closure = _setup()
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # stale gradients must be cleared
    loss = closure()
    expected = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    assert calls == ["mean"] and loss.dim() == 0
    for p, g in zip(model.parameters(), expected):
        assert torch.equal(p.grad, g) and p.grad.grad_fn is None


def test_needs_graph_keeps_a_differentiable_gradient():
    model, x, y, _opt, _calls, closure = _setup(needs_graph=True)
    closure()
    grads = [p.grad for p in model.parameters()]
    assert all(g.requires_grad for g in grads)
    v = [torch.ones_like(g) for g in grads]
    hv = torch.autograd.grad(grads, list(model.parameters()), grad_outputs=v)
    params = list(model.parameters())

    def loss_of(*ps):
        out = torch.func.functional_call(model, {n: p for (n, _), p in zip(model.named_parameters(), ps)}, (x,))
        return nn.functional.cross_entropy(out, y)

    _, expected = torch.autograd.functional.hvp(loss_of, tuple(p.detach() for p in params), tuple(v))
    for a, b in zip(hv, expected):
        torch.testing.assert_close(a, b)
    for p in params:  # break the reference cycle the graph creates
        p.grad = None


def test_per_sample_closure_returns_losses_without_backward():
    model, x, y, _opt, calls, closure = _setup(needs_per_sample_losses=True)
    losses = closure()
    assert calls == ["none"] and losses.shape == (8,)
    torch.testing.assert_close(losses, nn.functional.cross_entropy(model(x), y, reduction="none"))
    assert all(p.grad is None for p in model.parameters())


def test_per_sample_losses_of_sequence_models_are_averaged_over_time():
    logits = torch.randn(3, 5, 7)  # (B, V, T)
    targets = torch.randint(0, 5, (3, 7))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    opt.needs_per_sample_losses = True
    closure = sharpness.make_closure(opt, lambda r: nn.functional.cross_entropy(logits, targets, reduction=r))
    torch.testing.assert_close(closure(), nn.functional.cross_entropy(logits, targets, reduction="none").mean(1))


def test_bad_compute_loss_type():
    with pytest.raises(TypeError, match="compute_loss"):
        sharpness.make_closure(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 3)


#: every registered optimizer with its defaults (its own closure convention), plus the other code paths that keep
#: gradients across passes
IN_PLACE_CASES = [(name, {}) for name in registered_names()] + [
    ("gnr", {"hvp": "finite_difference"}), ("gnr", {"hvp": "finite_difference", "oracle": "sam"}),
    ("gnr", {"oracle": "sam"}), ("salr", {"normalization": "per_sample"}), ("looksam", {"k": 2}),
    ("aelooksam", {"lambda1": 1.0, "lambda2": 1.0}), ("esam", {"beta": 0.5, "gamma": 0.5}),
    ("smoothout", {"adaptive": True, "copies": 2}), ("frobsam", {"num_samples": 3}), ("tracesam", {"num_samples": 2}),
]


@pytest.mark.parametrize("name, options", IN_PLACE_CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" if o else n for n, o in IN_PLACE_CASES])
def test_a_closure_that_zeroes_gradients_in_place_gives_the_same_steps(name, options):
    """``zero_grad(set_to_none=False)`` reuses the gradient buffers: a method that kept a gradient in them across
    passes would see it overwritten. (GNR's finite-difference HVP did: its regularizer came out 0.)"""
    def run(set_to_none: bool) -> list[torch.Tensor]:
        model = mlp(0)
        x, y = classification_data(0, n=16)
        opt = make_optimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **options)

        def closure():
            opt.zero_grad(set_to_none=set_to_none)
            if getattr(opt, "needs_per_sample_losses", False):
                return nn.functional.cross_entropy(model(x), y, reduction="none")
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward(create_graph=bool(getattr(opt, "needs_graph", False)))
            return loss

        for _ in range(4):
            opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
