"""CelebA faces as the project reads them: the fixed split, StarGAN's framing, a uint8 cache.

``magdr.calibrate`` fits the profile on these faces (``magdr-guard calibrate``), the benchmark
measures on them and the training scripts (``training/``) train on them, so they are read here,
in the runtime library, once.

Data lives in ``$MAGDR_DATA`` (default ``../shared/data`` beside the checkout; see its README for
terms). The split is fixed: images ``000001``–``008000`` train, ``008001``–``009000`` validation.
Faces are framed as StarGAN frames them: a centred square crop of the aligned face (89×89 of the
89×109 halves shipped here, as 178×178 of 178×218 in StarGAN) resized to 128.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch

SIZE = 128
CELEBA_TRAIN = range(1, 8001)
CELEBA_VAL = range(8001, 9001)
STARGAN_ATTRS = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]


def data_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The face data folder: ``path``, else ``$MAGDR_DATA``, else ``../shared/data``."""
    if path is None:
        path = os.environ.get("MAGDR_DATA") or Path(__file__).resolve().parents[2] / "shared/data"
    root = Path(path)
    if not (root / "celeba").is_dir() and not (root / "facesynthetics").is_dir():
        raise FileNotFoundError(
            f"face data not found in {root}: set MAGDR_DATA to the folder holding celeba/ and "
            "facesynthetics/ (see the data README)"
        )
    return root


def cache_dir() -> Path:
    """Where the uint8 caches go (gitignored ``runs/cache`` in the checkout)."""
    d = Path(os.environ.get("MAGDR_CACHE", Path(__file__).resolve().parents[1] / "runs/cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _celeba_crop(img: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    crop = img[y0 : y0 + s, x0 : x0 + s]
    return cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC), x0, y0, s


def load_attributes(root: Path, names: list[str] = STARGAN_ATTRS) -> np.ndarray:
    """CelebA attributes of images 1..9000 as ``[9000, len(names)]`` float32 in {0, 1}."""
    lines = (root / "celeba/list_attr_celeba.txt").read_text().splitlines()
    header = lines[1].split()
    idx = [header.index(n) for n in names]
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    out = np.array([[float(r[1 + i] == "1") for i in idx] for r in rows], np.float32)
    return out[:9000]


def load_celeba(root: Path | None = None) -> dict[str, np.ndarray]:
    """CelebA 1..9000 as a cached dict.

    Returns:
        ``images`` ``[9000,128,128,3]`` uint8 RGB, ``attrs`` ``[9000,5]`` {0,1} (StarGAN's five),
        ``landmarks`` ``[9000,68,2]`` float32 in the 128 frame, ``detected`` ``[9000]`` bool.
        Index ``i`` is image ``i + 1``.
    """
    root = data_root(root)
    path = cache_dir() / "celeba128.npz"
    if path.exists():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    imgs = np.zeros((9000, SIZE, SIZE, 3), np.uint8)
    lm = np.load(root / "celeba/landmarks68.npz")
    pts = lm["points"].astype(np.float32).copy()
    for i in range(9000):
        img = cv2.imread(str(root / f"celeba/images/{i + 1:06d}.jpg"))[:, :, ::-1]
        imgs[i], x0, y0, s = _celeba_crop(img)
        pts[i] = (pts[i] - [x0, y0]) * (SIZE / s)
    out = {
        "images": imgs,
        "attrs": load_attributes(root),
        "landmarks": pts,
        "detected": lm["detected"].astype(bool),
    }
    np.savez(path, **out)
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``[B,H,W,3]`` uint8 -> ``[B,3,H,W]`` float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
