"""Table 2: how well each defence reconstructs disrupted inputs (DESIGN §7).

On the validation faces whose attack succeeded, each defence turns x̂ into x*; the table
compares the input pair (x, x*) and the output pair (G(x, c), G(x*, c)) by MSE (on the 0–255
scale, as the paper's numbers), SSIM, PSNR and feature similarity (cosine of G's internal maps
Φ_l, the features of paper §3.2.1, averaged over layers). MagDR's x* is the guard's
``purified`` input: where the guard flags the face, the learned purifier's output
(:mod:`magdr.purifier`), searched further by Rec-Net when S_final stays high; the face
unchanged where it does not. The paper's Rec-Net alone (the guard without the purifier) and the
purifier alone (applied to every face, flagged or not) are measured beside it.

:func:`run` makes the table for one attack; :func:`clean` measures what the purifier and the
guard do to clean faces (a false alarm must cost nothing).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from bench.baselines import reconstructions
from bench.common import Bench
from bench.data import Faces
from magdr.purifier import STEP_NAME as PURIFIER_STEP

log = logging.getLogger(__name__)

NO_DEFENCE = "No defence (x̂)"
MAGDR = "MagDR (purifier + Rec-Net)"
RECNET = "MagDR, Rec-Net only (paper)"
PURIFIER = "Purifier alone (every face)"


def feature_similarity(
    G: Any, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None
) -> torch.Tensor:
    """Mean over G's feature maps Φ_l of the cosine similarity of ``a`` and ``b``, :math:`(B,)`."""
    from magdr.metrics import feature_cosine

    with torch.no_grad():
        fa, fb = G.features(a, c), G.features(b, c)
    return torch.stack([feature_cosine(u, v) for u, v in zip(fa, fb, strict=True)]).mean(0)


