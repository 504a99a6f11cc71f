"""Reconstruction and consistency primitives f_k^p (paper §3.2.2–3.2.3, Algorithm 1).

Each primitive is a batched function ``f(x, **params)`` over images :math:`(B, 3, H, W)` in
[-1, 1] that returns the same shape and range. They are grouped in *categories* (one
category = one family of operation with a parameter grid ``p``), which is what Rec-Net's
Algorithm 1 searches over, and which the consistency detector (Eq. 7) samples its K input
transforms from.

Differentiable ones (blur, resize, bilateral) are written in torch; the codecs and the
non-local-means denoiser go through OpenCV per image, since no exact differentiable form exists.
:func:`bpda_apply` gives every primitive a gradient for adaptive attacks (BPDA, Athalye et al.
2018): the true one when it exists, the identity (straight-through) otherwise.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magdr.check import check_images, check_same_shape


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1,1] ``[B,3,H,W]`` -> uint8 ``[B,H,W,3]`` (RGB)."""
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _from_uint8(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)).to(like.device).permute(0, 3, 1, 2)
    return t.to(like.dtype) / 127.5 - 1


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _image_pool(workers: int) -> ThreadPoolExecutor:
    """A cached pool of ``workers`` threads, per process (a forked child makes its own)."""
    key = (os.getpid(), workers)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="magdr-opencv")
    return _pools[key]


