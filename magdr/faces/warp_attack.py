"""Attack faces through the daemon's own framing, so the perturbation survives its crop.

An attack computed on the 128×128 crop and pasted back into the frame does not survive: the
daemon cuts the face out of the frame again, area-averaging a large face down to G's size
(which smooths the perturbation away), with landmarks found again on the attacked frame (so
the matrix moves a little), and the frame is stored as ``uint8``. Here the perturbation lives
on the frame's pixels and PGD steps through a differentiable copy of that framing:

- :func:`warp_crop`: :func:`magdr.faces.align.warp_faces` (aligned faces: area-average where
  the face is larger than the crop, then the affine warp), in torch;
- :func:`resize_crop`: :func:`magdr.faces.locate.crop_faces` and the daemon's
  ``faces = "frame"`` (a rectangle resized to the crop), in torch;
- :func:`jitter_matrices`: small random similarities about the crop centre, like the landmark
  re-detection noise (Expectation over Transformation);
- :class:`FramePGD` / :func:`frame_pgd`: L∞ PGD on the frame through all of it, with the
  ``uint8`` rounding of the written frame and of the crop as straight-through estimators.

Frames here are float tensors :math:`(3, H, W)` in [-1, 1] (the library's range; ``eps`` is in
the same units as :class:`magdr.attacks.PGD`'s); matrices ``float64`` :math:`(F, 2, 3)` map frame
pixels onto crop pixels (OpenCV's affine form, pixel centres at integers), as in
:mod:`magdr.faces.align`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magdr.attacks import (
    PROBE,
    Attack,
    _check_count,
    _check_number,
    _frozen,
    _linf_ascent,
    _mse,
    _seed0,
    _uniform,
)
from magdr.check import ShapeError, check_shape
from magdr.faces.align import _corners, _invert

__all__ = [
    "FramePGD",
    "frame_pgd",
    "jitter_matrices",
    "rect_matrices",
    "resize_crop",
    "round_uint8",
    "warp_crop",
]

#: Default EoT jitter: shift (crop pixels), relative scale and roll (degrees), each drawn
#: uniformly in ±. About the drift of re-detected landmarks on an attacked frame (1-2 px of
#: 128; CelebA's own per-face anchor spread is ~1 px).
JITTER = (2.0, 0.03, 2.0)


def round_uint8(x: torch.Tensor) -> torch.Tensor:
    """``x`` in [-1, 1] rounded to the ``uint8`` grid, with the identity's gradient.

    A written frame and a crop from ``warp_faces`` are ``uint8``: the attack sees that rounding
    in the forward pass; the straight-through gradient lets PGD step through it.
    """
    q = torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    return x + (q - x).detach()


def _area_weights(n: int, m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:math:`(m, n)` weights of ``cv2.INTER_AREA`` shrinking ``n`` pixels to ``m`` (``m <= n``).

    Each output pixel averages the input interval ``[i, i + 1) * n / m``, partial pixels by
    their overlap, as OpenCV's area resize does.
    """
    s = n / m
    lo = torch.arange(m, dtype=torch.float64) * s
    edges = torch.arange(n + 1, dtype=torch.float64)
    left = torch.maximum(lo[:, None], edges[None, :-1])
    right = torch.minimum(lo[:, None] + s, edges[None, 1:])
    w = (right - left).clamp(min=0)
    return (w / w.sum(1, keepdim=True)).to(dtype=dtype, device=device)


