"""Baselines beside MagDR, each at its authors' recommended settings where they carry over.

Detectors (Table 1) — each has ``score(x, c) -> [B]`` (higher: more likely disrupted),
differentiable w.r.t. ``x`` when called with gradients enabled (BPDA through the
non-differentiable squeezers), so the adaptive attack of Figure 3 can aim at it:

- :class:`FeatureSqueezing` (Xu et al., NDSS 2018): the largest L1 distance between G's output
  on x and on squeezed copies of x (bit depth 5, median 2×2, median 3×3 — Xu et al.'s colour
  squeezers; the L1 is taken between G's output images instead of softmax vectors).
- :class:`MagNetAE` (Meng & Chen, CCS 2017): a small convolutional auto-encoder trained on clean
  train faces with Gaussian input noise; detector = L1 reconstruction error ‖x − AE(x)‖₁
  (MagNet's detector I), reformer = AE(x).
- :class:`OutputClassifier` (the paper's OTD): a small CNN classifying G's *outputs* as clean
  or disrupted, trained on train-split faces (clean and benignly processed vs successful PGD and
  I-FGSM attacks).

Reconstructions (Table 2): :data:`RECONSTRUCTIONS` maps a name to ``f(x, gen) -> x*``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magdr import transforms as T

log = logging.getLogger(__name__)


# ---- squeezers and simple reconstructions ---------------------------------------------------


def median2(x: torch.Tensor) -> torch.Tensor:
    """2×2 median filter as scipy's ``median_filter(size=2)`` used by Xu et al.

    The window is the pixel and its right/lower neighbours (edge-replicated); of the four
    values the upper-middle (rank 2, as scipy) is taken.
    """
    b, c, h, w = x.shape
    p = F.unfold(F.pad(x, [0, 1, 0, 1], mode="replicate"), 2).view(b, c, 4, h * w)
    return p.sort(dim=2).values[:, :, 2].view(b, c, h, w)


def _straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward ``y``, gradient of the identity (BPDA, Athalye et al. 2018)."""
    return x + (y - x).detach()


def random_resize_pad(
    x: torch.Tensor, gen: torch.Generator | None = None, ratio: float = 0.9
) -> torch.Tensor:
    """Xie et al. (ICLR 2018) random resizing and padding, adapted to a fixed-size generator.

    Xie et al. resize 299 px inputs to a random side in [299, 331) and zero-pad them at a random
    offset to 331 (a 10% range). G takes exactly S×S, so here each image is resized to a random
    side in [ratio·S, S] and zero-padded (black, -1) at a random offset back to S.
    """
    s = x.shape[-1]
    out = torch.full_like(x, -1.0)
    for i in range(x.shape[0]):
        side = int(torch.randint(math.floor(ratio * s), s + 1, (1,), generator=gen))
        small = F.interpolate(
            x[i : i + 1], size=(side, side), mode="bilinear", align_corners=False, antialias=True
        )
        oy, ox = (int(v) for v in torch.randint(0, s - side + 1, (2,), generator=gen))
        out[i, :, oy : oy + side, ox : ox + side] = small[0]
    return out


def _haar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2