def _per_image(x: torch.Tensor, fn: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """Run an OpenCV function image by image (codecs have no batched form).

    OpenCV releases the GIL, so the images run on ``torch.get_num_threads()`` threads: one at a
    time, NL-means and JPEG took 80% of Rec-Net's time on a 16-core GPU machine. The result does
    not depend on the thread count (each image is computed alone, in order).
    """
    imgs = _to_uint8(x)
    workers = torch.get_num_threads()
    if workers > 1 and len(imgs) > 1:
        out = list(_image_pool(workers).map(fn, imgs))
    else:
        out = [fn(im) for im in imgs]
    return _from_uint8(np.stack(out), x)


def jpeg(x: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG round trip at ``quality`` (1–100); non-differentiable (Dziugaite et al. 2016)."""
    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"quality: expected 1..100, got {quality}")

    def one(im: np.ndarray) -> np.ndarray:
        ok, buf = cv2.imencode(".jpg", im[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]

    return _per_image(x, one)


def gaussian_kernel1d(sigma: float, like: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian, odd size ``2*ceil(3σ)+1`` unless given."""
    size = size or 2 * math.ceil(3 * sigma) + 1
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0, size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding; differentiable (kornia's gaussian_blur2d).

    Args:
        x: images :math:`(B, C, H, W)`.
        sigma: standard deviation in pixels (> 0).
        size: kernel size (odd); ``2*ceil(3σ)+1`` by default (Ruiz et al. use σ=1.5, size 11).
    """
    if sigma <= 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")
    k = gaussian_kernel1d(sigma, x, size)
    c, pad = x.shape[1], k.numel() // 2
    mode = "reflect" if min(x.shape[2:]) > pad else "replicate"
    h = F.conv2d(
        F.pad(x, [pad, pad, 0, 0], mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c
    )
    return F.conv2d(
        F.pad(h, [0, 0, pad, pad], mode=mode), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c
    )


def lowpass_edit(y: torch.Tensor, base: torch.Tensor, sigma: float) -> torch.Tensor:
    """``base`` plus the edit ``y - base`` low-passed by a Gaussian of ``sigma``.

    That is the edit's colour and shape on ``base``'s own detail.
    Not a reconstruction primitive: the daemon pastes this back instead of G's pixels, since a
    small G's transposed convolutions leave a checkerboard on faces unlike its training set
    (period 2–4 px, gone at σ ≈ 1–1.5), while the edits it is asked for (hair colour, age,
    gender) live in the low frequencies.

    Args:
        y: G's outputs :math:`(B, 3, H, W)` in [-1, 1].
        base: the inputs G was given (the cleaned x* for a reconstructed face), same shape.
        sigma: standard deviation in pixels (> 0).

    Returns:
        :math:`(B, 3, H, W)` in [-1, 1].
    """
    check_images(y, "y")
    check_images(base, "base")
    check_same_shape(y, base, "y, base")
    return (base + gaussian_blur(y - base, sigma)).clamp(-1.0, 1.0)


def _median_of_3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _median3x3(x: torch.Tensor) -> torch.Tensor:
    """The 3×3 median from sorted columns, exactly, without sorting nine values per pixel.

    Sort each vertical triple; the window's median is then the median of (the largest low,
    the median of the middles, the smallest high) over its three columns. ~10× faster on the
    CPU than the unfold-and-sort of other sizes; the detector runs it on every face as its
    reference transform.
    """
    xp = F.pad(x, [1, 1, 1, 1], mode="replicate")
    up, mid, down = xp[..., :-2, :], xp[..., 1:-1, :], xp[..., 2:, :]
    lo = torch.minimum(torch.minimum(up, mid), down)
    hi = torch.maximum(torch.maximum(up, mid), down)
    me = _median_of_3(up, mid, down)

    def cols(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return t[..., :-2], t[..., 1:-1], t[..., 2:]

    l0, l1, l2 = cols(lo)
    h0, h1, h2 = cols(hi)
    largest_low = torch.maximum(torch.maximum(l0, l1), l2)
    smallest_high = torch.minimum(torch.minimum(h0, h1), h2)
    return _median_of_3(largest_low, _median_of_3(*cols(me)), smallest_high)


def median(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Median filter with a ``k×k`` window (odd), replicate padding.

    Treated as non-differentiable: its gradient reaches one pixel per window.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"k: expected an odd size >= 1, got {k}")
    if k == 1:
        return x.clone()
    if k == 3:
        return _median3x3(x)
    b, c, h, w = x.shape
    p = k // 2
    patches = F.unfold(F.pad(x, [p] * 4, mode="replicate"), k)  # [B, C*k*k, H*W]
    return patches.view(b, c, k * k, h * w).median(dim=2).values.view(b, c, h, w)


def bilateral(
    x: torch.Tensor, sigma_color: float = 0.1, sigma_space: float = 1.5, size: int = 5
) -> torch.Tensor:
    """Edge-preserving bilateral filter, batched and differentiable (Tomasi & Manduchi 1998).

    Args:
        x: images :math:`(B, C, H, W)` in [-1, 1].
        sigma_color: range σ on the [-1, 1] scale (0.1 ≈ 13 grey levels).
        sigma_space: spatial σ in pixels.
        size: odd window size.
    """
    b, c, h, w = x.shape
    p = size // 2
    patches = F.unfold(F.pad(x, [p] * 4, mode="replicate"), size).view(b, c, size * size, h * w)
    center = x.reshape(b, c, 1, h * w)
    yy, xx = torch.meshgrid(
        torch.arange(size, device=x.device) - p,
        torch.arange(size, device=x.device) - p,
        indexing="ij",
    )
    spatial = torch.exp(-(yy**2 + xx**2).to(x.dtype) / (2 * sigma_space**2)).view(1, 1, -1, 1)
    rng = torch.exp(-((patches - center) ** 2).sum(1, keepdim=True) / (2 * sigma_color**2))
    wgt = spatial * rng
    out = (patches * wgt).sum(2) / wgt.sum(2).clamp_min(1e-8)
    return out.view(b, c, h, w)


def nl_means(x: torch.Tensor, h: float = 5.0) -> torch.Tensor:
    """Non-local means denoising (Buades et al. 2005, OpenCV's fast colour version).

    ``h`` is the filter strength in grey levels (0–255 scale); non-differentiable.
    """
    return _per_image(x, lambda im: cv2.fastNlMeansDenoisingColored(im, None, h, h, 5, 11))


def bitdepth(x: torch.Tensor, bits: int = 5) -> torch.Tensor:
    """Reduce each channel to ``bits`` bits (feature squeezing, Xu et al. 2018).

    Non-differentiable (a staircase).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: expected 1..8, got {bits}")
    levels = 2**bits - 1
    return torch.round((x.clamp(-1, 1) + 1) / 2 * levels) / levels * 2 - 1


def resize(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Down-up resize: bilinear (antialiased) to ``scale`` of the size and back; differentiable."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale: expected (0, 1], got {scale}")
    h, w = x.shape[2:]
    small = F.interpolate(
        x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
        align_corners=False, antialias=True,
    )  # fmt: skip
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


_purifiers: dict[tuple[str, str], nn.Module] = {}
_purifiers_lock = threading.Lock()


def purifier(x: torch.Tensor, path: str = "default") -> torch.Tensor:
    """The learned purifier P of :mod:`magdr.purifier`: a checkpoint, or the shipped one.

    Differentiable: adaptive attacks get its true gradient. As a consistency transform (Eq. 7)
    it is the sharpest test the detector has: P leaves a clean face as it is, so G's output
    barely moves, and undoes a disruption, so G's output moves far. A perturbation smooth
    enough to pass the 3×3 median (one made through the daemon's resampling of frames) still
    moves G's output under P by 5× as much as on the most moved clean face. Each checkpoint is
    loaded once per device and kept.
    """
    key = (str(path), str(x.device))
    with _purifiers_lock:
        if key not in _purifiers:
            from magdr.purifier import load_purifier

            # Loaded as normal tensors even when the first call comes under inference mode:
            # an adaptive attack later differentiates through the same cached P.
            with torch.inference_mode(False):
                _purifiers[key] = load_purifier(path, x.device).requires_grad_(False)
    P = _purifiers[key]
    return P(x.to(P.head.weight.dtype)).to(x.dtype)


@dataclass(frozen=True)
class Transform:
    """One category of primitive f_k with its parameter grid p (Algorithm 1's B_i entries)."""

    name: str
    fn: Callable[..., torch.Tensor]
    differentiable: bool
    grid: list[dict[str, Any]] = field(default_factory=list)

    @property
    def category(self) -> str:
        """Algorithm 1 ranks categories; here each registered transform is one category."""
        return self.name

    def __call__(self, x: torch.Tensor, **params: Any) -> torch.Tensor:
        """Apply to images :math:`(B, 3, H, W)` in [-1, 1]; the result is clamped to [-1, 1]."""
        check_images(x)
        return self.fn(x, **params).clamp(-1, 1)


REGISTRY: dict[str, Transform] = {
    t.name: t
    for t in [
        Transform("jpeg", jpeg, False, [{"quality": q} for q in (95, 85, 75, 60, 45)]),
        Transform(
            "gaussian_blur", gaussian_blur, True, [{"sigma": s} for s in (0.5, 0.8, 1.1, 1.5)]
        ),
        Transform("median", median, False, [{"k": k} for k in (3, 5)]),
        Transform(
            "bilateral",
            bilateral,
            True,
            [{"sigma_color": sc, "sigma_space": 1.5} for sc in (0.05, 0.1, 0.2, 0.4)],
        ),  # fmt: skip
        Transform("nl_means", nl_means, False, [{"h": h} for h in (3.0, 6.0, 10.0)]),
        Transform("bitdepth", bitdepth, False, [{"bits": b} for b in (6, 5, 4)]),
        Transform("resize", resize, True, [{"scale": s} for s in (0.85, 0.7, 0.5)]),
        Transform("purifier", purifier, True, [{"path": "default"}]),
    ]
}


def get(name: str) -> Transform:
    """The registered transform ``name``; ``KeyError`` lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown transform {name!r}; known: {sorted(REGISTRY)}") from None


def apply(name: str, x: torch.Tensor, **params: Any) -> torch.Tensor:
    """Apply the registered transform ``name`` with ``params`` to ``x``."""
    return get(name)(x, **params)


class _StraightThrough(torch.autograd.Function):
    """Forward: the given (non-differentiable) result; backward: identity (BPDA)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def bpda_apply(name: str, x: torch.Tensor, **params: Any) -> torch.Tensor:
    """Apply ``name`` with a usable gradient: the true one, or straight-through (BPDA)."""
    t = get(name)
    if t.differentiable:
        return t(x, **params)
    with torch.no_grad():
        y = t(x, **params)
    return _StraightThrough.apply(x, y)


def apply_chain(
    x: torch.Tensor,
    chain: list[dict[str, Any]],
    mask: torch.Tensor | None = None,
    differentiable: bool = False,
) -> torch.Tensor:
    """Apply ``[{"name", "params"}, …]`` in order, each blended in through a soft ``mask``.

    Args:
        x: images :math:`(B, 3, H, W)`.
        chain: the transforms, in order.
        mask: :math:`(B, 1, H, W)` in [0, 1]; the transform acts where it is 1 (region patches
            of Rec-Net) and leaves the image where it is 0. ``None`` means everywhere.
        differentiable: BPDA through the steps without a gradient (:func:`bpda_apply`), for an
            attacker who replays the chain a search chose.
    """
    f = bpda_apply if differentiable else apply
    for step in chain:
        y = f(step["name"], x, **step.get("params", {}))
        x = y if mask is None else mask * y + (1 - mask) * x
    return x


class ImageTransform(nn.Module):
    """Module form of one registered transform with fixed parameters (BPDA gradients)."""

    def __init__(self, name: str, **params: Any) -> None:
        super().__init__()
        get(name)
        self.name, self.params = name, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return bpda_apply(self.name, x, **self.params)
