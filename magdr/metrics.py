"""Distances D between image pairs, batched and mask-aware (paper §3.2.1, Eq. 4).

Every function takes ``a, b`` of shape :math:`(B, C, H, W)` (images in [-1, 1], or feature maps)
and an optional soft ``mask`` :math:`(B, 1, H, W)` in [0, 1], and returns one value per item,
:math:`(B,)`. With a mask, sums run over the masked pixels and are divided by the mask's area
S_i, as Eq. 4 normalises the region distance by the number of pixels of the region, so that a
small region (the eyes) and a large one (the background) are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from magdr.check import check_same_shape, check_shape

#: The images' dynamic range: [-1, 1] spans 2.
DATA_RANGE = 2.0
_EPS = 1e-8


def _mask_like(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(a[:, :1])
    check_shape(mask, ["B", "1", "H", "W"], "mask")
    if mask.shape[0] != a.shape[0] or mask.shape[2:] != a.shape[2:]:
        mask = F.interpolate(mask, size=a.shape[2:], mode="bilinear", align_corners=False)
        mask = mask.expand(a.shape[0], -1, -1, -1)
    return mask.to(a)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    check_shape(a, ["B", "C", "H", "W"], "a")
    check_same_shape(a, b)


def _masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``v`` :math:`(B, C, H, W)` over the mask, divided by area S_i (Eq. 4)."""
    area = mask.sum(dim=(1, 2, 3)) * v.shape[1]
    return (v * mask).sum(dim=(1, 2, 3)) / area.clamp_min(_EPS)


def l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference over the (masked) pixels, :math:`(B,)`.

    Example:
        >>> l1(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2))
        tensor([1.])
    """
    _check_pair(a, b)
    return _masked_mean((a - b).abs(), _mask_like(a, mask))


def l2(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference (MSE) over the (masked) pixels, :math:`(B,)`."""
    _check_pair(a, b)
    return _masked_mean((a - b).square(), _mask_like(a, mask))


def linf(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Largest absolute difference, each pixel weighted by its soft mask value, :math:`(B,)`."""
    _check_pair(a, b)
    return ((a - b).abs() * _mask_like(a, mask)).flatten(1).amax(1)


def psnr(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, max_db: float = 100.0
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for [-1, 1] images, from the (masked) MSE, :math:`(B,)`.

    Identical images give ``max_db`` instead of infinity.
    """
    # Floor the MSE at the value whose PSNR is max_db (a fixed epsilon would cap lower).
    mse = l2(a, b, mask).clamp_min(DATA_RANGE**2 * 10 ** (-max_db / 10))
    return (10 * torch.log10(DATA_RANGE**2 / mse)).clamp(max=max_db)


def _gaussian_taps(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(
    a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004; Gaussian window 11, σ 1.5), :math:`(B, C, H, W)`.

    Borders are reflect-padded so the map has the input's size (masks then apply pixelwise).
    The five local moments are filtered in one padded stack with the Gaussian's two 1-D passes
    (the 2-D window is their outer product: the same numbers at 2·11 instead of 11² taps).
    """
    _check_pair(a, b)
    c = a.shape[1]
    g = _gaussian_taps(window, sigma, a)
    pad = window // 2
    mode = "reflect" if min(a.shape[2:]) > pad else "replicate"
    stack = F.pad(torch.cat([a, b, a * a, b * b, a * b], 1), [pad] * 4, mode=mode)
    k = 5 * c
    stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(k, 1, 1, window), groups=k)
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(k, 1, window, 1), groups=k)
    mu_a, mu_b, e_aa, e_bb, e_ab = stack.split(c, dim=1)
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov = e_ab - mu_a * mu_b
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Structural similarity averaged over the (masked) pixels, :math:`(B,)`; 1 when equal."""
    return _masked_mean(ssim_map(a, b), _mask_like(a, mask))


def dssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM as a distance, ``1 - SSIM``, :math:`(B,)`."""
    return 1.0 - ssim(a, b, mask)


def feature_cosine(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine similarity of (masked) feature maps Φ_l, flattened per item, :math:`(B,)`."""
    _check_pair(a, b)
    m = _mask_like(a, mask)
    return F.cosine_similarity((a * m).flatten(1), (b * m).flatten(1), dim=1, eps=_EPS)


#: Distances usable in the detectors' vector D (all grow with dissimilarity).
DISTANCES: dict[str, Callable[..., torch.Tensor]] = {
    "l1": l1,
    "l2": l2,
    "linf": linf,
    "dssim": dssim,
}


#: Per-pixel form of each detector distance and how a region reduces it: a masked mean over
#: the region's area (Eq. 4) or a mask-weighted maximum.
PIXEL_MAPS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]] = {
    "l1": (lambda a, b: (a - b).abs(), "mean"),
    "l2": (lambda a, b: (a - b).square(), "mean"),
    "linf": (lambda a, b: (a - b).abs(), "max"),
    "dssim": (lambda a, b: 1.0 - ssim_map(a, b), "mean"),
}


