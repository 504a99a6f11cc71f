"""Distances D (paper §3.2.1) and their masked, area-normalised form (Eq. 4)."""

from __future__ import annotations

import math

import pytest
import torch

from magdr import metrics
from magdr.check import ShapeError
from magdr.metrics import (
    PSNR,
    SSIM,
    distance_vector,
    dssim,
    feature_cosine,
    l1,
    l2,
    linf,
    mse_to_psnr,
    psnr,
    ssim,
)

# A 1-channel 2×2 pair with differences 0.5, 1, 0.25, 0.
A = torch.zeros(1, 1, 2, 2)
B = torch.tensor([[[[0.5, -1.0], [0.25, 0.0]]]])
DIAG = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # keeps the differences 0.5 and 0


def _pair(b: int = 2, c: int = 3, h: int = 12, w: int = 12, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, c, h, w, generator=g, dtype=dtype) * 2 - 1
    return a, (a + 0.3 * torch.randn(b, c, h, w, generator=g, dtype=dtype)).clamp(-1, 1)


class TestLp:
    def test_hand_values(self):
        torch.testing.assert_close(l1(A, B), torch.tensor([1.75 / 4]))
        torch.testing.assert_close(l2(A, B), torch.tensor([(0.25 + 1 + 0.0625) / 4]))
        torch.testing.assert_close(linf(A, B), torch.tensor([1.0]))

    def test_masked_normalised_by_area(self):
        # Eq. 4: sums over the region divided by its area S_i (2 pixels here).
        torch.testing.assert_close(l1(A, B, DIAG), torch.tensor([0.5 / 2]))
        torch.testing.assert_close(l2(A, B, DIAG), torch.tensor([0.25 / 2]))
        torch.testing.assert_close(linf(A, B, DIAG), torch.tensor([0.5]))

    def test_soft_mask(self):
        soft = torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]])
        # (0.5 · 0.5) / area 0.5: a soft mask weights pixels and divides by its own mass.
        torch.testing.assert_close(l1(A, B, soft), torch.tensor([0.5]))
        torch.testing.assert_close(linf(A, B, soft), torch.tensor([0.25]))

    def test_area_counts_channels(self):
        a3, b3 = A.expand(1, 3, 2, 2), B.expand(1, 3, 2, 2)
        torch.testing.assert_close(l1(a3, b3, DIAG), l1(A, B, DIAG))
        torch.testing.assert_close(l2(a3, b3), l2(A, B))

    def test_region_size_does_not_matter(self):
        # The same per-pixel error in a small and a large region gives the same distance.
        a, b = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.2)
        small, large = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
        small[..., :2, :2], large[..., :, :6] = 1, 1
        torch.testing.assert_close(l1(a, b, small), l1(a, b, large))

    def test_batched_and_mask_broadcast(self):
        a, b = _pair(b=3)
        m = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(1))
        out = l1(a, b, m)
        assert out.shape == (3,)
        for i in range(3):
            torch.testing.assert_close(out[i : i + 1], l1(a[i : i + 1], b[i : i + 1], m))

    def test_mask_other_size_is_resized(self):
        a, b = _pair(b=1, h=8, w=8)
        ones_small = torch.ones(1, 1, 4, 4)
        torch.testing.assert_close(l2(a, b, ones_small), l2(a, b))

    def test_empty_mask_is_finite(self):
        out = l1(A, B, torch.zeros(1, 1, 2, 2))
        assert torch.isfinite(out).all() and out.item() == 0

    @pytest.mark.parametrize("fn", [l1, l2])
    def test_gradcheck(self, fn):
        a, b = _pair(b=1, c=2, h=4, w=4, dtype=torch.float64)
        a.requires_grad_(True)
        m = torch.rand(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        assert torch.autograd.gradcheck(lambda t: fn(t, b, m), (a,))

    @pytest.mark.parametrize("fn", [l1, l2, linf, psnr, ssim, dssim, feature_cosine])
    def test_shape_mismatch_raises(self, fn):
        with pytest.raises(ShapeError, match="expected equal shapes"):
            fn(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))

    @pytest.mark.parametrize("fn", [l1, l2, linf, psnr, ssim, dssim, feature_cosine])
    def test_not_4d_raises(self, fn):
        with pytest.raises(ShapeError, match="expected shape"):
            fn(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))

    def test_bad_mask_raises(self):
        with pytest.raises(ShapeError, match="mask"):
            l1(A, B, torch.ones(1, 2, 2, 2))


