"""Figure 3: F1 against the number of defence-aware (adaptive) attack iterations.

Each detector is attacked with its own knowledge (Eq. 3 with Expectation over Transformation):
signed-gradient ascent in the ε-ball (0.05, step 0.01) of

    mean_{f ~ pool} MSE(G(f(x̂), c), G(x, c)) − λ_e · relu((score(x̂) − τ) / s)

where the pool holds the identity and the detector's own input transforms (MagDR: its K
consistency transforms and every Rec-Net candidate, plus its learned purifier P, which is in every
step's draw with its full gradient, since the guard sends every flagged face through P first;
feature squeezing: its squeezers; MagNet and OTD: none), non-differentiable ones passed with
BPDA; ``score`` is the detector's own score, τ its threshold and s the spread of its clean train
scores, so the attacker is pushed below the threshold and no further. The attack runs once to the
largest iteration count and the iterate after each listed count is kept (PGD with a fixed step:
the first k steps of a longer run are the k-step attack). MagDR's two halves (DD, CD) are scored
on the examples made against MagDR.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.common import CD, DD, MAGDR, Bench, at_threshold, benign, success
from bench.data import Faces
from magdr.attacks import AdaptivePGD, _apply, _mse, _project
from magdr.calibrate import auroc

log = logging.getLogger(__name__)


class _Target(nn.Module):
    """What the attacker differentiates: a detector's hinge ``relu((score − τ) / s)``."""

    def __init__(self, score: Any, threshold: float, scale: float, modules: list[nn.Module]):
        super().__init__()
        self._score, self.threshold, self.scale = score, threshold, max(scale, 1e-8)
        self.parts = nn.ModuleList(modules)

    def score(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        return ((self._score(x, c) - self.threshold) / self.scale).relu()


class SnapshotAdaptivePGD(AdaptivePGD):
    """:class:`magdr.attacks.AdaptivePGD` keeping the iterate after each count in ``snapshots``."""

    def __init__(
        self, *args: Any, snapshots: list[int], always: list[Any] = (), **kwargs: Any
    ) -> None:
        kwargs["steps"] = max(snapshots)
        super().__init__(*args, **kwargs)
        self.snapshots = sorted(set(snapshots))
        self.always = list(always)  # transforms in every step's draw, besides the EoT sample
        self.saved: dict[int, torch.Tensor] = {}

    def _run(self, x, c, r, generator):  # noqa: ANN001, ANN202
        # AdaptivePGD's objective and PGD's loop (magdr.attacks._linf_ascent), with snapshots.
        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            fs = self.always + self._draw(generator)
            loss = sum(_mse(self.G(_apply(f, x_adv), c), r) for f in fs) / len(fs)
            if self.evade_weight > 0:
                loss = loss - self.evade_weight * self.guard.score(x_adv, c).reshape(x.shape[0])
            return loss

        start = self._start(x, generator)
        start, probe = start if isinstance(start, tuple) else (start, None)
        x_adv = _project(x, start, self.eps).detach()
        self.saved = {}
        for i in range(1, self.steps + 1):
            x_in = (x_adv + probe if i == 1 and probe is not None else x_adv).requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(x_in).sum(), x_in)
            with torch.no_grad():
                x_adv = _project(x, x_adv + self.step * grad.sign(), self.eps)
            if i in self.snapshots:
                self.saved[i] = x_adv.clone()
        return x_adv


def _targets(
    bench: Bench, scales: dict[str, float]
) -> dict[str, tuple[_Target, list[Any], list[Any]]]:
    """Per attacked detector: its hinge target, its EoT pool (without the identity) and the
    transforms in every draw."""
    guard = bench.guard
    p = guard.profile
    purifier = getattr(guard, "purifier", None)
    always = [] if purifier is None else [purifier]
    modules = [guard.G, guard.parser, *always]
    out = {
        MAGDR: (
            _Target(guard.score, bench.thresholds[MAGDR], scales[MAGDR], modules),
            [*p.consistency, *p.recnet_transforms()],
            always,
        )
    }
    for name, d in bench.detectors.items():
        out[name] = (
            _Target(d.score, bench.thresholds[name], scales[name], d.modules()),
            list(d.transforms),
            [],
        )
    return out


