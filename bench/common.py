"""What every benchmark shares: the generator, the guard, the detectors and their thresholds."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.baselines import Detector
from bench.data import Faces

log = logging.getLogger(__name__)

#: Detector names in table order; the first three come from the guard.
MAGDR, DD, CD = "MagDR (DD+CD)", "DD (distortion only)", "CD (consistency only)"


def output_mse(
    G: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, c: torch.Tensor | None, batch: int = 32
) -> torch.Tensor:
    """MSE(G(x̂, c), G(x, c)) per face on the [-1, 1] scale, :math:`(B,)` on the CPU."""
    out = []
    dev = next(G.parameters()).device
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            cb = None if c is None else c[i : i + batch].to(dev)
            y = G(x[i : i + batch].to(dev), cb)
            ya = G(x_adv[i : i + batch].to(dev), cb)
            out.append(((ya - y) ** 2).flatten(1).mean(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def success(
    G: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    c: torch.Tensor | None,
    threshold: float = 0.05,
    batch: int = 32,
) -> torch.Tensor:
    """Ruiz et al.'s criterion: MSE(G(x̂, c), G(x, c)) > 0.05, bool :math:`(B,)` (on the CPU)."""
    return output_mse(G, x, x_adv, c, batch) > threshold


@dataclass
class Bench:
    """The benchmark's state: models, detectors, thresholds (see ``bench.__main__``)."""

    G: nn.Module
    guard: Any
    device: torch.device
    detectors: dict[str, Detector] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    batch: int = 32
    seed: int = 0
    success_mse: float = 0.05
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """All detector names, MagDR and its halves first."""
        return [MAGDR, DD, CD, *self.detectors]

    def _batches(  # noqa: ANN202
        self, x: torch.Tensor, c: torch.Tensor | None, size: int | None = None
    ):
        size = size or self.batch
        for i in range(0, x.shape[0], size):
            yield (
                x[i : i + size].to(self.device),
                (None if c is None else c[i : i + size].to(self.device)),
            )

    def scores(self, x: torch.Tensor, c: torch.Tensor | None) -> dict[str, np.ndarray]:
        """Every detector's score of faces ``x`` :math:`(B, 3, S, S)`, as float64 arrays."""
        out: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        for xb, cb in self._batches(x, c):
            det = self.guard.detect(xb, cb)
            out[MAGDR].append(det.score.double().cpu().numpy())
            out[DD].append(det.s_dist.double().cpu().numpy())
            out[CD].append(det.s_cons.double().cpu().numpy())
            with torch.no_grad():
                for name, d in self.detectors.items():
                    out[name].append(d.score(xb, cb, det.output).double().cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}

    def map_batches(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        x: torch.Tensor,
        c: torch.Tensor | None,
    ) -> torch.Tensor:
        """``fn`` over batches of ``x`` on the device, results concatenated on the CPU."""
        parts = [fn(xb, cb).detach().cpu() for xb, cb in self._batches(x, c)]
        return torch.cat(parts) if parts else x[:0]

    def generate(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """G(x, c) in batches, on the CPU."""
        with torch.no_grad():
            return self.map_batches(lambda xb, cb: self.G(xb, cb), x, c)


def benign(faces: Faces) -> Faces:
    """Clean faces, then their benign copies (``magdr.calibrate.BENIGN``: JPEG, resize, blur)."""
    from magdr.calibrate import BENIGN, benign_copies

    k = 1 + len(BENIGN)
    return Faces(
        torch.cat([faces.x, benign_copies(faces.x)]),
        None if faces.c is None else faces.c.repeat(k, 1),
        faces.task * k,
        [i + s for s in ["", *(f"+{t['name']}" for t in BENIGN)] for i in faces.ids],
    )


# ---- detection metrics ---------------------------------------------------------------------------


def at_threshold(neg: np.ndarray, pos: np.ndarray, thr: float) -> dict[str, float]:
    """Precision, recall, F1 and FPR with ``score > thr`` meaning *disrupted*."""
    tp = float((pos > thr).sum())
    fp = float((neg > thr).sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / len(pos) if len(pos) else math.nan
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision == precision and recall == recall and precision + recall > 0
        else (0.0 if len(pos) else math.nan)
    )
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fpr": fp / len(neg) if len(neg) else math.nan,
    }


def fpr_at_tpr(neg: np.ndarray, pos: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at the threshold that keeps ``tpr`` of the positives."""
    if not len(neg) or not len(pos):
        return math.nan
    thr = np.sort(pos)[int(math.floor((1 - tpr) * len(pos)))]
    return float((neg >= thr).mean())


def roc_curve(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` over every threshold, from (0, 0) to (1, 1)."""
    thr = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = np.array([0.0, *((neg >= t).mean() for t in thr)])
    tpr = np.array([0.0, *((pos >= t).mean() for t in thr)])
    return fpr, tpr


def detection_row(neg: np.ndarray, pos: np.ndarray, thr: float) -> dict[str, float]:
    """All Table 1 numbers for one detector, attack and task."""
    from magdr.calibrate import auroc

    row = at_threshold(neg, pos, thr)
    row["auroc"] = auroc(neg, pos)
    row["fpr@95tpr"] = fpr_at_tpr(neg, pos)
    row["n_pos"], row["n_neg"] = float(len(pos)), float(len(neg))
    return row
