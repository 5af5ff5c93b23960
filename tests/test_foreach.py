"""The grouped foreach helpers against plain per-tensor references (mixed dtypes included)."""

from __future__ import annotations

import torch

from sharpness._foreach import dot, group_by_device_dtype, squared_norm


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g, dtype=torch.float64),
            torch.randn(2, 2, generator=g).to(torch.bfloat16), torch.randn(7, generator=g)]


def test_grouping_keeps_pairs_together_and_splits_by_dtype():
    xs = _tensors()
    ys = [x * 2 for x in xs]
    buckets = group_by_device_dtype(xs, ys)
    assert sorted(len(b[0]) for b in buckets) == [1, 1, 2]
    for bx, by in buckets:
        assert len({t.dtype for t in bx}) == 1
        for x, y in zip(bx, by):
            assert y.dtype == x.dtype and torch.equal(y, x * 2)
    single = group_by_device_dtype(xs[:1] + xs[3:], ys[:1] + ys[3:])  # one dtype: the fast path
    assert len(single) == 1 and single[0][0][1] is xs[3]


def test_squared_norm_and_dot_match_float64_references():
    xs = _tensors()
    ys = [torch.ones_like(x) for x in xs]
    ref_sq = sum(float(x.double().square().sum()) for x in xs)
    ref_dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(xs, ys))
    assert abs(float(squared_norm(xs)) - ref_sq) <= 1e-5 * ref_sq
    assert abs(float(dot(xs, ys)) - ref_dot) <= 1e-5 * max(1.0, abs(ref_dot))
    assert float(squared_norm([])) == 0.0 and float(dot([], [])) == 0.0