def selected(name: str, detectors: list[str] | None) -> bool:
    """Whether the detector ``name`` is among ``detectors`` (name prefixes, any case; None: all)."""
    return not detectors or any(name.lower().startswith(d.strip().lower()) for d in detectors)


def run(
    bench: Bench,
    val: Faces,
    iterations: list[int],
    scales: dict[str, float],
    evade_weight: float = 0.05,
    eot_samples: int = 4,
    eps: float = 0.05,
    step: float = 0.01,
    seed: int = 0,
    detectors: list[str] | None = None,
) -> dict[str, Any]:
    """Figure 3 on the faces ``val``.

    Args:
        bench: the benchmark state (thresholds set).
        val: the faces attacked (a few: each iteration costs several G passes per face).
        iterations: the iteration counts of the curve (e.g. 10, 20, 50, 100, 200).
        scales: per detector, the spread of its clean train scores (the hinge's unit).
        evade_weight: λ_e.
        eot_samples: transforms drawn per step (fewer when the pool is smaller).
        seed: random source.
        detectors: attack only the detectors whose names start with one of these (any case),
            e.g. ``["magdr"]``; None: all of them.

    Returns:
        ``curves[detector][i]`` with ``iterations``, ``f1``, ``precision``, ``recall``,
        ``success`` (fraction of attacks that still disrupt G), ``seconds`` per attack.
    """
    neg_faces = benign(val)
    neg = bench.scores(neg_faces.x, neg_faces.c)
    curves: dict[str, Any] = {}
    for k, (name, (target, pool, always)) in enumerate(_targets(bench, scales).items()):
        if not selected(name, detectors):
            continue
        t0 = time.time()
        snaps: dict[int, list[torch.Tensor]] = {i: [] for i in iterations}
        gen = torch.Generator(device=bench.device).manual_seed(seed + 31 * k)
        for xb, cb in bench._batches(val.x, val.c):
            attack = SnapshotAdaptivePGD(
                bench.G,
                guard=target,
                transforms=pool,
                snapshots=iterations,
                always=always,
                eot_samples=min(eot_samples, len(pool) + 1),
                eps=eps,
                step=step,
                evade_weight=evade_weight,
            )
            attack(xb, cb, generator=gen)
            for i in iterations:
                snaps[i].append(attack.saved[i].cpu())
        seconds = time.time() - t0
        judged = [name, DD, CD] if name == MAGDR else [name]
        pts: dict[str, list[dict[str, float]]] = {d: [] for d in judged}
        for i in iterations:
            x_adv = torch.cat(snaps[i])
            ok = success(bench.G, val.x, x_adv, val.c, bench.success_mse, bench.batch)
            pos_faces = Faces(x_adv, val.c, val.task, val.ids).subset(ok)
            pos = bench.scores(pos_faces.x, pos_faces.c)
            for d in judged:
                row = at_threshold(neg[d], pos[d], bench.thresholds[d])
                row["auroc"] = auroc(neg[d], pos[d])
                row.update(iterations=i, success=float(ok.double().mean()), n_pos=int(ok.sum()))
                pts[d].append(row)
        for d in judged:
            curves[d] = {"points": pts[d], "seconds": round(seconds, 1), "attacked": name}
        log.info(
            "adaptive vs %s: F1 %s (%.0f s)", name, [round(p["f1"], 3) for p in pts[name]], seconds
        )
    return {
        "curves": curves,
        "iterations": iterations,
        "n": len(val),
        "n_neg": len(neg_faces),
        "evade_weight": evade_weight,
        "eot_samples": eot_samples,
        "eps": eps,
        "step": step,
    }


def clean_scale(neg: dict[str, np.ndarray]) -> dict[str, float]:
    """Per detector, the standard deviation of its clean train scores (the hinge's unit)."""
    return {k: float(np.std(v)) if len(v) > 1 else 1.0 for k, v in neg.items()}