def _area_resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA)`` of a shrink, :math:`(..., H, W)`."""
    wy = _area_weights(x.shape[-2], h, x.dtype, x.device)
    wx = _area_weights(x.shape[-1], w, x.dtype, x.device)
    return wy @ x @ wx.T


def _affine_sample(x: torch.Tensor, m: np.ndarray, size: int) -> torch.Tensor:
    """``cv2.warpAffine(x, m, (size, size))``, bilinear, edge replicated; x :math:`(C, H, W)`."""
    h, w = x.shape[-2:]
    back = torch.as_tensor(_invert(m), dtype=x.dtype, device=x.device)
    q = torch.arange(size, dtype=x.dtype, device=x.device)
    v, u = torch.meshgrid(q, q, indexing="ij")
    src = torch.stack([u, v, torch.ones_like(u)], -1) @ back.T  # (S, S, 2) source pixels
    # align_corners=True: -1 and 1 are the centres of the first and last pixels; "border"
    # clamps the coordinate, which is what bilinear sampling of a replicated border gives.
    norm = torch.tensor([max(w - 1, 1), max(h - 1, 1)], dtype=x.dtype, device=x.device)
    grid = src * 2 / norm - 1
    out = F.grid_sample(
        x[None], grid[None], mode="bilinear", padding_mode="border", align_corners=True
    )
    return out[0]


def warp_crop(frame: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """One aligned face cut out of a frame as :func:`~magdr.faces.align.warp_faces` does.

    The same steps as its ``_warp``: only the part of the frame the crop sees (plus a margin);
    where the matrix shrinks, that part is area-averaged to the crop's scale first; then the
    bilinear affine warp with the frame's edge replicated. Differentiable in ``frame``.

    Args:
        frame: :math:`(3, H, W)` float, any range (every step is linear), usually [-1, 1].
        matrix: :math:`(2, 3)` frame -> crop.
        size: crop side.

    Returns:
        :math:`(3, size, size)`; agrees with ``warp_faces`` within its ``uint8`` rounding.

    Example:
        >>> m = np.array([[0.5, 0, 0], [0, 0.5, 0]])
        >>> warp_crop(torch.zeros(3, 64, 64), m, 32).shape
        torch.Size([3, 32, 32])
    """
    check_shape(frame, ["3", "H", "W"], "frame")
    sh, sw = frame.shape[-2:]
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    seen = _corners(_invert(m), size, size)
    x0, y0 = np.floor(seen.min(0)).astype(int) - 2
    x1, y1 = np.ceil(seen.max(0)).astype(int) + 3
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, sw), min(y1, sh)
    if x1 <= x0 or y1 <= y0:  # the crop sees only the replicated border
        x0, y0, x1, y1 = min(max(x0, 0), sw - 1), min(max(y0, 0), sh - 1), sw, sh
    roi = frame[:, y0:y1, x0:x1]
    m = m.copy()
    m[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if scale < 1.0:
        rh, rw = roi.shape[-2:]
        nw, nh = max(1, round(rw * scale)), max(1, round(rh * scale))
        sx, sy = nw / rw, nh / rh
        roi = _area_resize(roi, nh, nw)
        m[:, 2] += m[:, :2] @ np.array([0.5 / sx - 0.5, 0.5 / sy - 0.5])
        m[:, :2] = m[:, :2] @ np.diag([1 / sx, 1 / sy])
    return _affine_sample(roi, m, size)


def rect_matrices(rects: np.ndarray, size: int) -> np.ndarray:
    """Axis-aligned frame -> crop matrices of rectangles resized to ``size`` × ``size``.

    Args:
        rects: :math:`(F, 4)` ``(x, y, w, h)`` in frame pixels (``crop_faces``' rects, or the
            whole frame for ``faces = "frame"``).
        size: crop side.

    Returns:
        ``float64`` :math:`(F, 2, 3)`, pixel centres mapped as ``cv2.resize`` maps them.
    """
    r = np.asarray(rects, np.float64).reshape(-1, 4)
    out = np.zeros((len(r), 2, 3))
    kx, ky = size / np.maximum(r[:, 2], 1), size / np.maximum(r[:, 3], 1)
    out[:, 0, 0], out[:, 1, 1] = kx, ky
    out[:, 0, 2] = 0.5 * kx - 0.5 - kx * r[:, 0]
    out[:, 1, 2] = 0.5 * ky - 0.5 - ky * r[:, 1]
    return out


def _rect_of(m: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The integer rectangle ``(x, y, w, h)`` an axis-aligned matrix resizes (rect_matrices⁻¹)."""
    kx, ky = m[0, 0], m[1, 1]
    w, h = max(1, round(size / kx)), max(1, round(size / ky))
    return round((0.5 * kx - 0.5 - m[0, 2]) / kx), round((0.5 * ky - 0.5 - m[1, 2]) / ky), w, h


