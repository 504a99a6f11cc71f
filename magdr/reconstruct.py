"""Rec-Net, MagDR's reconstructor (paper §3.2.3, Eq. 8, Algorithm 1).

Rec-Net is a chain of image transforms built layer by layer. Each layer B_i offers a few
*categories* (median, non-local means, JPEG, …) with a parameter grid each.

- **Pretraining** (Algorithm 1, lines 1–6, :func:`pretrain`): for each layer and category, the
  parameter q that minimises the mean S_final (Eq. 9) over a training set of disrupted inputs;
  the chosen ``f_k^q`` form layer Q_i (stored in the profile).
- **Inference** (lines 7–11, :func:`infer`): for each region patch of a face, and each layer,
  score every method of Q_i on the patch, keep the top-3 categories, search their full grids
  (B'_i) and append the single best method to the chain R_i. A method acts on its patch only,
  blended in through the patch's soft mask, so each facial region gets its own chain.

Both only need ``score_fn(x, idx) -> S_final``: candidates ``x`` :math:`(M, 3, H, W)` and the
batch item each belongs to, ``idx`` :math:`(M,)` — the caller (``magdr.Guard``) binds the
generator, conditions and parsed regions of each item. Minimising S_final is the unsupervised
stand-in for Eq. 8's ``min D(G(x), G(T(x̂)))``, whose clean output G(x) is unknown at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from magdr.transforms import apply, get

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _score_chunked(
    score_fn: ScoreFn, x: torch.Tensor, idx: torch.Tensor, chunk: int
) -> torch.Tensor:
    return torch.cat(
        [score_fn(x[i : i + chunk], idx[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    )


def pretrain(
    score_fn: ScoreFn,
    x: torch.Tensor,
    layers: list[list[str]],
    chunk: int = 32,
) -> list[list[dict[str, Any]]]:
    """Algorithm 1, pretraining: pick each category's best parameter per layer (→ Q_i).

    Layer i is evaluated on the training set as transformed by the best method of the layers
    before it, so later layers learn what is left after the earlier ones.

    Args:
        score_fn: S_final of candidates, see the module docstring.
        x: training inputs (disrupted faces), :math:`(B, 3, H, W)`.
        layers: B_i, category names per layer.
        chunk: how many images one ``score_fn`` call gets.

    Returns:
        Q_i per layer: ``[{"name", "params", "score"}]``, one entry per category.
    """
    idx = torch.arange(x.shape[0], device=x.device)
    cur = x
    q_layers: list[list[dict[str, Any]]] = []
    for cats in layers:
        q_i = []
        for cat in cats:
            best: dict[str, Any] = {"name": cat, "params": {}, "score": math.inf}
            for params in get(cat).grid:
                s = _score_chunked(score_fn, apply(cat, cur, **params), idx, chunk).mean().item()
                if s < best["score"]:
                    best = {"name": cat, "params": dict(params), "score": s}
            q_i.append(best)
        q_layers.append(q_i)
        top = min(q_i, key=lambda t: t["score"])
        cur = apply(top["name"], cur, **top["params"])
    return q_layers


def _candidates(x: torch.Tensor, mask: torch.Tensor, methods: list[dict[str, Any]]) -> torch.Tensor:
    """Each method applied to ``x`` inside the soft patch mask: :math:`(B, C, 3, H, W)`."""
    return torch.stack(
        [mask * apply(m["name"], x, **m["params"]) + (1 - mask) * x for m in methods], dim=1
    )


def infer(
    x: torch.Tensor,
    score_fn: ScoreFn,
    patches: torch.Tensor,
    q_layers: list[list[dict[str, Any]]],
    patch_names: list[str],
    top_categories: int = 3,
    start_score: torch.Tensor | None = None,
    min_area: float = 0.005,
    chunk: int = 32,
) -> tuple[torch.Tensor, list[list[dict[str, Any]]], torch.Tensor]:
    """Algorithm 1, inference: build and apply each item's chain R, patch by patch, layer by layer.

    A layer's best method is appended only when it lowers S_final; a layer that cannot help is
    skipped rather than made to degrade the face.

    Args:
        x: disrupted inputs x̂, :math:`(B, 3, H, W)`.
        score_fn: S_final of candidates (module docstring).
        patches: soft patch masks, :math:`(B, P, H, W)`.
        q_layers: Q_i from :func:`pretrain` (``{"name", "params"}`` per category).
        patch_names: a name per patch, for the chains.
        top_categories: categories kept for the full-grid search (line 8: 3).
        start_score: S_final of ``x`` if already known.
        min_area: patches covering less of an item are skipped for it.
        chunk: how many candidates one ``score_fn`` call gets.

    Returns:
        ``(x*, chains, scores)``: the reconstructed inputs, the chain R per item
        (``[{"name", "params", "region", "layer"}]``), and S_final of ``x*`` :math:`(B,)`.
    """
    b = x.shape[0]
    items = torch.arange(b, device=x.device)
    cur = x.clone()
    cur_score = start_score.clone() if start_score is not None else score_fn(cur, items)
    chains: list[list[dict[str, Any]]] = [[] for _ in range(b)]
    for p, pname in enumerate(patch_names):
        mask = patches[:, p : p + 1]
        active = mask.mean(dim=(1, 2, 3)) >= min_area
        if not active.any():
            continue
        for layer, q_i in enumerate(q_layers):
            # Line 7-8: score Q_i on the patch, keep each item's top categories.
            q = [{"name": m["name"], "params": dict(m["params"])} for m in q_i]
            xs = _candidates(cur, mask, q)
            s_q = _score_chunked(score_fn, xs.flatten(0, 1), items.repeat_interleave(len(q)), chunk)
            s_q = s_q.view(b, len(q))
            top = s_q.argsort(dim=1)[:, :top_categories]  # [B, top]
            # Line 9: B'_i = the full grids of each item's chosen categories (Q_i's entries are
            # scored already). Only an item's own categories are scored for it: in a batch the
            # union of everyone's top categories is most of the grid.
            extra = [
                {"name": m["name"], "params": dict(p_), "category": j}
                for j, m in enumerate(q)
                for p_ in get(m["name"]).grid
                if p_ != m["params"]
            ]
            chosen = torch.zeros(b, len(q), dtype=torch.bool, device=x.device)
            chosen.scatter_(1, top, True)
            need = chosen[:, [m["category"] for m in extra]] & active[:, None]  # [B, E]
            # Candidate (item i, extra j) is row[i, j] of ``cand``; -1 where not scored.
            row = torch.full((b, len(extra)), -1, dtype=torch.long, device=x.device)
            cands, owners, n = [], [], 0
            for j in need.any(0).nonzero().flatten().tolist():
                who = need[:, j].nonzero().flatten()
                row[who, j] = torch.arange(n, n + len(who), device=x.device)
                n += len(who)
                cands.append(_candidates(cur[who], mask[who], [extra[j]])[:, 0])
                owners.append(who)
            s_e = torch.full((b, len(extra)), math.inf, device=x.device)
            if cands:
                cand = torch.cat(cands)
                s_cand = _score_chunked(score_fn, cand, torch.cat(owners), chunk)
                s_e[need] = s_cand[row[need]]
            methods = q + [{"name": m["name"], "params": m["params"]} for m in extra]
            # Line 10-11: the top-1 method of B'_i joins R_i where it lowers S_final.
            scores = torch.cat([s_q.masked_fill(~chosen, math.inf), s_e], dim=1)
            best_score, best = scores.min(dim=1)
            better = active & (best_score < cur_score)
            for i in better.nonzero().flatten().tolist():
                j = int(best[i])
                chains[i].append({**methods[j], "region": pname, "layer": layer})
                cur[i] = xs[i, j] if j < len(q) else cand[row[i, j - len(q)]]
            cur_score = torch.where(better, best_score, cur_score)
    return cur, chains, cur_score