class TestPSNR:
    def test_hand_value(self):
        mse = (0.25 + 1 + 0.0625) / 4
        torch.testing.assert_close(psnr(A, B), torch.tensor([10 * math.log10(4 / mse)]))
        assert mse_to_psnr(0.04) == pytest.approx(20.0)

    def test_identical_is_capped(self):
        assert psnr(B, B).item() == 100.0
        assert psnr(B, B, max_db=60.0).item() == 60.0

    def test_masked(self):
        torch.testing.assert_close(psnr(A, B, DIAG), torch.tensor([10 * math.log10(4 / 0.125)]))

    def test_module_equals_function(self):
        a, b = _pair()
        torch.testing.assert_close(PSNR()(a, b), psnr(a, b))


class TestSSIM:
    def test_equal_is_one(self):
        a, _ = _pair()
        torch.testing.assert_close(ssim(a, a), torch.ones(2))
        torch.testing.assert_close(dssim(a, a), torch.zeros(2), atol=1e-6, rtol=0)

    def test_different_is_below_one_and_symmetric(self):
        a, b = _pair()
        s = ssim(a, b)
        assert s.shape == (2,) and (s < 0.99).all() and (s > -1).all()
        torch.testing.assert_close(s, ssim(b, a))
        torch.testing.assert_close(dssim(a, b), 1 - s)

    def test_more_noise_lower_ssim(self):
        g = torch.Generator().manual_seed(3)
        a = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        n = torch.randn(1, 3, 16, 16, generator=g)
        assert ssim(a, a + 0.05 * n) > ssim(a, a + 0.3 * n)

    def test_map_shape_small_images(self):
        # 4×4 is smaller than the 11-window's padding: replicate padding keeps the size.
        a, b = _pair(h=4, w=4)
        assert metrics.ssim_map(a, b).shape == a.shape

    def test_masked_region(self):
        a, b = _pair(b=1, h=16, w=16)
        b = b.clone()
        b[..., :8] = a[..., :8]  # left half equal
        m = torch.zeros(1, 1, 16, 16)
        m[..., :, 2:6] = 1  # well inside the equal half (window radius 5 is mostly inside)
        assert ssim(a, b, m) > ssim(a, b)

    def test_gradcheck(self):
        a, b = _pair(b=1, c=1, h=6, w=6, dtype=torch.float64)
        a.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: ssim(t, b), (a,))

    def test_module_equals_function(self):
        a, b = _pair()
        m = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(SSIM()(a, b, m), ssim(a, b, m))


class TestFeatureCosine:
    def test_hand_value(self):
        a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
        b = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
        torch.testing.assert_close(feature_cosine(a, b), torch.tensor([1 / math.sqrt(2)]))

    def test_mask_selects(self):
        a = torch.tensor([[[[1.0, 5.0]]]])
        b = torch.tensor([[[[2.0, -5.0]]]])
        torch.testing.assert_close(feature_cosine(a, b), torch.tensor([-23 / (26**0.5 * 29**0.5)]))
        torch.testing.assert_close(
            feature_cosine(a, b, torch.tensor([[[[1.0, 0.0]]]])), torch.tensor([1.0])
        )


class TestDistanceVector:
    def test_shape_and_columns(self):
        a, b = _pair(b=2)
        d = distance_vector(a, b)
        assert d.shape == (2, 4)
        torch.testing.assert_close(d[:, 0], l1(a, b))
        torch.testing.assert_close(d[:, 1], l2(a, b))
        torch.testing.assert_close(d[:, 2], linf(a, b))
        torch.testing.assert_close(d[:, 3], dssim(a, b))

    def test_all_grow_with_dissimilarity(self):
        a, b = _pair(b=1, h=16, w=16)
        near, far = distance_vector(a, (a + 0.1 * (b - a))), distance_vector(a, b)
        assert (far > near).all()

    def test_unknown_name_raises(self):
        with pytest.raises(ValueError, match="unknown distances.*known"):
            distance_vector(A, B, names=["l1", "l7"])


def test_ssim_map_matches_the_2d_gaussian_window():
    """The separable filtering gives Wang et al.'s 11×11 Gaussian-window SSIM, reflect borders."""
    import torch.nn.functional as F

    from magdr.metrics import ssim_map

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 20, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    t = torch.arange(11.0) - 5
    w = torch.exp(-(t**2) / (2 * 1.5**2))
    w = (w[:, None] * w[None, :]) / w.sum() ** 2

    def filt(v):
        return F.conv2d(F.pad(v, [5] * 4, mode="reflect"), w.expand(3, 1, 11, 11), groups=3)

    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    ref = num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    torch.testing.assert_close(ssim_map(a, b), ref, atol=1e-5, rtol=1e-5)
