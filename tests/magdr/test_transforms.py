"""Reconstruction / consistency primitives f_k^p, their registry and BPDA (paper §3.2.2–3.2.3)."""

from __future__ import annotations

import threading

import pytest
import torch

from magdr import transforms
from magdr.check import ShapeError
from magdr.transforms import (
    REGISTRY,
    ImageTransform,
    apply,
    apply_chain,
    bilateral,
    bitdepth,
    bpda_apply,
    gaussian_blur,
    get,
    jpeg,
    median,
    nl_means,
    resize,
)

ALL = [(name, params) for name, t in REGISTRY.items() for params in t.grid]
NON_DIFFERENTIABLE = ["jpeg", "median", "bitdepth", "nl_means"]


def _images(b: int = 2, size: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g, dtype=dtype) * 2 - 1


def _smooth(b: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, 3, 3, generator=g) * 1.6 - 0.8
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")


class TestRegistry:
    def test_expected_categories(self):
        assert set(REGISTRY) == {
            "jpeg", "gaussian_blur", "median", "bilateral", "nl_means", "bitdepth", "resize",
            "purifier",
        }  # fmt: skip
        for name, t in REGISTRY.items():
            assert t.category == name and t.grid, name
        assert {n for n, t in REGISTRY.items() if not t.differentiable} == set(NON_DIFFERENTIABLE)

    @pytest.mark.parametrize(("name", "params"), ALL, ids=[f"{n}-{p}" for n, p in ALL])
    def test_keeps_shape_range_dtype(self, name, params):
        x = _images()
        y = apply(name, x, **params)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= -1 and y.max() <= 1
        assert torch.isfinite(y).all()

    @pytest.mark.parametrize("name", list(REGISTRY))
    def test_float64_and_odd_size(self, name):
        x = _images(b=1, size=15, dtype=torch.float64)
        y = apply(name, x, **REGISTRY[name].grid[0])
        assert y.shape == x.shape and y.dtype == torch.float64

    @pytest.mark.parametrize("name", list(REGISTRY))
    def test_batched_equals_per_item(self, name):
        x = _images(b=3)
        p = REGISTRY[name].grid[-1]
        y = apply(name, x, **p)
        for i in range(3):
            torch.testing.assert_close(y[i : i + 1], apply(name, x[i : i + 1], **p))

    @pytest.mark.parametrize("name", ["jpeg", "nl_means"])
    def test_threads_do_not_change_the_result(self, name):
        # OpenCV primitives run per image on torch.get_num_threads() threads (the suite runs
        # with 1): the same bits in the same order whatever the count.
        x = _images(b=5, size=24)
        p = REGISTRY[name].grid[-1]
        one = apply(name, x, **p)
        n = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            three = apply(name, x, **p)
            assert any(t.name.startswith("magdr-opencv") for t in threading.enumerate())
        finally:
            torch.set_num_threads(n)
        assert torch.equal(one, three)

    def test_unknown_name_lists_known(self):
        with pytest.raises(KeyError, match=r"unknown transform 'sharpen'.*bilateral.*jpeg"):
            get("sharpen")
        with pytest.raises(KeyError, match="known"):
            apply("sharpen", _images())
        with pytest.raises(KeyError, match="known"):
            apply_chain(_images(), [{"name": "sharpen", "params": {}}])
        with pytest.raises(KeyError, match="known"):
            ImageTransform("sharpen")

    def test_not_images_raises(self):
        with pytest.raises(ShapeError):
            apply("gaussian_blur", torch.zeros(1, 1, 8, 8))
        with pytest.raises(TypeError, match="floating point"):
            apply("jpeg", torch.zeros(1, 3, 8, 8, dtype=torch.uint8))

    @pytest.mark.parametrize(
        ("fn", "kw"),
        [
            (jpeg, {"quality": 0}),
            (jpeg, {"quality": 101}),
            (gaussian_blur, {"sigma": 0.0}),
            (median, {"k": 4}),
            (median, {"k": 0}),
            (bitdepth, {"bits": 0}),
            (bitdepth, {"bits": 9}),
            (resize, {"scale": 0.0}),
            (resize, {"scale": 1.5}),
        ],
    )
    def test_bad_params_raise(self, fn, kw):
        with pytest.raises(ValueError, match="expected"):
            fn(_images(b=1, size=8), **kw)