def region_distance_matrix(
    a: torch.Tensor,
    b: torch.Tensor,
    masks: torch.Tensor,
    names: tuple[str, ...] | list[str] = ("l1", "l2", "linf", "dssim"),
) -> torch.Tensor:
    """D(M_i∘a, M_i∘b) / S_i for every region M_i at once (Eq. 4), :math:`(B, N, M)`.

    Each per-pixel map (|a−b|, (a−b)², 1−SSIM) is computed once and reduced per region, so N
    regions cost one SSIM, not N. Equals stacking :func:`distance_vector` over the regions.

    Args:
        a: images :math:`(B, C, H, W)`.
        b: images, same shape.
        masks: soft regions :math:`(B, N, H, W)` in [0, 1].
        names: the distances (keys of :data:`PIXEL_MAPS`).

    Example:
        >>> m = torch.ones(1, 2, 4, 4); m[:, 1, :2] = 0
        >>> region_distance_matrix(torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), m, ["l1"])
        tensor([[[1.],
                 [1.]]])
    """
    _check_pair(a, b)
    check_shape(masks, [str(a.shape[0]), "N", str(a.shape[2]), str(a.shape[3])], "masks")
    unknown = [n for n in names if n not in PIXEL_MAPS]
    if unknown:
        raise ValueError(f"unknown distances {unknown}; known: {list(PIXEL_MAPS)}")
    masks = masks.to(a)
    area = masks.sum(dim=(2, 3)).clamp_min(_EPS)  # [B, N]
    cols = []
    for name in names:
        pixel_map, reduce = PIXEL_MAPS[name]
        v = pixel_map(a, b)
        if reduce == "mean":  # channel mean, then the region's masked mean (= /(S_i·C) of the sum)
            cols.append(torch.einsum("bnhw,bhw->bn", masks, v.mean(1)) / area)
        else:
            cols.append((masks * v.amax(1, keepdim=True)).flatten(2).amax(2))
    return torch.stack(cols, dim=2)


def distance_vector(
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor | None = None,
    names: tuple[str, ...] | list[str] = ("l1", "l2", "linf", "dssim"),
) -> torch.Tensor:
    """The distance vector D(a, b) of the named distances, :math:`(B, M)` (Eq. 4's numerator / S_i).

    Example:
        >>> distance_vector(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 4])
    """
    _check_pair(a, b)
    return region_distance_matrix(a, b, _mask_like(a, mask), names)[:, 0]


class PSNR(nn.Module):
    """Module form of :func:`psnr`."""

    def forward(  # noqa: D102
        self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return psnr(a, b, mask)


class SSIM(nn.Module):
    """Module form of :func:`ssim`."""

    def forward(  # noqa: D102
        self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return ssim(a, b, mask)


def mse_to_psnr(mse: float) -> float:
    """PSNR in dB of a [-1, 1] image pair with the given MSE."""
    return 10 * math.log10(DATA_RANGE**2 / max(mse, _EPS))