def pair_metrics(
    G: Any, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """MSE (0–255), SSIM, PSNR (dB) and feature similarity of image pairs, each :math:`(B,)`."""
    from magdr.metrics import l2, psnr, ssim

    out = {
        "mse": l2(a, b) * 127.5**2,
        "ssim": ssim(a, b),
        "psnr": psnr(a, b),
    }
    try:
        out["feat"] = feature_similarity(G, a, b, c)
    except NotImplementedError:
        out["feat"] = torch.full((a.shape[0],), math.nan)
    return out


def _guarded(guard: Any, bench: Bench, x: torch.Tensor, c: torch.Tensor | None):  # noqa: ANN202
    """The guard's purified inputs and its counts: flagged, brought below the threshold."""
    parts = [guard(xb, cb) for xb, cb in bench._batches(x, c)]
    x_star = torch.cat([r.purified.cpu() for r in parts]) if parts else x[:0]
    counts = {
        "flagged": int(sum(int(r.disrupted.sum()) for r in parts)),
        "recovered": int(
            sum(int((r.disrupted & (r.score_after <= r.threshold)).sum()) for r in parts)
        ),
        "purifier_only": int(
            sum(1 for r in parts for ch in r.chains if [s["name"] for s in ch] == [PURIFIER_STEP])
        ),
    }
    return x_star, counts


def _mean_metrics(
    bench: Bench, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, suffix: str
) -> dict[str, float]:
    with torch.no_grad():
        parts = [
            pair_metrics(bench.G, ab, bb, cb)
            for (ab, cb), (bb, _) in zip(bench._batches(a, c), bench._batches(b, c), strict=True)
        ]
    row = {}
    for key in ("mse", "ssim", "psnr", "feat"):
        vals = torch.cat([p[key].cpu() for p in parts]) if parts else torch.zeros(0)
        row[f"{key}_{suffix}"] = float(vals.double().mean()) if len(vals) else math.nan
    return row


def run(
    bench: Bench,
    x_clean: torch.Tensor,
    pos: Faces,
    ae: Any | None,
    seed: int = 0,
    rec_net: Any | None = None,
) -> dict[str, Any]:
    """Table 2 for one attack, on its successful attacks ``pos`` (``pos.x`` = x̂).

    Args:
        bench: the benchmark state.
        x_clean: the clean faces x of ``pos``, :math:`(B, 3, S, S)`.
        pos: attacked faces x̂ that disrupted G, with their conditions.
        ae: the MagNet detector (for its reformer), or ``None``.
        seed: random source of the randomised defences.
        rec_net: a guard without the purifier, for the paper's Rec-Net row (``None``: no row;
            it costs hundreds of G passes per face).

    Returns:
        ``rows[method]`` = ``{"mse_i", "ssim_i", "psnr_i", "feat_i", "mse_o", …, "seconds"}``
        means over the faces, and ``guard`` / ``guard_counts``: each guard's counts.
    """
    x_adv, c = pos.x, pos.c
    gen = torch.Generator().manual_seed(seed)
    methods: dict[str, Any] = {NO_DEFENCE: lambda x, g: x}
    purifier = getattr(bench.guard, "purifier", None)
    names = [NO_DEFENCE, MAGDR]
    if rec_net is not None and purifier is not None:
        names.append(RECNET)
    if purifier is not None:
        names.append(PURIFIER)
        methods[PURIFIER] = lambda x, g: purifier(x)
    methods.update(reconstructions(ae))
    names += [n for n in methods if n not in names]
    rows: dict[str, dict[str, float]] = {}
    guard_counts: dict[str, dict[str, int]] = {}
    y_clean = bench.generate(x_clean, c)
    for name in names:
        t0 = time.time()
        if name in (MAGDR, RECNET):
            guard = bench.guard if name == MAGDR else rec_net
            x_star, guard_counts[name] = _guarded(guard, bench, x_adv, c)
        else:
            fn = methods[name]
            with torch.no_grad():
                x_star = bench.map_batches(
                    lambda xb, cb, fn=fn: fn(xb.cpu(), gen).to(xb), x_adv, c
                )  # fmt: skip
        seconds = time.time() - t0
        y_star = bench.generate(x_star, c)
        row = {
            **_mean_metrics(bench, x_clean, x_star, c, "i"),
            **_mean_metrics(bench, y_clean, y_star, c, "o"),
            "seconds": seconds,
            "success_after": (
                float(
                    ((y_star - y_clean) ** 2)
                    .flatten(1)
                    .mean(1)
                    .gt(bench.success_mse)
                    .double()
                    .mean()
                )  # fmt: skip
                if len(y_star)
                else math.nan
            ),
        }
        rows[name] = row
        log.info("reconstruction %s: PSNR(I) %.2f PSNR(O) %.2f", name, row["psnr_i"], row["psnr_o"])
    return {
        "rows": rows,
        "n": len(pos),
        "guard": guard_counts.get(MAGDR),
        "guard_counts": guard_counts,
    }


def best_baseline(rows: dict[str, dict[str, float]]) -> str:
    """The baseline (not MagDR, not the purifier, not 'no defence') with the best PSNR(O)."""
    ours = {NO_DEFENCE, MAGDR, RECNET, PURIFIER}
    return max((n for n in rows if n not in ours), key=lambda n: rows[n]["psnr_o"])


def clean(bench: Bench, faces: Faces) -> dict[str, Any]:
    """What the purifier and the guard do to clean faces: PSNR/SSIM of G's output vs G(x).

    The guard passes a face it does not flag unchanged, so its row differs from G(x) only
    through false alarms; the purifier's row is P applied to every clean face (the cost of a
    false alarm when P cures it).
    """
    x, c = faces.x, faces.c
    y = bench.generate(x, c)
    out: dict[str, Any] = {"n": len(faces)}
    purifier = getattr(bench.guard, "purifier", None)
    if purifier is not None:
        with torch.no_grad():
            xp = bench.map_batches(lambda xb, cb: purifier(xb), x, c)
        out[PURIFIER] = {
            **_mean_metrics(bench, x, xp, c, "i"),
            **_mean_metrics(bench, y, bench.generate(xp, c), c, "o"),
        }
    xg, counts = _guarded(bench.guard, bench, x, c)
    out[MAGDR] = {
        **_mean_metrics(bench, x, xg, c, "i"),
        **_mean_metrics(bench, y, bench.generate(xg, c), c, "o"),
        **counts,
    }
    return out