class TestIdentityish:
    """Parameters at the mild end change a smooth image by little (mean absolute change).

    JPEG is judged on the mean: even at quality 100 its 4:2:0 chroma subsampling moves single
    pixels of a 16-pixel colour gradient by up to ~0.19.
    """

    @pytest.mark.parametrize(
        ("name", "params", "tol"),
        [
            ("jpeg", {"quality": 100}, 0.025),
            ("gaussian_blur", {"sigma": 0.3}, 0.02),
            ("median", {"k": 1}, 0.0),
            ("bilateral", {"sigma_color": 0.02, "sigma_space": 0.5}, 0.02),
            ("nl_means", {"h": 1.0}, 0.01),
            ("bitdepth", {"bits": 8}, 1 / 255 + 1e-6),
            ("resize", {"scale": 1.0}, 1e-6),
        ],
    )
    def test_mild_changes_little(self, name, params, tol):
        x = _smooth()
        assert (apply(name, x, **params) - x).abs().mean() <= tol

    @pytest.mark.parametrize(
        ("name", "mild", "strong"),
        [
            ("jpeg", {"quality": 95}, {"quality": 10}),
            ("gaussian_blur", {"sigma": 0.5}, {"sigma": 2.0}),
            ("median", {"k": 3}, {"k": 5}),
            ("bitdepth", {"bits": 6}, {"bits": 2}),
            ("resize", {"scale": 0.85}, {"scale": 0.3}),
        ],
    )
    def test_stronger_changes_more(self, name, mild, strong):
        x = _images()
        d_mild = (apply(name, x, **mild) - x).abs().mean()
        d_strong = (apply(name, x, **strong) - x).abs().mean()
        assert d_strong > d_mild > 0


class TestKnownValues:
    def test_bitdepth_levels(self):
        x = torch.linspace(-1, 1, 3 * 4 * 4).view(1, 3, 4, 4)
        assert set(bitdepth(x, 1).unique().tolist()) == {-1.0, 1.0}
        levels = bitdepth(x, 2).unique()
        torch.testing.assert_close(levels, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
        # 0.1 -> (1.1 / 2) * 3 = 1.65 -> level 2 -> 2/3 * 2 - 1 = 1/3.
        torch.testing.assert_close(
            bitdepth(torch.full((1, 3, 1, 1), 0.1), 2), torch.full((1, 3, 1, 1), 1 / 3)
        )

    def test_median_hand_patch(self):
        patch = torch.tensor([[0.9, -0.2, 0.4], [0.1, 1.0, -0.9], [0.3, -0.5, 0.0]])
        x = patch.expand(1, 3, 3, 3).contiguous()
        y = median(x, 3)
        # The centre's window is the whole patch: sorted -0.9 -0.5 -0.2 0 [0.1] 0.3 0.4 0.9 1.
        torch.testing.assert_close(y[0, :, 1, 1], torch.full((3,), 0.1))
        # The corner (0, 0) with replicate padding sees 0.9 ×4, -0.2 ×2, 0.1 ×2, 1.0: median 0.9.
        torch.testing.assert_close(y[0, :, 0, 0], torch.full((3,), 0.9))

    @pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 1, 1, 1), (1, 3, 2, 9), (3, 3, 32, 32)])
    def test_median3_equals_sorting_every_window(self, shape):
        # k=3 takes the sorted-columns shortcut; it must equal the unfold-and-sort of other k
        g = torch.Generator().manual_seed(0)
        x = torch.rand(*shape, generator=g)
        for t in (x, (x * 4).round() / 4):  # with ties
            padded = torch.nn.functional.pad(t, [1] * 4, mode="replicate")
            windows = torch.nn.functional.unfold(padded, 3).view(shape[0], shape[1], 9, -1)
            want = windows.median(dim=2).values.view(shape)
            assert torch.equal(median(t, 3), want)

    def test_median_removes_impulse(self):
        x = torch.zeros(1, 3, 8, 8)
        x[..., 4, 4] = 1.0
        assert median(x, 3).abs().max() == 0

    @pytest.mark.parametrize("fn", [gaussian_blur, resize, bilateral, nl_means])
    def test_constant_image_preserved(self, fn):
        x = torch.full((2, 3, 16, 16), 0.2)
        tol = 1 / 127.5 if fn is nl_means else 1e-6  # the codec path rounds to 8 bits
        torch.testing.assert_close(fn(x), x, atol=tol, rtol=0)

    def test_gaussian_blur_kernel(self):
        k = transforms.gaussian_kernel1d(1.0, torch.zeros(1))
        assert k.numel() == 7 and torch.isclose(k.sum(), torch.tensor(1.0))
        torch.testing.assert_close(k, k.flip(0))
        # An impulse spreads as the outer product of the 1-D kernel.
        x = torch.zeros(1, 3, 15, 15)
        x[..., 7, 7] = 1.0
        y = gaussian_blur(x, 1.0)
        torch.testing.assert_close(y[0, 0, 4:11, 4:11], k[:, None] * k[None, :])

    def test_lowpass_edit_keeps_a_smooth_edit_and_drops_a_checkerboard(self):
        g = torch.Generator().manual_seed(0)
        base = torch.rand(2, 3, 32, 32, generator=g) * 1.6 - 0.8
        smooth = 0.1 * torch.linspace(-1, 1, 32).expand(2, 3, 32, 32)  # an edit's colour ramp
        checker = 0.1 * (torch.arange(32)[:, None] + torch.arange(32)[None]).remainder(2) * 2 - 0.1
        out = transforms.lowpass_edit(base + smooth + checker, base, 1.5)
        inner = (..., slice(4, -4), slice(4, -4))  # reflect padding bends the ramp at the border
        torch.testing.assert_close(out[inner], (base + smooth)[inner], atol=2e-3, rtol=0)
        with pytest.raises(ShapeError):
            transforms.lowpass_edit(base, base[:, :, :16], 1.5)

    def test_bilateral_preserves_edges(self):
        x = torch.full((1, 3, 16, 16), -0.8)
        x[..., 8:] = 0.8
        edge_bil = (bilateral(x, sigma_color=0.1) - x).abs().max()
        edge_blur = (gaussian_blur(x, 1.5) - x).abs().max()
        assert edge_bil < 1e-3 < edge_blur

    def test_nl_means_denoises(self):
        g = torch.Generator().manual_seed(5)
        clean = torch.full((1, 3, 24, 24), 0.1)
        noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
        assert (nl_means(noisy, 10.0) - clean).abs().mean() < (noisy - clean).abs().mean() / 2

    def test_jpeg_is_lossy(self):
        x = _images()
        assert 0 < (jpeg(x, 45) - x).abs().mean() < 0.5


