"""Training data: CelebA (fixed split) and Face Synthetics, cached as 128×128 uint8 tensors.

CelebA is read by :mod:`magdr.celeba` (``magdr.calibrate`` needs it at run time; its names are
imported here, so a training script reads all its data through this module). Data lives in
``$MAGDR_DATA`` (default ``../shared/data`` beside the checkout; see its README for terms). The
split is fixed: CelebA ``000001``–``008000`` train, ``008001``–``009000`` validation; Face
Synthetics ``000000``–``000069`` train, ``000070``–``000079`` validation.

Face Synthetics faces are warped into CelebA's StarGAN framing with a similarity transform fitted
to their eye and mouth landmarks, so the parser sees synthetic and real faces framed alike.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from magdr.celeba import (  # noqa: F401 - the training scripts read CelebA through this module
    CELEBA_TRAIN,
    CELEBA_VAL,
    SIZE,
    STARGAN_ATTRS,
    cache_dir,
    data_root,
    load_attributes,
    load_celeba,
    to_tensor,
)
from magdr.faces.align import anchor_points, eye_mouth_similarity
from magdr.faces.regions import BISENET_CLASSES

FS_TRAIN = range(0, 70)
FS_VAL = range(70, 80)
IGNORE = 255

_B = {name: i for i, name in enumerate(BISENET_CLASSES)}
#: Face Synthetics class -> BiSeNet class (the one mapping table). FS "right" parts lie on the
#: image's right; BiSeNet ``l_*``/``r_*`` are taken as image-left/-right here (MagDR merges the
#: two sides into one region, so only consistency matters). Beard is skin as in CelebAMask-HQ;
#: facewear has no BiSeNet class and is ignored.
FS_TO_BISENET: dict[int, int] = {
    0: _B["background"], 1: _B["skin"], 2: _B["nose"], 3: _B["r_eye"], 4: _B["l_eye"],
    5: _B["r_brow"], 6: _B["l_brow"], 7: _B["r_ear"], 8: _B["l_ear"], 9: _B["mouth"],
    10: _B["u_lip"], 11: _B["l_lip"], 12: _B["neck"], 13: _B["hair"], 14: _B["skin"],
    15: _B["cloth"], 16: _B["eye_g"], 17: _B["hat"], 18: IGNORE, 255: IGNORE,
}  # fmt: skip
_FS_LUT = np.full(256, IGNORE, np.uint8)
for _k, _v in FS_TO_BISENET.items():
    _FS_LUT[_k] = _v

#: Left/right class swap applied with a horizontal flip.
FLIP_CLASSES = np.arange(256, dtype=np.uint8)
for _a, _b in [("l_brow", "r_brow"), ("l_eye", "r_eye"), ("l_ear", "r_ear")]:
    FLIP_CLASSES[_B[_a]], FLIP_CLASSES[_B[_b]] = _B[_b], _B[_a]


def celeba_mean_anchor(celeba: dict[str, np.ndarray]) -> np.ndarray:
    """Mean eye/mouth anchor of the detected CelebA train faces in the 128 frame."""
    sel = celeba["detected"][: len(CELEBA_TRAIN)]
    return anchor_points(celeba["landmarks"][: len(CELEBA_TRAIN)][sel]).mean(0)


def load_facesynthetics(root: Path | None = None) -> dict[str, np.ndarray]:
    """The 80 Face Synthetics faces at 512.

    Returns:
        ``images`` uint8 RGB, ``labels`` uint8 in BiSeNet order (255 ignore), ``anchor``
        ``[80,3,2]`` eye/mouth landmarks.
    """
    root = data_root(root) / "facesynthetics"
    imgs, labs, anchors = [], [], []
    for i in range(80):
        imgs.append(cv2.imread(str(root / f"{i:06d}.png"))[:, :, ::-1].copy())
        labs.append(_FS_LUT[cv2.imread(str(root / f"{i:06d}_seg.png"), cv2.IMREAD_UNCHANGED)])
        anchors.append(anchor_points(np.loadtxt(root / f"{i:06d}_ldmks.txt")[:68]))
    return {"images": np.stack(imgs), "labels": np.stack(labs), "anchor": np.stack(anchors)}


def fs_warp(
    img: np.ndarray,
    lab: np.ndarray,
    src_anchor: np.ndarray,
    dst_anchor: np.ndarray,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp a Face Synthetics image/label pair into the 128 CelebA framing.

    With ``rng``, the target anchor is jittered (scale ±12%, rotation ±12°, shift ±6 px) for
    augmentation; without it the warp is the plain fit (validation).
    """
    dst = dst_anchor.astype(np.float32).copy()
    if rng is not None:
        c = dst.mean(0)
        a = np.deg2rad(rng.uniform(-12, 12))
        s = rng.uniform(0.88, 1.12)
        rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
        dst = (dst - c) @ rot.T + c + rng.uniform(-6, 6, 2).astype(np.float32)
    m = eye_mouth_similarity(src_anchor, dst)
    # Downscale in two steps so fine texture is averaged, not aliased.
    im = cv2.warpAffine(img, m, (SIZE, SIZE), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    lb = cv2.warpAffine(
        lab, m, (SIZE, SIZE), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
        borderValue=IGNORE,
    )  # fmt: skip
    return im, lb


def landmark_labels(pts: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Pseudo-labels for a real face from its 68 landmarks (BiSeNet order, 255 elsewhere).

    Skin (the jaw/brow hull, eroded), brows, eyes, nose, upper/lower lip and mouth interior are
    drawn; a 1-px ring around every part and everything outside the hull are ignored, since
    landmarks say nothing reliable about hair, neck or background.
    """
    p = np.round(pts * 4).astype(np.int32)  # 2 fractional bits for cv2's shift
    lab = np.full((size, size), IGNORE, np.uint8)
    hull = cv2.convexHull(np.concatenate([p[0:17], p[17:27]]))
    skin = np.zeros((size, size), np.uint8)
    cv2.fillPoly(skin, [hull], 1, cv2.LINE_8, 2)
    skin = cv2.erode(skin, np.ones((5, 5), np.uint8))
    lab[skin > 0] = _B["skin"]
    parts = np.zeros((size, size), np.uint8)

    def fill(poly: np.ndarray, cls: int) -> None:
        m = np.zeros((size, size), np.uint8)
        cv2.fillPoly(m, [poly], 1, cv2.LINE_8, 2)
        lab[m > 0] = cls
        parts[m > 0] = 1

    def line(poly: np.ndarray, cls: int, thick: int) -> None:
        m = np.zeros((size, size), np.uint8)
        cv2.polylines(m, [poly], False, 1, thick, cv2.LINE_8, 2)
        lab[m > 0] = cls
        parts[m > 0] = 1

    line(p[17:22], _B["l_brow"], 2)
    line(p[22:27], _B["r_brow"], 2)
    fill(cv2.convexHull(p[28:36]), _B["nose"])
    fill(p[36:42], _B["l_eye"])
    fill(p[42:48], _B["r_eye"])
    fill(np.concatenate([p[48:55], p[64:59:-1]]), _B["u_lip"])
    fill(np.concatenate([p[54:60], p[48:49], p[60:61], p[67:63:-1]]), _B["l_lip"])
    fill(p[60:68], _B["mouth"])
    ring = cv2.dilate(parts, np.ones((3, 3), np.uint8)) - parts
    lab[(ring > 0) & (lab == _B["skin"])] = IGNORE
    return lab


def shrink(a: np.ndarray, size: int, channels_last: bool = True) -> np.ndarray:
    """Area-shrink uint8 images ``[B,H,W,C]`` (or ``[B,C,H,W]``) to ``size``, an integer factor.

    The 64×64 generator (issue 3's fallback) trains and is measured on CelebA's 128×128 crops
    shrunk this way; exact block means, so region maps and faces stay aligned.
    """
    side = a.shape[1] if channels_last else a.shape[2]
    if side == size:
        return a
    if side % size:
        raise ValueError(f"shrink: {side} is not a multiple of {size}")
    f = side // size
    if channels_last:
        blocks = a.reshape(a.shape[0], size, f, size, f, a.shape[3]).mean((2, 4), dtype=np.float32)
    else:
        blocks = a.reshape(*a.shape[:2], size, f, size, f).mean((3, 5), dtype=np.float32)
    return blocks.round().astype(np.uint8)


def fake_faces(n: int = 4, size: int = SIZE, seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny fabricated CelebA-like data for ``--smoke`` runs when the real data is absent."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    base = np.array([[40, 50], [50, 52], [60, 55], [70, 60], [80, 52], [88, 50]], np.float32) * (
        size / SIZE
    )
    pts = np.zeros((n, 68, 2), np.float32)
    for i in range(n):
        ang = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        pts[i] = np.stack([64 + 30 * np.cos(ang), 64 + 36 * np.sin(ang)], 1) * (size / SIZE)
        pts[i, :6] = base
    attrs = rng.integers(0, 2, (n, 5)).astype(np.float32)
    return {"images": imgs, "attrs": attrs, "landmarks": pts, "detected": np.ones(n, bool)}
