"""Table 2: how well each defence reconstructs disrupted inputs (DESIGN §7).

On the validation faces whose PGD attack succeeded, each defence turns x̂ into x*; the table
compares the input pair (x, x*) and the output pair (G(x, c), G(x*, c)) by MSE (on the 0–255
scale, as the paper's numbers), SSIM, PSNR and feature similarity (cosine of G's internal maps
Φ_l, the features of paper §3.2.1, averaged over layers). MagDR's x* is the guard's
``purified`` input: the Rec-Net reconstruction where the guard flags the face, the face
unchanged where it does not.
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

log = logging.getLogger(__name__)

NO_DEFENCE = "No defence (x̂)"
MAGDR = "MagDR (Rec-Net)"


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


def run(
    bench: Bench, x_clean: torch.Tensor, pos: Faces, ae: Any | None, seed: int = 0
) -> dict[str, Any]:
    """Table 2 on the successful attacks ``pos`` (``pos.x`` = x̂).

    Args:
        bench: the benchmark state.
        x_clean: the clean faces x of ``pos``, :math:`(B, 3, S, S)`.
        pos: attacked faces x̂ that disrupted G, with their conditions.
        ae: the MagNet detector (for its reformer), or ``None``.
        seed: random source of the randomised defences.

    Returns:
        ``rows[method]`` = ``{"mse_i", "ssim_i", "psnr_i", "feat_i", "mse_o", …, "seconds"}``
        means over the faces, and ``examples`` (the x* of the first faces per method).
    """
    x_adv, c = pos.x, pos.c
    gen = torch.Generator().manual_seed(seed)
    methods: dict[str, Any] = {NO_DEFENCE: lambda x, g: x}
    methods.update(reconstructions(ae))
    rows: dict[str, dict[str, float]] = {}
    examples: dict[str, torch.Tensor] = {}
    y_clean = bench.generate(x_clean, c)
    guard_result = None
    for name in [NO_DEFENCE, MAGDR, *list(methods)[1:]]:
        t0 = time.time()
        if name == MAGDR:
            parts = [bench.guard(xb, cb) for xb, cb in bench._batches(x_adv, c)]
            x_star = torch.cat([r.purified.cpu() for r in parts]) if parts else x_adv[:0]
            guard_result = {
                "flagged": int(sum(int(r.disrupted.sum()) for r in parts)),
                "recovered": int(
                    sum(int((r.disrupted & (r.score_after <= r.threshold)).sum()) for r in parts)
                ),
            }
        else:
            fn = methods[name]
            x_star = bench.map_batches(lambda xb, cb, fn=fn: fn(xb.cpu(), gen).to(xb), x_adv, c)
        seconds = time.time() - t0
        y_star = bench.generate(x_star, c)
        row: dict[str, float] = {}
        with torch.no_grad():
            mi = [
                pair_metrics(bench.G, xb, sb, cb)
                for (xb, cb), (sb, _) in zip(
                    bench._batches(x_clean, c), bench._batches(x_star, c), strict=True
                )
            ]
            mo = [
                pair_metrics(bench.G, yb, sb, cb)
                for (yb, cb), (sb, _) in zip(
                    bench._batches(y_clean, c), bench._batches(y_star, c), strict=True
                )
            ]
        for suffix, parts_ in (("i", mi), ("o", mo)):
            for key in ("mse", "ssim", "psnr", "feat"):
                vals = torch.cat([p[key].cpu() for p in parts_]) if parts_ else torch.zeros(0)
                row[f"{key}_{suffix}"] = float(vals.double().mean()) if len(vals) else math.nan
        row["seconds"] = seconds
        row["success_after"] = (
            float(
                ((y_star - y_clean) ** 2).flatten(1).mean(1).gt(bench.success_mse).double().mean()
            )
            if len(y_star)
            else math.nan
        )
        rows[name] = row
        examples[name] = x_star[:8]
        log.info("reconstruction %s: PSNR(I) %.2f PSNR(O) %.2f", name, row["psnr_i"], row["psnr_o"])
    return {
        "rows": rows,
        "examples": examples,
        "n": len(pos),
        "guard": guard_result,
        "clean": x_clean[:8],
        "adv": x_adv[:8],
        "c": None if c is None else c[:8],
    }