class TestBPDA:
    @pytest.mark.parametrize("name", NON_DIFFERENTIABLE)
    def test_identity_gradient(self, name):
        x = _images(b=1).mul(0.8).requires_grad_(True)
        p = REGISTRY[name].grid[0]
        y = bpda_apply(name, x, **p)
        torch.testing.assert_close(y.detach(), apply(name, x.detach(), **p))
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad((y * w).sum(), x)
        torch.testing.assert_close(grad, w)

    @pytest.mark.parametrize(
        ("name", "params"),
        [
            ("gaussian_blur", {"sigma": 0.8}),
            ("bilateral", {"sigma_color": 0.4, "sigma_space": 1.0, "size": 3}),
            ("resize", {"scale": 0.5}),
        ],
    )
    def test_true_gradient(self, name, params):
        # Inside (-0.5, 0.5) the output is never clamped, so the gradient is the function's own.
        x = (_images(b=1, size=6, dtype=torch.float64) * 0.5).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: bpda_apply(name, t, **params), (x,))
        # ... and not the straight-through one.
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
        (grad,) = torch.autograd.grad((bpda_apply(name, x, **params) * w).sum(), x)
        assert not torch.allclose(grad, w, atol=1e-3)

    def test_module_equals_function(self):
        x = _images(b=2).requires_grad_(True)
        m = ImageTransform("jpeg", quality=60)
        torch.testing.assert_close(m(x), bpda_apply("jpeg", x, quality=60))
        assert m(x).requires_grad


class TestApplyChain:
    def test_chain_in_order(self):
        x = _images()
        chain = [
            {"name": "gaussian_blur", "params": {"sigma": 1.0}},
            {"name": "bitdepth", "params": {"bits": 3}},
        ]
        torch.testing.assert_close(apply_chain(x, chain), bitdepth(gaussian_blur(x, 1.0), 3))
        # Order matters (median and bitdepth would commute: both are monotone).
        assert not torch.equal(apply_chain(x, chain), gaussian_blur(bitdepth(x, 3), 1.0))

    def test_empty_chain_is_identity(self):
        x = _images()
        assert torch.equal(apply_chain(x, []), x)

    def test_mask_leaves_outside_untouched(self):
        x = _images()
        mask = torch.zeros(2, 1, 16, 16)
        mask[..., 4:12, 4:12] = 1.0
        chain = [
            {"name": "gaussian_blur", "params": {"sigma": 1.5}},
            {"name": "jpeg", "params": {"quality": 45}},
        ]
        y = apply_chain(x, chain, mask)
        outside = (mask == 0).expand_as(x)
        assert torch.equal(y[outside], x[outside])
        assert not torch.equal(y[~outside], x[~outside])

    def test_soft_mask_blends(self):
        x = _images(b=1)
        chain = [{"name": "bitdepth", "params": {"bits": 2}}]
        half = torch.full((1, 1, 16, 16), 0.5)
        torch.testing.assert_close(apply_chain(x, chain, half), 0.5 * bitdepth(x, 2) + 0.5 * x)