def resize_crop(frame: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """A rectangle of a frame resized to the crop, as ``crop_faces`` and ``faces = "frame"``.

    Outside the frame the edge is replicated; a rectangle larger than the crop on both sides is
    area-averaged (``cv2.INTER_AREA``), else resized bilinearly (``cv2.INTER_LINEAR``).

    Args:
        frame: :math:`(3, H, W)` float.
        matrix: :math:`(2, 3)` axis-aligned frame -> crop, from :func:`rect_matrices`.
        size: crop side.

    Returns:
        :math:`(3, size, size)`.
    """
    check_shape(frame, ["3", "H", "W"], "frame")
    h, w = frame.shape[-2:]
    x0, y0, rw, rh = _rect_of(np.asarray(matrix, np.float64).reshape(2, 3), size)
    ys = torch.arange(y0, y0 + rh, device=frame.device).clamp(0, h - 1)
    xs = torch.arange(x0, x0 + rw, device=frame.device).clamp(0, w - 1)
    crop = frame[:, ys][:, :, xs]
    if min(rw, rh) > size:
        return _area_resize(crop, size, size)
    return F.interpolate(crop[None], (size, size), mode="bilinear", align_corners=False)[0]


def jitter_matrices(
    matrices: np.ndarray,
    n: int,
    size: int,
    jitter: Sequence[float] = JITTER,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """``n`` randomly moved copies of each matrix; the first copy of each is the matrix itself.

    Each copy is composed with a similarity about the crop centre: shift ``±jitter[0]`` crop
    pixels, scale ``1 ± jitter[1]``, roll ``±jitter[2]`` degrees (uniform), the way landmarks
    found again on an attacked frame move the daemon's crop.

    Args:
        matrices: :math:`(F, 2, 3)` frame -> crop.
        n: copies per matrix (>= 1).
        size: crop side.
        jitter: ``(shift_px, scale, roll_deg)``.
        generator: random source (CPU).

    Returns:
        ``float64`` :math:`(F n, 2, 3)`, face-major (face 0's copies first).
    """
    mats = np.asarray(matrices, np.float64).reshape(-1, 1, 2, 3).repeat(n, 1)
    u = torch.rand((mats.shape[0], n, 4), generator=generator, dtype=torch.float64).numpy()
    u = 2 * u - 1
    u[:, 0] = 0  # the unmoved matrix: the daemon's framing when the landmarks hold still
    shift, scale, roll = (float(j) for j in jitter)
    a = np.deg2rad(roll * u[..., 2])
    k = 1 + scale * u[..., 3]
    c = (size - 1) / 2
    rot = k[..., None, None] * np.stack(
        [np.stack([np.cos(a), -np.sin(a)], -1), np.stack([np.sin(a), np.cos(a)], -1)], -2
    )
    t = c - rot @ np.array([c, c]) + shift * u[..., :2]
    out = rot @ mats[..., :2]
    out_t = (rot @ mats[..., 2:])[..., 0] + t
    return np.concatenate([out, out_t[..., None]], -1).reshape(-1, 2, 3)


def _region(matrices: np.ndarray, size: int, hw: tuple[int, int], margin: float) -> np.ndarray:
    """Per face, the part of the frame its crop sees, moved by up to ``margin`` of its side.

    Returns:
        ``int64`` :math:`(F, 4)` ``(x0, y0, x1, y1)``, clipped to the frame.
    """
    h, w = hw
    out = np.zeros((len(matrices), 4), np.int64)
    for i, m in enumerate(matrices):
        c = _corners(_invert(m), size, size)
        lo, hi = c.min(0), c.max(0)
        pad = margin * (hi - lo).max() + 4
        x0, y0 = np.floor(lo - pad).astype(int)
        x1, y1 = np.ceil(hi + pad).astype(int)
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        out[i] = x0, y0, min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    return out


class FramePGD(Attack):
    r"""L∞ PGD on a frame's pixels through the daemon's framing of each face (EoT).

    Maximises :math:`\frac{1}{n}\sum_j \mathrm{MSE}(G(q(\mathrm{crop}_{J_j M}(q(X + \delta))),
    c), r)` summed over faces, with :math:`\|\delta\|_\infty \le \epsilon` on the frame, ``crop``
    the daemon's framing (:func:`warp_crop` or :func:`resize_crop`), :math:`J_j` the
    :func:`jitter_matrices` samples, :math:`q` the ``uint8`` rounding (straight-through) and
    :math:`r = G(\mathrm{crop}_M(X), c)`. Only the part of the frame the crops see is changed.
    The attack of Ruiz et al. (:class:`magdr.attacks.PGD`) moved into frame space, so that
    it survives the re-crop, as Athalye et al.'s EoT does for physical transforms.

    Args:
        G: the generator.
        size: crop side G takes.
        eps: L∞ radius on frame pixels, [-1, 1] units (0.05 ≈ 6 of 255).
        step: step size α.
        steps: iterations.
        eot: framings sampled per step and face (the first is the unmoved one).
        jitter: ``(shift_px, scale, roll_deg)`` of :func:`jitter_matrices`; zeros for a
            framing that cannot move (``faces = "frame"``).
        mode: ``"warp"`` (aligned faces, ``warp_faces``) or ``"resize"`` (box squares and
            whole frames, axis-aligned matrices from :func:`rect_matrices`).
        random_start: start from a uniform point of the ε-ball (PGD) or from the frame (I-FGSM).

    Shape:
        - frame: :math:`(3, H, W)` in [-1, 1]; matrices: :math:`(F, 2, 3)`; c: :math:`(F, c\_dim)`
          or ``None``.
        - output: :math:`(3, H, W)` in [-1, 1], within ε of ``frame``.
    """

    def __init__(
        self,
        G: nn.Module,
        size: int,
        eps: float = 0.05,
        step: float = 0.01,
        steps: int = 10,
        eot: int = 4,
        jitter: Sequence[float] = JITTER,
        mode: str = "warp",
        random_start: bool = True,
    ) -> None:
        super().__init__(G)
        _check_count(size, "size", minimum=1)
        _check_number(eps, "eps")
        _check_number(step, "step")
        _check_count(steps, "steps")
        _check_count(eot, "eot", minimum=1)
        if len(jitter) != 3:
            raise ValueError(f"jitter: expected (shift_px, scale, roll_deg), got {jitter!r}")
        for j, name in zip(jitter, ("shift_px", "scale", "roll_deg"), strict=True):
            _check_number(j, f"jitter.{name}")
        if mode not in ("warp", "resize"):
            raise ValueError(f"mode: expected 'warp' or 'resize', got {mode!r}")
        self.size, self.eps, self.step, self.steps = size, float(eps), float(step), steps
        self.eot, self.jitter, self.mode = eot, tuple(float(j) for j in jitter), mode
        self.random_start = bool(random_start)

    def crop(self, frame: torch.Tensor, matrices: np.ndarray) -> torch.Tensor:
        """The daemon's crops :math:`(F, 3, S, S)` of ``frame`` :math:`(3, H, W)` (no rounding)."""
        cut = warp_crop if self.mode == "warp" else resize_crop
        return torch.stack([cut(frame, m, self.size) for m in matrices])

    def forward(  # type: ignore[override]
        self,
        frame: torch.Tensor,
        matrices: np.ndarray,
        c: torch.Tensor | None,
        *,
        reference: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Attack every face of one frame.

        Args:
            frame: :math:`(3, H, W)` in [-1, 1].
            matrices: :math:`(F, 2, 3)` frame -> crop, how the daemon cut each face.
            c: conditions :math:`(F, C)` or ``None``.
            reference: :math:`(F, 3, S, S)` r; G of the clean crops when ``None``.
            generator: CPU random source for the start and the jitter (seeded runs).

        Returns:
            the attacked frame, :math:`(3, H, W)` in [-1, 1], detached.
        """
        check_shape(frame, ["3", "H", "W"], "frame")
        mats = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
        if c is not None and c.shape[0] != len(mats):
            raise ShapeError(f"c: expected {len(mats)} rows (one per face), got {c.shape[0]}")
        frame = frame.detach()
        if len(mats) == 0 or self.steps == 0:
            return frame.clone()
        # Work on the part of the frame the crops (and their jittered copies) see.
        margin = 2 * (self.jitter[1] + math.radians(self.jitter[2])) + self.jitter[0] / self.size
        parts = _region(mats, self.size, frame.shape[-2:], margin)
        x0, y0 = parts[:, :2].min(0)
        x1, y1 = parts[:, 2:].max(0)
        x = frame[:, y0:y1, x0:x1].clone()
        local = mats.copy()
        local[:, :, 2] += local[:, :, :2] @ np.array([x0, y0], np.float64)
        # The random start only where a crop can look (faces far apart leave a gap between).
        seen = torch.zeros_like(x[:1])
        for a, b, e, f in parts - np.array([x0, y0, x0, y0]):
            seen[:, b:f, a:e] = 1
        with _frozen(*self._modules()), torch.enable_grad():
            if reference is None:
                with torch.no_grad():
                    reference = self.G(round_uint8(self.crop(x, local)), c)
            x_adv = self._run_frame(x, seen, local, c, reference.detach(), generator)
        out = frame.clone()
        out[:, y0:y1, x0:x1] = x_adv.detach()
        return out

    def _run_frame(
        self,
        x: torch.Tensor,
        seen: torch.Tensor,
        mats: np.ndarray,
        c: torch.Tensor | None,
        r: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        n = self.eot
        rng = generator or _seed0()
        c_n = None if c is None else c.repeat_interleave(n, 0)
        r_n = r.repeat_interleave(n, 0)

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            moved = jitter_matrices(mats, n, self.size, self.jitter, rng)
            crops = round_uint8(self.crop(round_uint8(x_adv), moved))
            return _mse(self.G(crops, c_n), r_n).view(-1, n).mean(1)

        if self.random_start:
            start, probe = x + seen * _uniform(x, self.eps, rng), None
        else:  # I-FGSM: the first gradient at a fixed probe (see magdr.attacks.PGD._start),
            # of a uint8 level: a smaller one would be rounded away with the written frame
            start, probe = x.clone(), _uniform(x, max(PROBE, 1 / 127.5), _seed0())
        return _linf_ascent(x, start, objective, self.eps, self.step, self.steps, probe)


def frame_pgd(
    G: nn.Module,
    frame: torch.Tensor,
    matrices: np.ndarray,
    c: torch.Tensor | None,
    size: int,
    eps: float = 0.05,
    step: float = 0.01,
    steps: int = 10,
    eot: int = 4,
    *,
    jitter: Sequence[float] = JITTER,
    mode: str = "warp",
    random_start: bool = True,
    reference: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD through the daemon's framing, EoT over its jitter. See :class:`FramePGD`.

    Returns:
        the attacked frame, :math:`(3, H, W)` in [-1, 1], within ε of ``frame`` in L∞.
    """
    attack = FramePGD(G, size, eps=eps, step=step, steps=steps, eot=eot, jitter=jitter,
                      mode=mode, random_start=random_start)  # fmt: skip
    return attack(frame, matrices, c, reference=reference, generator=generator)
