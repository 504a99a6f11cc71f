"""Fit a MagDR profile: thresholds, λ, w and Rec-Net's layers from clean + attacked faces.

The paper leaves these as hyper-parameters; here they are fitted on the training split:

1. ``mu``, ``sigma``: mean and spread of each distance d̄_i (Eq. 4), or of its excess over the
   face's benchmark when the profile has a ``reference`` (``--reference``, default a 3×3 median;
   ``magdr.detect``), over the non-target regions of clean faces (standardisation before Eq. 6's
   sigmoid);
2. ``w`` (Eq. 6): each distance weighted by how well it alone separates attacked from clean
   faces (AUROC − 0.5, normalised to sum 1);
3. ``lam`` (Eq. 9): the λ on a log grid whose S_final = λ·S_dist + S_cons flags the most
   attacked faces at step 4's threshold (ties: best AUROC, then the widest margin between the
   score tails);
4. ``threshold`` (:func:`choose_threshold`): the cut between neighbouring S_final scores with
   the largest TPR − FPR among those flagging at most ``fpr`` of the clean faces of every
   group — each edit, CelebA and each extra-negatives file apart — (benignly
   processed copies included, so JPEG'd or resized frames do not raise false alarms), in the
   middle of its interval: the middle of the gap when the training scores separate completely
   (``--clean-margin m``: at m × the interval's clean end instead, when that is lower);
5. Rec-Net Q_i (Algorithm 1, pretraining) on the attacked faces with the fitted detector.

``python -m magdr.calibrate --help`` runs it on CelebA train faces (``magdr-guard calibrate``
calls the same :func:`main`).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from magdr.detect import distortion_score, region_presence
from magdr.metrics import DISTANCES
from magdr.profile import DEFAULT_PROFILE, DEFAULT_REFERENCE, Profile, default_consistency
from magdr.reconstruct import pretrain
from magdr.transforms import apply
from magdr.transforms import get as get_transform

log = logging.getLogger(__name__)

#: Benign processing of clean faces counted as negatives (DESIGN §7).
BENIGN: list[dict[str, Any]] = [
    {"name": "jpeg", "params": {"quality": 75}},
    {"name": "resize", "params": {"scale": 0.75}},
    {"name": "gaussian_blur", "params": {"sigma": 0.6}},
]


def auroc(neg: torch.Tensor | np.ndarray, pos: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve for scores where positives should be higher (ties count ½).

    Example:
        >>> auroc(np.array([0.1, 0.2]), np.array([0.3, 0.15]))
        0.75
    """
    neg, pos = np.asarray(neg, np.float64).ravel(), np.asarray(pos, np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        return math.nan
    scores = np.concatenate([neg, pos])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks of ties (Mann-Whitney U).
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


def choose_threshold(
    neg: torch.Tensor,
    pos: torch.Tensor,
    fpr: float = 0.05,
    groups: torch.Tensor | None = None,
    clean_margin: float = 0.0,
) -> tuple[float, str]:
    """Step 4: the S_final threshold from clean (``neg``) and attacked (``pos``) training scores.

    Every cut between two neighbouring scores is a candidate. Among those that flag at most
    ``fpr`` of the clean scores, the one with the largest TPR − FPR (Youden's J) wins, placed in
    the middle of its interval (the widest on ties). Fully separated scores give the middle of
    the gap (rule ``gap-midpoint``: no training false alarm, the most room on both sides). The
    middle is geometric, √(lo·hi), when both ends are positive: scores are distances, clean ones
    packed near zero and attacked ones spread over a decade, and an attack weaker than the
    training ones (a smaller budget, a perturbation smoothed by the daemon's resampling) scores
    lower by a factor, so each side gets the same factor of room. When
    they overlap a little (``youden-midpoint``), one or two attacked faces that G's output hides
    well do not drag the threshold down to the clean (1 − fpr) quantile, which on video flags far
    more than ``fpr`` of the frames. Without attacked scores: that quantile (``clean-quantile``).

    ``groups`` (an id per clean score: the edit asked of G, the data the face came from) makes
    ``fpr`` hold in *every* group, not only pooled: a profile serves each of its conditions, and
    a pooled rate hides a condition whose clean faces score high behind many that score low.

    ``clean_margin`` m > 0 places the cut at m × the interval's lower end instead of its middle,
    when that is lower (rules ``gap-margin``, ``youden-margin``). The middle leaves half of a
    wide gap to an attacker who knows the threshold: a defence-aware attack pushes S_final just
    under it, and the lower the cut, the less of its budget is left to disrupt G (Figure 3 of
    ``bench/results/REPORT.md``). m is the room kept above the highest clean training score for
    clean faces the fit never saw.

    Returns:
        ``(threshold, rule)``; a score is flagged when it is ``> threshold``.
    """
    neg, pos = neg.double().flatten(), pos.double().flatten()
    if groups is None:
        groups = torch.zeros(len(neg), dtype=torch.long)
    ids = torch.unique(groups)
    parts = [neg[groups == g] for g in ids]
    quantile = max(float(torch.quantile(p, 1 - fpr)) for p in parts), "clean-quantile"
    if pos.numel() == 0:
        return quantile
    cuts = torch.unique(torch.cat([neg, pos]))  # sorted; a threshold in (lo, hi) flags >= hi
    lo, hi = cuts[:-1], cuts[1:]
    pos_sorted = pos.sort().values
    worst = torch.zeros(len(hi), dtype=torch.float64)
    for p in parts:
        fp = (len(p) - torch.searchsorted(p.sort().values, hi)) / len(p)
        worst = torch.maximum(worst, fp)
    fpr_at = (len(neg) - torch.searchsorted(neg.sort().values, hi)) / len(neg)
    tpr_at = (len(pos) - torch.searchsorted(pos_sorted, hi)) / len(pos)
    j = torch.where(worst <= fpr, tpr_at - fpr_at, torch.tensor(-math.inf, dtype=torch.float64))
    if not lo.numel() or not torch.isfinite(j.max()):
        return quantile
    width = torch.where(j == j.max(), hi - lo, torch.tensor(-1.0, dtype=torch.float64))
    i = int(width.argmax())
    kind = "gap" if float(j[i]) == 1.0 else "youden"
    low, middle = float(lo[i]), _middle(float(lo[i]), float(hi[i]))
    if clean_margin > 0 and low > 0 and clean_margin * low < middle:
        return clean_margin * low, f"{kind}-margin"
    return middle, f"{kind}-midpoint"


def _middle(lo: float, hi: float) -> float:
    """The middle of ``(lo, hi)``: geometric for positive ends, else arithmetic."""
    return math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2


def separation_margin(neg: torch.Tensor, pos: torch.Tensor, fpr: float = 0.05) -> float:
    """``(q_fpr(pos) − q_{1−fpr}(neg)) / std(neg)``: how far apart the score tails are.

    Scale-free, so it compares S_final for different λ; larger is better.
    """
    if neg.numel() < 2 or pos.numel() == 0:
        return -math.inf
    lo_pos = torch.quantile(pos.double(), fpr)
    hi_neg = torch.quantile(neg.double(), 1 - fpr)
    return float((lo_pos - hi_neg) / neg.double().std().clamp_min(1e-12))


class _Features:
    """What the profile's numbers are fitted on: per-item region distances and S_cons."""

    def __init__(
        self, d: torch.Tensor, targets: torch.Tensor, present: torch.Tensor, s_cons: torch.Tensor
    ):
        self.d, self.targets, self.present, self.s_cons = d, targets, present, s_cons

    @staticmethod
    def cat(parts: list[_Features]) -> _Features:
        return _Features(
            *(
                torch.cat([getattr(p, k) for p in parts])
                for k in ("d", "targets", "present", "s_cons")
            )
        )

    def s_dist(self, w: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return distortion_score(self.d, self.targets, self.present, w, mu, sigma)


@torch.inference_mode()
def _features(guard: Any, x: torch.Tensor, c: torch.Tensor | None, chunk: int = 32) -> _Features:
    p: Profile = guard.profile
    parts = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].to(guard.device)
        cb = None if c is None else c[i : i + chunk].to(guard.device)
        regions = guard.regions(xb)
        targets = guard.G.target_regions(cb, batch=xb.shape[0]).to(guard.device)
        # The detector's own pass: what is fitted is exactly what the Guard computes.
        det = guard.detector(xb, cb, regions, targets)
        parts.append(
            _Features(
                det.excess.cpu(),
                targets.cpu(),
                region_presence(regions, p.min_region_area).cpu(),
                det.s_cons.cpu(),
            )
        )
    return _Features.cat(parts)


def benign_copies(x: torch.Tensor) -> torch.Tensor:
    """Clean faces after the benign processing of :data:`BENIGN`, stacked after each other."""
    return torch.cat([apply(t["name"], x, **t["params"]) for t in BENIGN])


def fit(
    guard: Any,
    x_clean: torch.Tensor,
    c_clean: torch.Tensor | None,
    x_attacked: torch.Tensor,
    c_attacked: torch.Tensor | None,
    fpr: float = 0.05,
    pretrain_recnet: bool = True,
    name: str = "calibrated",
    groups: torch.Tensor | None = None,
    clean_margin: float = 0.0,
) -> Profile:
    """Fit a profile for ``guard.G`` (steps 1–5 of the module docstring).

    Args:
        guard: a :class:`magdr.Guard` (its G, parser and base profile: distances, consistency
            transforms, Rec-Net layers are kept).
        x_clean: clean faces :math:`(B, 3, S, S)`; benign copies are added by the caller
            (:func:`benign_copies`) if wanted.
        c_clean: their conditions.
        x_attacked: disrupted faces (successful attacks), :math:`(B', 3, S, S)`.
        c_attacked: their conditions.
        fpr: false-positive rate on the clean faces that sets the threshold.
        groups: an id per clean face (its edit and data): ``fpr`` then holds in every group
            (:func:`choose_threshold`), and λ is chosen under that constraint.
        clean_margin: place the threshold at this multiple of the highest clean score below it
            rather than in the middle of the gap (:func:`choose_threshold`); 0: the middle.
        pretrain_recnet: also run Algorithm 1's pretraining (the slow part).
        name: the profile's name.

    Returns:
        the fitted :class:`Profile`, with fit statistics in ``meta``.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"fpr: expected in (0, 1), got {fpr}")
    base: Profile = guard.profile
    neg, pos = _features(guard, x_clean, c_clean), _features(guard, x_attacked, c_attacked)

    # 1. Standardisation from clean non-target regions.
    keep = (neg.present & (neg.targets < 0.5))[..., None].expand_as(neg.d)
    vals = [neg.d[..., m][keep[..., m]] for m in range(neg.d.shape[-1])]
    mu = torch.tensor([float(v.mean()) if v.numel() else 0.0 for v in vals])
    sigma = torch.tensor([max(float(v.std()) if v.numel() > 1 else 1.0, 1e-6) for v in vals])

    # 2. w: separability of each distance alone.
    eye = torch.eye(len(base.distances))
    single = [
        auroc(neg.s_dist(eye[m], mu, sigma), pos.s_dist(eye[m], mu, sigma)) for m in range(len(eye))
    ]
    raw_w = torch.tensor([max(a - 0.5, 0.01) if not math.isnan(a) else 0.01 for a in single])
    w = raw_w / raw_w.sum()

    # 3. λ on a log grid: the most attacked faces flagged at the threshold step 4 would pick,
    # then the best AUROC; ties (common when both halves separate perfectly) go to the widest
    # margin between attacked and clean scores, in units of the clean spread.
    sd_neg, sd_pos = neg.s_dist(w, mu, sigma), pos.s_dist(w, mu, sigma)
    best: tuple[float, ...] = (-1.0, -1.0, -math.inf, 1.0)
    for lam in [0.0, *np.logspace(-5, 2, 36)]:
        s_neg, s_pos = lam * sd_neg + neg.s_cons, lam * sd_pos + pos.s_cons
        t, _ = choose_threshold(s_neg, s_pos, fpr, groups, clean_margin)
        tpr = float((s_pos > t).double().mean()) if s_pos.numel() else 0.0
        cand = (tpr, auroc(s_neg, s_pos), separation_margin(s_neg, s_pos, fpr), float(lam))
        if cand[:3] > best[:3]:
            best = cand
    _, auc, _, lam = best

    # 4. Threshold.
    s_neg = lam * sd_neg + neg.s_cons
    s_pos = lam * sd_pos + pos.s_cons
    threshold, rule = choose_threshold(s_neg, s_pos, fpr, groups, clean_margin)
    tpr = float((s_pos > threshold).double().mean())
    if groups is not None:
        worst = max(float((s_neg[groups == g] > threshold).double().mean())
                    for g in torch.unique(groups))  # fmt: skip

    profile = replace(
        base,
        name=name,
        mu=mu.tolist(),
        sigma=sigma.tolist(),
        w=w.tolist(),
        lam=lam,
        threshold=threshold,
        meta={
            **base.meta,
            "fpr_target": fpr,
            "threshold_rule": rule,
            "clean_margin": clean_margin,
            "clean_max": float(s_neg.max()) if s_neg.numel() else None,
            "attacked_min": float(s_pos.min()) if s_pos.numel() else None,
            "n_clean": int(x_clean.shape[0]),
            "n_attacked": int(x_attacked.shape[0]),
            "auroc_train": auc,
            "auroc_per_distance": dict(zip(base.distances, single, strict=True)),
            "tpr_train": tpr,
            "fpr_train": float((s_neg > threshold).double().mean()),
        },
    )
    if groups is not None:
        profile.meta["fpr_train_worst_group"] = worst
    profile.recnet = replace(base.recnet)

    # 5. Rec-Net pretraining with the fitted detector.
    if pretrain_recnet and x_attacked.shape[0]:
        from magdr.guard import Guard

        fitted = Guard(guard.G, parser=guard.parser, profile=profile, device=guard.device)
        q = _pretrain_with(fitted, x_attacked, c_attacked)
        profile.recnet.pretrained = [
            [{"name": m["name"], "params": m["params"]} for m in layer] for layer in q
        ]
        profile.meta["recnet_pretrain_scores"] = [
            [round(m["score"], 6) for m in layer] for layer in q
        ]
    return profile


@torch.inference_mode()
def _pretrain_with(
    guard: Any, x: torch.Tensor, c: torch.Tensor | None
) -> list[list[dict[str, Any]]]:
    x = x.to(guard.device)
    c = None if c is None else c.to(guard.device)
    regions = guard.regions(x)
    targets = guard.G.target_regions(c, batch=x.shape[0]).to(guard.device)
    transforms = guard.profile.consistency

    def score_fn(xc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return guard._score_candidates(xc, idx, c, regions, targets, transforms)

    return pretrain(score_fn, x, guard.profile.recnet.layers)


# ---- command line --------------------------------------------------------------------------


def _attack(method: str, G: nn.Module, x: torch.Tensor, c: torch.Tensor, seed: int) -> torch.Tensor:
    from magdr import attacks

    gen = torch.Generator().manual_seed(seed)
    if method == "pgd":
        return attacks.pgd(G, x, c, generator=gen)
    if method == "ifgsm":
        return attacks.ifgsm(G, x, c)
    if method == "cw":
        return attacks.cw_l2(G, x, c)
    raise ValueError(f"unknown attack {method!r}; expected pgd, ifgsm or cw")


def main(argv: list[str] | None = None) -> int:
    """``python -m magdr.calibrate``: fit and write a profile on CelebA train faces."""
    ap = argparse.ArgumentParser(prog="magdr-guard calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", default="default", help="'default' or a checkpoint path")
    ap.add_argument("--kind", default=None, help="stargan | ganimation | cyclegan (else sniffed)")
    ap.add_argument("--parser", default="default")
    ap.add_argument("--data", default=None, help="face data folder (default $MAGDR_DATA)")
    ap.add_argument("--n", type=int, default=96, help="train faces used (from 000001 up)")
    ap.add_argument("--attacks", default="pgd,ifgsm,cw")
    ap.add_argument(
        "--fpr",
        type=float,
        default=0.05,
        help="false alarms allowed on the clean faces of each edit and source",
    )
    ap.add_argument(
        "--clean-margin", type=float, default=0.0, metavar="M",
        help="put the threshold at M x the highest clean training score below it (when lower "
        "than the gap's middle) instead of the middle: less room for a defence-aware attacker "
        "(the shipped profile: 1.5); 0: the middle",
    )  # fmt: skip
    ap.add_argument("--success-mse", type=float, default=0.05, help="attack success (Ruiz et al.)")
    ap.add_argument("--out", default=str(DEFAULT_PROFILE))
    ap.add_argument("--name", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reference", default=_spec(DEFAULT_REFERENCE), metavar="NAME[:KEY=V,...]|none",
        help="the transform whose output benchmarks each face's region distances (default "
        "%(default)s); 'none' for the paper's absolute distances",
    )  # fmt: skip
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--extra-negatives", action="append", default=[], metavar="NPZ",
        help="more clean faces: an .npz with 'images' uint8 [N,H,W,3] RGB, e.g. video frames "
        "framed by the daemon (python -m daemon.face_crops); repeatable",
    )  # fmt: skip
    ap.add_argument(
        "--edits", default="random", metavar="LIST",
        help="comma list of the edits asked of G: 'random' (each face one changed attribute), "
        "'own' (the face's own attributes; G's keep condition for unlabelled extra faces) "
        "and/or fixed conditions 'NAME=V[+NAME=V]' such as the daemon's [model] condition; "
        "every face is used once per entry (default: random)",
    )  # fmt: skip
    ap.add_argument(
        "--attack-n", type=int, default=0, metavar="N",
        help="attack at most N of the CelebA faces (spread over the edits; 0: every face once "
        "per edit). C&W costs 100 passes of G per face",
    )  # fmt: skip
    ap.add_argument(
        "--attack-extra", type=int, default=0, metavar="N",
        help="also attack up to N faces of each --extra-negatives file (positives from the "
        "faces a deployment sees, beside the CelebA ones)",
    )  # fmt: skip
    ap.add_argument(
        "--distances", default=",".join(Profile().distances), metavar="LIST",
        help="the distances of the vector D (Eq. 4), comma list of "
        + ", ".join(DISTANCES) + " (default %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--consistency", nargs="+", default=None, metavar="NAME[:KEY=V,...]",
        help="the K transforms of the consistency detector (Eq. 7; default: "
        + " ".join(_spec(t) for t in default_consistency()) + ")",
    )  # fmt: skip
    args = ap.parse_args(argv)
    try:
        edits = parse_edits(args.edits)
    except ValueError as e:
        ap.error(f"--edits: {e}")
    try:
        reference = parse_transform(args.reference)
    except (ValueError, KeyError) as e:
        ap.error(f"--reference: {e}")
    distances = [d.strip() for d in args.distances.split(",") if d.strip()]
    if not distances or any(d not in DISTANCES for d in distances):
        ap.error(f"--distances: expected a comma list of {', '.join(DISTANCES)}")
    try:
        consistency = [parse_transform(t) for t in args.consistency or []]
        if None in consistency:
            raise ValueError("'none' is not a transform")
    except (ValueError, KeyError) as e:
        ap.error(f"--consistency: {e}")
    try:
        extra = [(p, load_negatives(p)) for p in args.extra_negatives]
    except (OSError, ValueError, KeyError) as e:
        ap.error(f"--extra-negatives: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import magdr
    from magdr.celeba import load_celeba, to_tensor

    torch.manual_seed(args.seed)
    t0 = time.time()
    G = magdr.load_generator(args.generator, kind=args.kind)
    m = len(distances)
    base = Profile(reference=reference, distances=distances, mu=[0.0] * m, sigma=[1.0] * m,
                   w=[1.0 / m] * m)  # fmt: skip
    if consistency:
        base.consistency = consistency
    guard = magdr.Guard(G, parser=args.parser, profile=base, device=args.device)
    celeba = load_celeba(Path(args.data) if args.data else None)
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(8000, size=args.n, replace=False)
    x1 = to_tensor(celeba["images"][idx])
    # Conditions: each face gets one of G's attributes changed (as Ruiz et al. attack StarGAN),
    # and/or the fixed edits a deployment asks for: how far G's output moves outside the
    # target region, hence the clean scores, depends on the edit (paper §3.2.2, Eq. 5).
    cs = []
    for e in edits:
        cs.append(edit_conditions(G, e, celeba["attrs"][idx], rng))
    x, c = torch.cat([x1] * len(cs)), torch.cat(cs)
    x_neg = torch.cat([x, benign_copies(x)])
    c_neg = torch.cat([c] * (1 + len(BENIGN)))
    # The threshold's false-alarm rate holds per edit and per source of faces (fit's groups).
    g_neg = torch.arange(len(cs)).repeat_interleave(len(idx)).repeat(1 + len(BENIGN))
    extra_meta = []
    x_extra_att: list[torch.Tensor] = []
    c_extra_att: list[torch.Tensor] = []
    if extra:
        # A separate stream, so the CelebA draw above is the same with or without extras.
        erng = np.random.default_rng([args.seed, 1])

        def erng_attrs(n: int) -> np.ndarray:
            return celeba["attrs"][erng.integers(8000, size=n)]

        for path, images in extra:
            if not len(images):  # a clip set where no face was found: nothing to add
                extra_meta.append({"path": str(path), "faces": 0, "negatives": 0})
                continue
            xe = _resize(to_tensor(images), int(G.image_size))
            # Every edit of --edits, as for the CelebA faces. Video crops have no attribute
            # labels: 'random' borrows those of random CelebA train faces, 'own' is G's keep
            # condition (G.neutral). Their benign copies come with them (face_crops --benign).
            ce = [edit_conditions(G, e, erng_attrs(len(xe)), erng, labelled=False) for e in edits]
            x_neg = torch.cat([x_neg, *[xe] * len(ce)])
            c_neg = torch.cat([c_neg, *ce])
            ids = torch.arange(len(ce)) + int(g_neg.max()) + 1
            g_neg = torch.cat([g_neg, ids.repeat_interleave(len(xe))])
            if args.attack_extra and len(xe):
                pick = erng.choice(len(xe), size=min(args.attack_extra, len(xe)), replace=False)
                x_extra_att.append(xe[pick])
                c_extra_att.append(torch.cat(ce)[pick])
            extra_meta.append({"path": str(path), "faces": len(xe),
                               "negatives": len(xe) * len(ce)})  # fmt: skip
            log.info("extra negatives %s: %d faces x %d edits", path, len(xe), len(ce))
    adv, adv_c = [], []
    if args.attack_n and args.attack_n < len(x):  # evenly over the edits (x is edit-major)
        pick = torch.linspace(0, len(x) - 1, args.attack_n).round().long()
        x, c = x[pick], c[pick]
    if x_extra_att:
        # Attacked video crops beside attacked CelebA faces: the positives of the faces served.
        x, c = torch.cat([x, *x_extra_att]), torch.cat([c, *c_extra_att])
    xd, cd = x.to(guard.device), c.to(guard.device)
    with torch.no_grad():
        y_clean = G(xd, cd)
    for k, method in enumerate(args.attacks.split(",")):
        xa = _attack(method.strip(), guard.G, xd, cd, args.seed + k)
        with torch.no_grad():
            ok = (((G(xa, cd) - y_clean) ** 2).mean(dim=(1, 2, 3)) > args.success_mse).cpu()
        log.info("attack %s: %d/%d successful (MSE > %.3f)", method, int(ok.sum()), len(ok),
                 args.success_mse)  # fmt: skip
        adv.append(xa.cpu()[ok])
        adv_c.append(c[ok])
    x_pos, c_pos = torch.cat(adv), torch.cat(adv_c)
    name = args.name or f"{Path(str(args.generator)).stem}-{time.strftime('%Y%m%d')}"
    profile = fit(guard, x_neg, c_neg, x_pos, c_pos, fpr=args.fpr, name=name, groups=g_neg,
                  clean_margin=args.clean_margin)  # fmt: skip
    profile.meta.update(
        {"generator": str(args.generator), "attacks": args.attacks, "seed": args.seed,
         "edits": args.edits, "faces": "CelebA train split", "wall_s": round(time.time() - t0, 1)}
    )  # fmt: skip
    if extra_meta:
        profile.meta["extra_negatives"] = extra_meta
        profile.meta["faces"] += f" + {sum(e['faces'] for e in extra_meta)} extra clean faces"
    profile.save(args.out)
    m = profile.meta
    log.info(
        "wrote %s: lam=%.4g threshold=%.4g auroc=%.3f tpr=%.3f (%.0fs)",
        *(args.out, profile.lam, profile.threshold, m["auroc_train"], m["tpr_train"], m["wall_s"]),
    )
    return 0


def load_negatives(path: str | Path) -> np.ndarray:
    """The ``images`` of an extra-negatives ``.npz``: uint8 ``[N, H, W, 3]`` RGB, square.

    Why a file and not video: ``magdr`` does no video I/O; ``python -m daemon.face_crops``
    writes these from clips, framed exactly as the daemon frames faces.

    Raises:
        ValueError / KeyError: not such an array.
    """
    with np.load(path) as z:
        images = z["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{path}: 'images' must be uint8 [N,H,W,3], got {images.dtype} "
                         f"{list(images.shape)}")  # fmt: skip
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"{path}: faces must be square, got {images.shape[1]}x{images.shape[2]}")
    return images


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Faces ``(B, 3, S, S)`` to G's side (antialiased, as the daemon's crops are area-resized)."""
    if x.shape[-1] == size:
        return x
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return y.clamp(-1, 1)


def parse_edits(text: str) -> list[str | dict[str, float]]:
    """``"random,own,Blond_Hair=1,Male=1+Young=0"`` -> ``["random", "own", {...}, ...]``.

    ``own``: the face's own attributes (an edit that keeps the face).

    Example:
        >>> parse_edits("random,Blond_Hair=1")
        ['random', {'Blond_Hair': 1.0}]
    """
    out: list[str | dict[str, float]] = []
    for entry in (e.strip() for e in text.split(",")):
        if entry in ("random", "own"):
            out.append(entry)
            continue
        cond = {}
        for part in entry.split("+"):
            name, eq, value = part.partition("=")
            if not eq or not name.strip():
                raise ValueError(f"expected 'random', 'own' or NAME=V[+NAME=V], got {entry!r}")
            cond[name.strip()] = float(value)
        out.append(cond)
    if not out:
        raise ValueError("no edits")
    return out


def _spec(t: dict[str, Any]) -> str:
    """``{"name": "median", "params": {"k": 3}}`` -> ``"median:k=3"`` (the CLI's form)."""
    params = ",".join(f"{k}={v}" for k, v in t["params"].items())
    return f"{t['name']}:{params}" if params else t["name"]


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_transform(text: str) -> dict[str, Any] | None:
    """``"median:k=3"`` -> ``{"name": "median", "params": {"k": 3}}``; ``"none"`` -> ``None``.

    Example:
        >>> parse_transform("gaussian_blur:sigma=0.8")
        {'name': 'gaussian_blur', 'params': {'sigma': 0.8}}
    """
    text = text.strip()
    if text.lower() == "none":
        return None
    name, _, rest = text.partition(":")
    get_transform(name)  # KeyError names the known transforms
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"expected NAME[:KEY=V,...], got {text!r}")
        params[key.strip()] = _number_or_text(value.strip())
    return {"name": name, "params": params}


