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


def test_list_ops_single_tensor_path_matches_the_fused_path():
    """Every list op of sharpness._foreach gives bit-identical results in both modes, over mixed dtypes."""
    from sharpness import _foreach as fe

    g = torch.Generator().manual_seed(0)

    def tensors():
        return [torch.randn(3, 4, generator=g).double(), torch.randn(5, generator=g), torch.randn(2, 2, generator=g)]

    a, b, c = tensors(), tensors(), tensors()
    scale = torch.tensor(0.37, dtype=torch.float64)
    results = []
    for enabled in (True, False):
        with fe.foreach_mode(enabled):
            assert fe.foreach_enabled() is enabled
            outs = [t.clone() for t in a]
            for bucket_out, bucket_b, bucket_c in fe.group_by_device_dtype(outs, b, c):
                fe.mul_(bucket_out, scale.to(bucket_out[0].dtype))
                fe.add_(bucket_out, bucket_b, alpha=-0.5)
                fe.add_(bucket_out, 0.25)
                fe.addcmul_(bucket_out, bucket_b, bucket_c, 0.3)
                fe.addcmul_(bucket_out, bucket_c, [scale.to(bucket_c[0].dtype)] * len(bucket_c))
                fe.abs_(bucket_out)
                fe.mul_(bucket_out, bucket_c)
            copies = [torch.empty_like(t) for t in outs]
            fe.copy_(copies, outs)
            results.append((copies, fe.squared_norm(outs), fe.dot(outs, b)))
    (fused, n1, d1), (single, n2, d2) = results
    assert all(torch.equal(u, v) for u, v in zip(fused, single))
    torch.testing.assert_close(n1, n2, rtol=1e-6, atol=0)
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)
    expected = [((t * 0.37 - 0.5 * u + 0.25 + 0.3 * u * v + 0.37 * v).abs() * v) for t, u, v in zip(a, b, c)]
    for out, ref in zip(fused, expected):
        torch.testing.assert_close(out, ref.to(out.dtype))
    assert fe.foreach_enabled() is True  # the context restores the default


def test_scaled_copy_on_both_read_paths_equals_the_product(monkeypatch):
    """``dst <- scale * src``: a number and a CPU tensor (read, one pass) and the device path (a 0-d factor, no
    read; forced on the CPU) all equal ``src * scale``, in both foreach modes."""
    from sharpness import _foreach as fe

    g = torch.Generator().manual_seed(1)
    src = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)]
    for device_path in (False, True):
        monkeypatch.setattr(fe, "host_read_is_free", lambda tensor, free=not device_path: free)
        for enabled in (True, False):
            for scale in (0.3, torch.tensor(-1.7, dtype=torch.float64), torch.tensor(2.5)):
                dst = [torch.full_like(t, float("nan")) for t in src]
                with fe.foreach_mode(enabled):
                    fe.scaled_copy_(dst, src, scale)
                for out, s in zip(dst, src):
                    torch.testing.assert_close(out, s * float(scale), rtol=1e-7, atol=0)


def test_dot_by_polarization_on_the_device_path_matches_float64(monkeypatch):
    """With scratch on the device path (forced on the CPU), <x, y> from two fused norms: float32 within the dots'
    own rounding of a float64 reference, for nearly parallel (LookSAM's g, g_s) and orthogonal pairs; a bf16
    bucket still takes per-tensor dots in float32."""
    from sharpness import _foreach as fe

    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(40, 30, generator=g), torch.randn(30, generator=g), torch.randn(7, 5, generator=g)]
    parallel = [x + 1e-3 * torch.randn(x.shape, generator=g) for x in xs]
    orthogonal = [torch.randn(x.shape, generator=g) for x in xs]
    monkeypatch.setattr(fe, "host_read_is_free", lambda tensor: False)
    for ys in (parallel, orthogonal):
        reference = sum(float((x.double() * y.double()).sum()) for x, y in zip(xs, ys))
        scale = sum(float(x.double().square().sum()) for x in xs)  # ~ ||x|| ||y||
        scratch = [torch.zeros_like(x) for x in xs]
        value = fe.dot(xs, ys, scratch=scratch)
        per_tensor = fe.dot(xs, ys)
        assert abs(float(value) - reference) <= 1e-6 * scale
        assert abs(float(per_tensor) - reference) <= 1e-6 * scale
        assert any(float(s.abs().sum()) > 0 for s in scratch)  # the scratch was used (and overwritten)
    low = [x.to(torch.bfloat16) for x in xs]
    reference = sum(float((x.double() * y.double()).sum()) for x, y in zip(low, low))
    assert abs(float(fe.dot(low, low, scratch=[torch.zeros_like(x) for x in low])) - reference) <= 1e-5 * reference


def test_lerp_in_both_modes_equals_the_convex_combination():
    from sharpness import _foreach as fe

    g = torch.Generator().manual_seed(3)
    a = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    b = [torch.randn_like(t) for t in a]
    for enabled in (True, False):
        out = [t.clone() for t in a]
        with fe.foreach_mode(enabled):
            fe.lerp_(out, b, 0.3)
        for o, x, y in zip(out, a, b):
            torch.testing.assert_close(o, 0.7 * x + 0.3 * y, rtol=1e-14, atol=1e-15)