def _ihaar(ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
    a, b = (ll + lh + hl + hh) / 2, (ll - lh + hl - hh) / 2
    c, d = (ll + lh - hl - hh) / 2, (ll - lh - hl + hh) / 2
    out = torch.empty(
        *ll.shape[:-2], ll.shape[-2] * 2, ll.shape[-1] * 2, dtype=ll.dtype, device=ll.device
    )
    out[..., 0::2, 0::2], out[..., 0::2, 1::2] = a, b
    out[..., 1::2, 0::2], out[..., 1::2, 1::2] = c, d
    return out


def wavelet_denoise(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Soft-threshold Haar wavelet denoising with BayesShrink thresholds, per channel.

    The noise σ is the median absolute finest diagonal coefficient / 0.6745 (Donoho); each
    detail sub-band is soft-thresholded at σ²/σ_x, σ_x² = max(var(band) − σ², 0) (Chang et al.).
    Sides must be divisible by ``2**levels``.
    """
    bands = []
    ll = x
    for _ in range(levels):
        ll, lh, hl, hh = _haar(ll)
        bands.append([lh, hl, hh])
    sigma = bands[0][2].abs().flatten(2).median(dim=2).values / 0.6745  # [B, C]
    sig2 = (sigma**2)[..., None, None]
    for lvl in bands:
        for k, band in enumerate(lvl):
            var = band.pow(2).mean(dim=(2, 3), keepdim=True)
            sx = (var - sig2).clamp_min(1e-12).sqrt()
            thr = torch.where(var > sig2, sig2 / sx, band.abs().amax(dim=(2, 3), keepdim=True))
            lvl[k] = band.sign() * (band.abs() - thr).clamp_min(0)
    for lh, hl, hh in reversed(bands):
        ll = _ihaar(ll, lh, hl, hh)
    return ll


_YCC = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)


def pixel_deflection(
    x: torch.Tensor,
    gen: torch.Generator | None = None,
    deflections: int | None = None,
    window: int = 10,
) -> torch.Tensor:
    """Prakash et al. (CVPR 2018) pixel deflection + wavelet denoising, simplified.

    Each of ``deflections`` randomly chosen pixels is replaced by a random pixel within
    ``window`` of it, then the image is denoised by soft BayesShrink wavelet thresholding in
    YCbCr. Simplifications (documented in the report): pixels are picked uniformly (Prakash et
    al. weight them by a class-activation map, which an image-to-image model does not have), and
    the wavelet is Haar (db1) with 3 levels. The default count, 200 per 224² image, is scaled
    to the image area.
    """
    b, _, h, w = x.shape
    n = deflections if deflections is not None else max(1, round(200 * h * w / 224**2))
    out = x.clone()
    for i in range(b):
        ys = torch.randint(0, h, (n,), generator=gen)
        xs = torch.randint(0, w, (n,), generator=gen)
        dy = torch.randint(-window, window + 1, (n,), generator=gen)
        dx = torch.randint(-window, window + 1, (n,), generator=gen)
        sy, sx = (ys + dy).clamp(0, h - 1), (xs + dx).clamp(0, w - 1)
        out[i, :, ys, xs] = x[i, :, sy, sx]
    m = _YCC.to(x)
    ycc = torch.einsum("ij,bjhw->bihw", m, (out + 1) / 2)
    pad_h, pad_w = (-h) % 8, (-w) % 8
    ycc = F.pad(ycc, [0, pad_w, 0, pad_h], mode="replicate") if pad_h or pad_w else ycc
    den = wavelet_denoise(ycc)[..., :h, :w]
    rgb = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m), den)
    return (rgb * 2 - 1).clamp(-1, 1)


# ---- MagNet auto-encoder ----------------------------------------------------------------------


class AutoEncoder(nn.Module):
    """MagNet-style convolutional auto-encoder (Meng & Chen's detector/reformer structure).

    MagNet's MNIST detector/reformer structure: Conv3×3-sigmoid, 2×2 average pool,
    Conv3×3-sigmoid ×2, 2× upsample, Conv3×3-sigmoid, Conv3×3 to RGB (tanh for the [-1, 1]
    range). MagNet uses 3 channels per layer on 28–32 px digits and objects; faces get
    ``width`` (8) channels, still a small, shallow auto-encoder as the authors intend.

    Shape:
        x: :math:`(B, 3, H, W)` in [-1, 1], H and W even -> same shape in [-1, 1].
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.width = width
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.Sigmoid(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.Sigmoid(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1),
            nn.Sigmoid(),
            nn.Conv2d(width, 3, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


class OTDNet(nn.Module):
    """Output classifier (OTD): 4 stride-2 conv blocks, global average pool, one logit."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], 1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.features(y).mean(dim=(2, 3))).squeeze(1)


# ---- detectors ---------------------------------------------------------------------------------


class Detector:
    """A baseline detector: ``score(x, c)``, a name and a threshold set on train faces."""

    name = "detector"
    threshold = math.nan
    #: Input transforms an adaptive attacker should average over (EoT), as for MagDR.
    transforms: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def score(
        self, x: torch.Tensor, c: torch.Tensor | None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Detection score :math:`(B,)` of faces ``x`` :math:`(B, 3, S, S)`; higher = disrupted.

        ``y``: G(x, c) when the caller has it already (saves a pass of G; no gradient then).
        """
        raise NotImplementedError

    def modules(self) -> list[nn.Module]:
        """Modules an attack must freeze while differentiating through the detector."""
        return []


class FeatureSqueezing(Detector):
    """Xu et al.'s feature squeezing adapted to an image-to-image G (see the module docstring)."""

    name = "Feature squeezing"

    def __init__(self, G: nn.Module) -> None:
        self.G = G
        self.squeezers: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
            ("bitdepth5", lambda x: T.bitdepth(x, 5)),
            ("median2x2", median2),
            ("median3x3", lambda x: T.median(x, 3)),
        ]
        self.transforms = [self._bpda(f) for _, f in self.squeezers]

    @staticmethod
    def _bpda(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def g(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                y = f(x)
            return _straight_through(x, y)

        return g

    def score(  # noqa: D102
        self, x: torch.Tensor, c: torch.Tensor | None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        k = len(self.transforms) + (1 if y is None else 0)
        xs = torch.cat(([x] if y is None else []) + [f(x) for f in self.transforms])
        out = self.G(xs, None if c is None else c.repeat(k, 1))
        if y is None:
            y, out = out[: x.shape[0]], out[x.shape[0] :]
        ys = out.view(len(self.transforms), *x.shape)
        return (ys - y[None]).abs().flatten(2).mean(2).amax(0)

    def modules(self) -> list[nn.Module]:  # noqa: D102
        return [self.G]


class MagNetAE(Detector):
    """MagNet's reconstruction-error detector and reformer around a trained :class:`AutoEncoder`."""

    name = "MagNet AE"

    def __init__(self, ae: AutoEncoder) -> None:
        self.ae = ae.eval().requires_grad_(False)

    def score(  # noqa: D102
        self, x: torch.Tensor, c: torch.Tensor | None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (x - self.ae(x)).abs().flatten(1).mean(1)

    def reform(self, x: torch.Tensor) -> torch.Tensor:
        """MagNet's reformer: the auto-encoder's reconstruction of ``x``, on ``x``'s device.

        The other reconstruction baselines are CPU image ops, so Table 2 hands every method CPU
        faces; the auto-encoder runs wherever it was trained (the GPU on a CUDA run).
        """
        device = next(self.ae.parameters()).device
        with torch.no_grad():
            return self.ae(x.to(device)).clamp(-1, 1).to(x.device)

    def modules(self) -> list[nn.Module]:  # noqa: D102
        return [self.ae]


class OutputClassifier(Detector):
    """OTD: the logit of a CNN trained to tell G's disrupted outputs from clean ones."""

    name = "OTD"

    def __init__(self, G: nn.Module, net: OTDNet) -> None:
        self.G, self.net = G, net.eval().requires_grad_(False)

    def score(  # noqa: D102
        self, x: torch.Tensor, c: torch.Tensor | None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.net(self.G(x, c) if y is None else y)

    def modules(self) -> list[nn.Module]:  # noqa: D102
        return [self.G, self.net]


# ---- training (train split only, seeded, cached) ------------------------------------------------


def train_autoencoder(
    x: torch.Tensor, steps: int, seed: int, device: torch.device, batch: int = 32
) -> AutoEncoder:
    """Train the MagNet auto-encoder on clean faces ``x`` (train split) with noisy inputs.

    As MagNet's CIFAR auto-encoders: Gaussian input noise of volume 0.025 of the [0, 1] range
    (σ 0.05 in [-1, 1]), MSE loss, a 1e-9 L2 weight penalty, Adam.
    """
    torch.manual_seed(seed)
    ae = AutoEncoder().to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3, weight_decay=1e-9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=g)
        xb = x[idx].to(device)
        noisy = (xb + 0.05 * torch.randn(xb.shape, generator=g).to(device)).clamp(-1, 1)
        loss = F.mse_loss(ae(noisy), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log.info("MagNet auto-encoder: final train MSE %.5f after %d steps", loss.item(), steps)
    return ae.eval()


def train_otd(
    y_neg: torch.Tensor,
    y_pos: torch.Tensor,
    steps: int,
    seed: int,
    device: torch.device,
    batch: int = 32,
) -> OTDNet:
    """Train OTD on G's clean outputs ``y_neg`` (label 0) and disrupted outputs ``y_pos`` (1).

    Balanced mini-batches, Adam 1e-3, horizontal flips.
    """
    torch.manual_seed(seed)
    net = OTDNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    half = max(1, batch // 2)
    for _ in range(steps):
        i = torch.randint(len(y_neg), (half,), generator=g)
        j = torch.randint(len(y_pos), (half,), generator=g)
        yb = torch.cat([y_neg[i], y_pos[j]]).to(device)
        if torch.rand(1, generator=g) < 0.5:
            yb = yb.flip(-1)
        lb = torch.cat([torch.zeros(half), torch.ones(half)]).to(device)
        loss = F.binary_cross_entropy_with_logits(net(yb), lb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log.info("OTD: final train loss %.4f after %d steps", loss.item(), steps)
    return net.eval()


def load_or_train(
    cache: Path, key: dict[str, Any], build: Callable[[], nn.Module], make: Callable[[], nn.Module]
) -> tuple[nn.Module, bool]:
    """A trained module from ``cache`` when its key matches, else trained by ``make`` and saved.

    Returns:
        ``(module, from_cache)``.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    meta = cache.with_suffix(".json")
    if cache.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        m = build()
        m.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return m, True
    m = make()
    torch.save({k: v.cpu() for k, v in m.state_dict().items()}, cache)
    meta.write_text(json.dumps(key, indent=1) + "\n")
    return m, False


# ---- Table 2 reconstructions ---------------------------------------------------------------------


def ruiz_blur(x: torch.Tensor) -> torch.Tensor:
    """Gaussian blur σ 1.5, 11 taps (Ruiz et al.): Table 2's best baseline on every attack."""
    return T.gaussian_blur(x, 1.5, 11).clamp(-1, 1)


def reconstructions(
    ae: MagNetAE | None,
) -> dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]]:
    """Name -> ``f(x, gen) -> x*`` for the reconstruction baselines of Table 2 (MagDR apart)."""
    out: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
        "JPEG q75 (Dziugaite)": lambda x, g: T.jpeg(x, 75),
        "Gaussian blur σ1.5 k11 (Ruiz)": lambda x, g: ruiz_blur(x),
        "Resize+pad (Xie)": random_resize_pad,
        "Pixel deflection (Prakash)": lambda x, g: pixel_deflection(x, g),
        "Median 3×3 (Xu)": lambda x, g: T.median(x, 3),
        "Bit depth 5 (Xu)": lambda x, g: T.bitdepth(x, 5),
    }
    if ae is not None:
        out["AE reformer (Meng)"] = lambda x, g: ae.reform(x)
    return out


def fpr_threshold(neg: torch.Tensor | np.ndarray, fpr: float = 0.05) -> float:
    """The (1 − fpr) quantile of clean scores: the threshold giving ``fpr`` false alarms."""
    neg = torch.as_tensor(np.asarray(neg, np.float64))
    return float(torch.quantile(neg, 1 - fpr))