def edit_conditions(
    G: nn.Module, edit: str | dict[str, float], attrs: np.ndarray, rng: np.random.Generator,
    labelled: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Conditions for faces with labels ``attrs`` under one entry of ``--edits``.

    ``"own"`` is the faces' labels, or G's keep condition for faces without labels
    (``labelled=False``: video crops, whose ``attrs`` are borrowed for ``"random"`` only).
    """
    import magdr

    if edit == "random":
        return random_edits(G, attrs, rng)
    if edit == "own":
        if labelled:
            return torch.as_tensor(np.asarray(attrs), dtype=torch.float32)
        return magdr.condition(G, {}, batch=len(attrs)).cpu()
    return magdr.condition(G, edit, batch=len(attrs)).cpu()


def random_edits(G: nn.Module, attrs: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """One changed attribute per face: a hair colour set, or Male/Young flipped."""
    import magdr

    names = list(G.attributes)
    out = []
    for a in attrs:
        choice = names[int(rng.integers(len(names)))]
        if choice.endswith("_Hair"):
            spec = {choice: 1.0}
        else:
            j = names.index(choice)
            spec = {choice: 1.0 - float(a[j]) if j < len(a) else 1.0}
        out.append(magdr.condition(G, spec, batch=1))
    return torch.cat(out).cpu()


if __name__ == "__main__":
    raise SystemExit(main())
