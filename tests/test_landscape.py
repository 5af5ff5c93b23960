"""Loss landscapes: interpolation endpoints, Li et al.'s filter normalization, 1-D/2-D slices against closed
forms, local extrema of cos(k t) (GNR Fig. 1b), PNG files, bad inputs, bit-exact restoration."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sharpness.measures import (LossCurve, count_local_extrema, filter_normalized_direction, interpolate,
                                loss_along_direction, loss_surface, plot_lines, plot_loss_curve,
                                plot_loss_surface, random_direction)
from sharpness.measures._common import as_batches, mean_loss, measurement_mode

PNG = b"\x89PNG\r\n\x1a\n"
DUMMY = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
CE = nn.functional.cross_entropy


def identity_loss(output, target):
    return output.sum()


class Toy(nn.Module):
    def __init__(self, fn, dim: int = 1) -> None:
        super().__init__()
        self.fn = fn
        self.t = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, x):
        return self.fn(self.t)


def _net(seed: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)]
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():  # distinct running statistics, so buffers matter in eval mode
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _images(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, 4, 4, generator=g, dtype=dtype), torch.randint(0, 2, (6,), generator=g)


def _loss(model, data, mode="eval"):
    with measurement_mode(model, mode):
        return mean_loss(model, CE, as_batches(data))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _assert_restored(model, snapshot):
    state, flags = snapshot
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# --------------------------------------------------------------------------------------- interpolation
def test_interpolation_endpoints_are_the_two_models_losses(tmp_path):
    a, b = _net(0), _net(1)
    data = _images()
    snapshot = _snapshot(a)
    curve = interpolate(a, CE, data, b, points=5, plot_path=tmp_path / "interp.png")
    assert curve.losses.shape == (5,) and list(curve.coordinates) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.losses[0] == _loss(a, data) and curve.losses[-1] == _loss(b, data)
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for key, value in mid.state_dict().items():
            if value.is_floating_point():
                value.copy_(a.state_dict()[key] * 0.5 + b.state_dict()[key] * 0.5)
    assert curve.losses[2] == pytest.approx(_loss(mid, data), rel=1e-12)
    same = interpolate(a, CE, data, b.state_dict(), points=5)  # a state dict works as well
    np.testing.assert_array_equal(same.losses, curve.losses)
    _assert_restored(a, snapshot)
    assert (tmp_path / "interp.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError):
        curve.losses[0] = 0.0  # read-only arrays


def test_interpolation_beyond_the_ends_and_bad_other():
    a, b = _net(0), _net(1)
    curve = interpolate(a, CE, _images(), b, points=9, span=(-0.5, 1.5))
    assert curve.coordinates[0] == -0.5 and curve.losses[2] == _loss(a, _images())
    with pytest.raises(ValueError, match="lacks"):
        interpolate(a, CE, _images(), nn.Linear(2, 2).double())
    bad = {k: v.clone() for k, v in b.state_dict().items()}
    bad["4.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="4.weight has shape"):
        interpolate(a, CE, _images(), bad)
    with pytest.raises(TypeError, match="Invalid other type"):
        interpolate(a, CE, _images(), [1, 2])


# --------------------------------------------------------------------------------------- directions
@pytest.mark.parametrize("bias_bn", ["zero", "weights"])
def test_filter_normalized_direction_matches_filter_norms(bias_bn):
    model = _net(0)
    d = filter_normalized_direction(model, seed=3, bias_bn=bias_bn)
    for p, x in zip(model.parameters(), d):
        assert x.shape == p.shape
        if p.dim() >= 2:  # conv output channels, linear rows
            torch.testing.assert_close(x.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1),
                                       rtol=1e-12, atol=0)
            assert not torch.allclose(x, p.detach())  # a random direction, not the weights
        elif bias_bn == "zero":
            assert torch.equal(x, torch.zeros_like(p))
        else:
            assert torch.equal(x, p.detach())
    again = filter_normalized_direction(model, seed=3, bias_bn=bias_bn)
    other = filter_normalized_direction(model, seed=4, bias_bn=bias_bn)
    assert all(torch.equal(u, v) for u, v in zip(d, again))
    assert not all(torch.equal(u, v) for u, v in zip(d, other))


def test_unit_direction_has_unit_norm():
    d = random_direction(_net(0), normalization="unit", seed=1)
    assert float(torch.sqrt(sum((x.double() ** 2).sum() for x in d))) == pytest.approx(1.0, rel=1e-12)


# --------------------------------------------------------------------------------------- slices
def test_loss_along_direction_matches_shifted_copies(tmp_path):
    model = _net(0)
    data = _images()
    snapshot = _snapshot(model)
    d = filter_normalized_direction(model, seed=0)
    curve = loss_along_direction(model, CE, data, d, span=(-1.0, 1.0), points=5,
                                 plot_path=tmp_path / "line.png")
    assert curve.losses[2] == _loss(model, data)  # a = 0: the weights themselves
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip(shifted.parameters(), d):
            p.add_(x)
    assert curve.losses[-1] == pytest.approx(_loss(shifted, data), rel=1e-12)
    assert curve.settings["kind"] == "direction"
    _assert_restored(model, snapshot)
    assert (tmp_path / "line.png").read_bytes()[:8] == PNG
    drawn = loss_along_direction(model, CE, data, points=5, seed=0)  # same seed, drawn inside
    np.testing.assert_array_equal(drawn.losses, curve.losses)


def test_loss_surface_grid_against_a_quadratic(tmp_path):
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    model = Toy(lambda w: 0.5 * w @ a @ w, dim=2)
    d1, d2 = [torch.tensor([1.0, 0.0], dtype=torch.float64)], [torch.tensor([0.3, 1.0], dtype=torch.float64)]
    surface = loss_surface(model, identity_loss, DUMMY, (d1, d2), x_span=(-1, 1), y_span=(-2, 2),
                           points=(5, 3), plot_path=tmp_path / "surface.png")
    assert surface.losses.shape == (3, 5) and surface.x.shape == (5,) and surface.y.shape == (3,)
    for i, b in enumerate(surface.y):
        for j, c in enumerate(surface.x):
            e = c * d1[0] + b * d2[0]
            assert surface.losses[i, j] == pytest.approx(float(0.5 * e @ a @ e), rel=1e-12, abs=1e-15)
    assert surface.losses[1, 2] == 0.0
    assert (tmp_path / "surface.png").read_bytes()[:8] == PNG
    assert torch.equal(model.t, torch.zeros(2, dtype=torch.float64))


def test_loss_surface_random_filter_directions_and_log_contour(tmp_path):
    model = _net(0)
    snapshot = _snapshot(model)
    surface = loss_surface(model, CE, _images(), points=4, seed=2)
    assert surface.losses.shape == (4, 4) and np.isfinite(surface.losses).all()
    path = plot_loss_surface(surface, tmp_path / "sub" / "log.png", log_scale=True, title="log")
    assert path.read_bytes()[:8] == PNG
    _assert_restored(model, snapshot)


def test_plots_of_several_curves(tmp_path):
    x = np.linspace(0, 1, 5)
    curves = {name: LossCurve(x, x ** k) for name, k in (("linear", 1), ("square", 2))}
    assert plot_loss_curve(curves, tmp_path / "two.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="one per x"):
        plot_lines(x, {"short": [1.0, 2.0]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="other coordinates"):
        plot_loss_curve({"a": curves["linear"], "b": LossCurve(x + 1, x)}, tmp_path / "bad.png")


# --------------------------------------------------------------------------------------- local extrema
def test_local_extrema_refuses_a_non_finite_landscape():
    """NaN compares False both ways, so a NaN curve would count as having no extrema: refused instead."""
    model = Toy(lambda t: torch.where(t.sum() > 0.5, torch.tensor(float("nan")), torch.cos(10 * t).sum()))
    with pytest.raises(ValueError, match="non-finite values along a direction"):
        count_local_extrema(model, identity_loss, DUMMY, 1.0, directions=2, points=21)


def test_local_extrema_of_cos_k_t_along_the_only_direction():
    """L(t) = cos(k t), k = 10, rho = 1: interior extrema at t = m pi / k for m = 1, 2, 3 (3 pi/10 < 1)."""
    k, rho = 10.0, 1.0
    model = Toy(lambda t: torch.cos(k * t).sum())
    one = count_local_extrema(model, identity_loss, DUMMY, rho, directions=4, points=201)
    assert one.settings["minima"] == [2] * 4  # t = pi/10, 3 pi/10
    assert one.settings["maxima"] == [1] * 4  # t = 2 pi/10
    assert one.value == 3.0 and one.stderr == 0.0 and one.samples == 4
    two = count_local_extrema(model, identity_loss, DUMMY, rho, directions=2, points=201, two_sided=True)
    assert two.settings["minima"] == [4, 4]
    assert two.settings["maxima"] == [3, 3]  # w itself is the middle maximum
    expected = math.floor(rho * k / math.pi)
    assert one.settings["mean_minima"] + one.settings["mean_maxima"] == expected


def test_local_extrema_with_filter_normalized_directions():
    class Weight(nn.Module):  # a 2-D weight, so filter normalization applies: d = +-|w| / |w| = +-1
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((1, 1), 0.3, dtype=torch.float64))

        def forward(self, x):
            return torch.cos(10.0 * (self.w - 0.3)).sum()

    out = count_local_extrema(Weight(), identity_loss, DUMMY, 1.0, directions=3, points=201,
                              normalization="filter")
    assert out.settings["minima"] == [2, 2, 2] and out.settings["maxima"] == [1, 1, 1]
    with pytest.raises(ValueError, match="direction: it is zero"):
        count_local_extrema(Toy(lambda t: t.sum()), identity_loss, DUMMY, 1.0, normalization="filter")


def test_local_extrema_gnr_defaults_on_a_network():
    model = _net(0)
    model.train()
    snapshot = _snapshot(model)
    out = count_local_extrema(model, CE, _images(), 0.1, directions=5)
    assert out.settings["points"] == 11 and len(out.settings["minima"]) == 5 and out.value >= 0
    assert all(0 <= a + b <= 9 for a, b in zip(out.settings["minima"], out.settings["maxima"]))
    _assert_restored(model, snapshot)


# --------------------------------------------------------------------------------------- errors, restore
@pytest.mark.parametrize("call, error, match", [
    (lambda m, d: count_local_extrema(m, CE, d, 0.0), ValueError, r"Invalid rho value: 0.0 \(expected rho"),
    (lambda m, d: count_local_extrema(m, CE, d, -1.0), ValueError, "Invalid rho value"),
    (lambda m, d: count_local_extrema(m, CE, d, 0.1, points=2), ValueError, "Invalid points value: 2"),
    (lambda m, d: count_local_extrema(m, CE, d, 0.1, directions=0), ValueError, "Invalid directions value"),
    (lambda m, d: count_local_extrema(m, CE, d, 0.1, normalization="layer"), ValueError,
     "Invalid normalization value: 'layer'"),
    (lambda m, d: count_local_extrema(m, CE, d, 0.1, mode="test"), ValueError, "Invalid mode value"),
    (lambda m, d: count_local_extrema(m, CE, [], 0.1), ValueError, "no samples"),
    (lambda m, d: loss_along_direction(m, CE, d, span=(1.0, -1.0)), ValueError, "expected start < stop"),
    (lambda m, d: loss_along_direction(m, CE, d, points=1), ValueError, "Invalid points value: 1"),
    (lambda m, d: loss_along_direction(m, CE, d, [torch.zeros(2)]), ValueError, "one tensor per trainable"),
    (lambda m, d: loss_along_direction(m, lambda o, t: CE(o, t, reduction="none"), d), ValueError, "scalar"),
    (lambda m, d: loss_surface(m, CE, d, points=(3, 1)), ValueError, r"Invalid points\[1\] value: 1"),
    (lambda m, d: loss_surface(m, CE, d, directions=([],)), TypeError, "pair of directions"),
    (lambda m, d: interpolate(m, CE, d, m, points=1), ValueError, "Invalid points value"),
    (lambda m, d: filter_normalized_direction(m, bias_bn="keep"), ValueError, "Invalid bias_bn value"),
    (lambda m, d: random_direction(m.requires_grad_(False)), ValueError, "no parameters with requires_grad"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(_net(0), _images())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_landscape_function_restores_float32_weights_buffers_and_flags(mode):
    model, other = _net(0, torch.float32), _net(1, torch.float32)
    model.train()
    model[1].eval()
    data = _images(torch.float32)
    snapshot = _snapshot(model)
    interpolate(model, CE, data, other, points=3, mode=mode)
    loss_along_direction(model, CE, data, points=3, mode=mode)
    loss_surface(model, CE, data, points=3, mode=mode)
    count_local_extrema(model, CE, data, 0.5, directions=2, points=5, mode=mode)
    _assert_restored(model, snapshot)
