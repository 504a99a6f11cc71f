"""Benchmark faces and conditions (DESIGN §7).

Validation faces are CelebA ``008001``–``009000`` (never trained on); baselines are trained and
every threshold is set on train faces ``000001``–``008000`` only. Faces come from
:func:`magdr.celeba.load_celeba` (StarGAN framing, 128×128) and are resized to
``G.image_size``. ``data="synthetic"`` fabricates smooth random images instead, for the quick
run of the test suite on a machine without the face data (numbers from it mean nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TRAIN = (0, 8000)  # indices into load_celeba's arrays: images 000001..008000
VAL = (8000, 9000)  # images 008001..009000


@dataclass
class Faces:
    """A set of faces with their conditions.

    Attributes:
        x: faces :math:`(B, 3, S, S)` in [-1, 1].
        c: conditions :math:`(B, c_dim)`, or ``None`` for unconditional generators.
        task: per face, the task group its condition belongs to (``"hair"``, ``"face"``, …).
        ids: per face, the CelebA file stem (``"008001"``) or ``"synthetic-N"``.
    """

    x: torch.Tensor
    c: torch.Tensor | None
    task: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, keep: torch.Tensor | list[int] | slice) -> Faces:
        """The faces selected by a bool mask, an index list or a slice."""
        if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
            idx = keep.nonzero().flatten().tolist()
        elif isinstance(keep, slice):
            idx = list(range(len(self)))[keep]
        else:
            idx = [int(i) for i in keep]
        return Faces(
            self.x[idx],
            None if self.c is None else self.c[idx],
            [self.task[i] for i in idx],
            [self.ids[i] for i in idx],
        )


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    shrink = size < x.shape[-1]
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    ).clamp(-1, 1)


def synthetic_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour images :math:`(n, 3, size, size)` in [-1, 1] (no face data needed)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=g) * 2 - 1
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def conditions(G: object, attrs: np.ndarray, rng: np.random.Generator) -> tuple[object, list[str]]:
    """One condition per face and its task group.

    StarGAN-like editors (``G.task == "edit"``): faces alternate between a hair-colour edit (a
    hair colour the face does not have, task ``"hair"``) and a Male/Young flip (task
    ``"face"``), as Ruiz et al. attack StarGAN on each of its attributes. Reenactment
    generators (GANimation) get random action-unit intensities in [0, 1] (task ``"reenact"``);
    unconditional ones (CycleGAN) ``None`` (task ``"replace"``).

    Args:
        G: the generator (``attributes``, ``c_dim``, ``task``, ``neutral``).
        attrs: ``[B, 5]`` CelebA attributes in {0, 1} (StarGAN's five), or zeros.
        rng: random source.

    Returns:
        ``(c, tasks)``: ``c`` :math:`(B, c_dim)` float32 or ``None``; a task name per face.
    """
    import magdr

    b = len(attrs)
    c_dim = int(getattr(G, "c_dim", 0))
    task = str(getattr(G, "task", "edit"))
    if c_dim == 0:
        return None, ["replace"] * b
    if task != "edit":
        c = torch.from_numpy(rng.uniform(0, 1, (b, c_dim)).astype(np.float32))
        return c, [task] * b
    names = list(G.attributes)  # type: ignore[attr-defined]
    hair = [a for a in names if a.endswith("_Hair")]
    other = [a for a in names if not a.endswith("_Hair")]
    out, tasks = [], []
    for i in range(b):
        a = attrs[i] if i < len(attrs) else np.zeros(len(names))
        if (i % 2 == 0 and hair) or not other:
            # A hair colour the face does not already have (StarGAN's strongest visible edit).
            have = [h for h in hair if names.index(h) < len(a) and a[names.index(h)] > 0.5]
            choices = [h for h in hair if h not in have] or hair
            spec = {choices[int(rng.integers(len(choices)))]: 1.0}
            tasks.append("hair")
        else:
            name = other[int(rng.integers(len(other)))]
            j = names.index(name)
            spec = {name: 1.0 - float(a[j]) if j < len(a) else 1.0}
            tasks.append("face")
        out.append(magdr.condition(G, spec, batch=1).cpu())
    return torch.cat(out), tasks


def load_faces(
    G: object,
    split: str,
    n: int,
    data: str | Path | None = None,
    seed: int = 0,
) -> Faces:
    """``n`` faces of a split at ``G.image_size`` with conditions.

    Args:
        G: the generator (size and conditions).
        split: ``"val"`` (the first ``n`` of ``008001``–``009000``, in order) or ``"train"``
            (``n`` drawn with ``seed`` from ``000001``–``008000``).
        n: how many.
        data: the face data folder (``$MAGDR_DATA`` when ``None``) or ``"synthetic"``.
        seed: random source for train sampling and conditions.

    Raises:
        FileNotFoundError: the face data is not there (the message says how to point at it).
    """
    size = int(getattr(G, "image_size", 128))
    rng = np.random.default_rng(seed + (0 if split == "val" else 1000))
    lo, hi = VAL if split == "val" else TRAIN
    if n > hi - lo:
        raise ValueError(f"n: the {split} split holds {hi - lo} faces, asked for {n}")
    if str(data) == "synthetic":
        x = synthetic_images(n, size, seed + (1 if split == "val" else 2))
        attrs = rng.integers(0, 2, (n, 5)).astype(np.float32)
        ids = [f"synthetic-{split}-{i}" for i in range(n)]
    else:
        from magdr.celeba import load_celeba, to_tensor

        celeba = load_celeba(Path(data) if data else None)
        idx = np.arange(lo, lo + n) if split == "val" else np.sort(rng.choice(hi - lo, n, False))
        x = _resize(to_tensor(celeba["images"][idx]), size)
        attrs = celeba["attrs"][idx]
        ids = [f"{i + 1:06d}" for i in idx]
    c, tasks = conditions(G, attrs, rng)
    return Faces(x, c, tasks, ids)
