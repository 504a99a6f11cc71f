"""``python -m bench``: reproduce the paper's evaluation (Tables 1–2, Figure 3) and time the guard.

Writes ``<out>/REPORT.md`` (tables, command, commit, machine, wall time), ``<out>/results.json``
and PNG plots/grids; trained baselines are cached in ``<out>/cache`` (gitignored under
``bench/results``). ``--quick`` runs a few faces and iterations (the test suite runs it); the
full run uses validation faces 008001–009000. See DESIGN §7 and ``bench/results/REPORT.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import adaptive, detection, figures, reconstruction, report, scaling, throughput
from bench.baselines import (
    AutoEncoder,
    FeatureSqueezing,
    MagNetAE,
    OTDNet,
    OutputClassifier,
    fpr_threshold,
    load_or_train,
    train_autoencoder,
    train_otd,
)
from bench.common import MAGDR, Bench, benign
from bench.data import Faces, load_faces
from bench.run_info import commit, machine
from magdr.checkpoints import weights_digest

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results"

#: Settings of the full run and of ``--quick`` (each overridable on the command line).
FULL = dict(
    n=1000,
    n_fit=512,
    n_cal=256,
    ae_steps=2000,
    otd_steps=1000,
    cw_steps=100,
    iterations="10,20,50,100,200",
    n_adaptive=64,
    n_throughput=128,
)
QUICK = dict(
    n=8,
    n_fit=16,
    n_cal=8,
    ae_steps=30,
    otd_steps=30,
    cw_steps=5,
    iterations="2,4",
    n_adaptive=4,
    n_throughput=8,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few faces and iterations (tests)")
    ap.add_argument("--generator", default="default", help="'default' or a checkpoint path")
    ap.add_argument("--kind", default=None, help="stargan | ganimation | cyclegan (else sniffed)")
    ap.add_argument("--parser", default="default", help="'default', 'landmarks' or a checkpoint")
    ap.add_argument("--profile", default="default", help="'default' or a profile JSON")
    ap.add_argument(
        "--purifier",
        default="auto",
        help="'auto' (the shipped one for the default G), a path or 'none'",
    )
    ap.add_argument("--data", default=None, help="face data folder ($MAGDR_DATA) or 'synthetic'")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where REPORT.md and PNGs go")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None, help="faces per forward pass")
    ap.add_argument("--n", type=int, default=None, help="validation faces (from 008001)")
    ap.add_argument("--n-fit", type=int, default=None, help="train faces for AE and OTD")
    ap.add_argument("--n-cal", type=int, default=None, help="train faces setting thresholds")
    ap.add_argument("--ae-steps", type=int, default=None)
    ap.add_argument("--otd-steps", type=int, default=None)
    ap.add_argument("--cw-steps", type=int, default=None)
    ap.add_argument("--eps", type=float, default=0.05, help="L∞ budget (Ruiz et al.: 0.05)")
    ap.add_argument("--step", type=float, default=0.01, help="PGD step (Ruiz et al.: 0.01)")
    ap.add_argument("--steps", type=int, default=10, help="PGD iterations (Ruiz et al.: 10)")
    ap.add_argument(
        "--held-out-eps", type=float, default=0.08, help="Table 2's PGD radius unseen in training"
    )
    ap.add_argument("--iterations", default=None, help="adaptive attack iterations, e.g. 10,50")
    ap.add_argument("--n-adaptive", type=int, default=None, help="faces for Figure 3")
    ap.add_argument("--n-throughput", type=int, default=None, help="faces timed")
    ap.add_argument("--eot-samples", type=int, default=4, help="EoT draws per adaptive step")
    ap.add_argument(
        "--adaptive-eps",
        type=float,
        default=None,
        help="Figure 3's L∞ budget (default --eps; at 0.05 the small default G may not be "
        "disrupted at all by an attacker that must also get through its purifier)",
    )
    ap.add_argument(
        "--adaptive-step",
        type=float,
        default=None,
        help="Figure 3's PGD step (default --step, or ε/5 with --adaptive-eps)",
    )
    ap.add_argument(
        "--adaptive-detectors",
        default=None,
        help="Figure 3 attacks only these detectors (comma list of name prefixes, e.g. magdr)",
    )
    ap.add_argument("--evade-weight", type=float, default=0.05, help="λ_e of the adaptive attack")
    ap.add_argument(
        "--success-mse",
        type=float,
        default=0.05,
        help="output MSE that makes an attack successful (Ruiz et al.: 0.05)",
    )
    ap.add_argument("--fpr", type=float, default=0.05, help="clean FPR that sets thresholds")
    ap.add_argument("--skip-adaptive", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--note", action="append", default=[], help="a line for the report")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.iterations = [int(i) for i in str(args.iterations).split(",") if i.strip()]
    return args


def _train_baselines(
    bench: Bench, fit: Faces, args: argparse.Namespace, cache: Path, data_key: str
) -> tuple[MagNetAE, OutputClassifier, dict[str, Any]]:
    """Train (or load from cache) the MagNet auto-encoder and OTD on train faces only."""
    G, dev = bench.G, bench.device
    key = {
        "G": weights_digest(G),
        "size": int(fit.x.shape[-1]),
        "n_fit": len(fit),
        "seed": args.seed,
        "data": data_key,
    }
    info: dict[str, Any] = {}
    t0 = time.time()
    ae, cached = load_or_train(
        cache / f"magnet_ae_{key['G']}.pt",
        {**key, "steps": args.ae_steps, "arch": "magnet-mnist-w8"},
        AutoEncoder,
        lambda: train_autoencoder(fit.x, args.ae_steps, args.seed, dev),
    )
    info["ae"] = {"cached": cached, "seconds": round(time.time() - t0, 1), "steps": args.ae_steps}

    def make_otd() -> OTDNet:
        neg = benign(fit)
        y_neg = bench.generate(neg.x, neg.c)
        ys = []
        suite = detection.attack_suite(args.cw_steps, args.steps, args.eps, args.step)
        for k, name in enumerate(["PGD", "I-FGSM"]):
            a = detection.run_attack(bench, suite[name], fit, args.seed + 1000 + k)
            ys.append(bench.generate(a.x_adv[a.ok], None if fit.c is None else fit.c[a.ok]))
        y_pos = torch.cat(ys)
        info["otd_positives"] = len(y_pos)
        if not len(y_pos):  # no attack succeeded on this G: train against attempted ones
            log.warning("OTD: no train attack succeeded; training on the attempted ones")
            y_pos = bench.generate(a.x_adv, fit.c)
        return train_otd(y_neg, y_pos, args.otd_steps, args.seed, dev)

    t0 = time.time()
    net, cached = load_or_train(
        cache / f"otd_{key['G']}.pt",
        {**key, "steps": args.otd_steps, "arch": "otd-w16"},
        OTDNet,
        make_otd,
    )
    info["otd"] = {"cached": cached, "seconds": round(time.time() - t0, 1), "steps": args.otd_steps}
    return MagNetAE(ae.to(dev)), OutputClassifier(G, net.to(dev)), info


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t_start = time.time()
    code_commit = commit()  # the code this run executes (taken before anything can change)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import magdr
    from magdr.checkpoints import resolve_device

    device = resolve_device(args.device)
    G = magdr.load_generator(args.generator, kind=args.kind, device=device)
    guard = magdr.Guard(
        G, parser=args.parser, profile=args.profile, device=device, purifier=args.purifier
    )
    batch = args.batch or (64 if device.type == "cuda" else 16)
    bench = Bench(
        G=guard.G,
        guard=guard,
        device=device,
        batch=batch,
        seed=args.seed,
        success_mse=args.success_mse,
    )
    data_key = str(args.data or os.environ.get("MAGDR_DATA") or "default")
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        log.info("== %s done in %.0f s", name, timings[name])

    # ---- data: validation faces, train faces for fitting and for thresholds (disjoint) ----
    t0 = time.time()
    val = load_faces(G, "val", args.n, args.data, args.seed)
    train = load_faces(G, "train", args.n_fit + args.n_cal, args.data, args.seed)
    fit, cal = train.subset(slice(0, args.n_fit)), train.subset(slice(args.n_fit, None))
    lap("data", t0)

    # ---- baselines ----
    t0 = time.time()
    cache = out / "cache"
    magnet, otd, train_info = _train_baselines(bench, fit, args, cache, data_key)
    bench.detectors = {
        "Feature squeezing": FeatureSqueezing(bench.G),
        "MagNet AE": magnet,
        "OTD": otd,
    }
    lap("baselines", t0)

    # ---- thresholds at the same clean FPR on train faces ----
    t0 = time.time()
    cal_neg = benign(cal)
    cal_scores = bench.scores(cal_neg.x, cal_neg.c)
    thr_source = {}
    for name in bench.names:
        bench.thresholds[name] = fpr_threshold(cal_scores[name], args.fpr)
        thr_source[name] = f"{1 - args.fpr:.0%} quantile of {len(cal_neg)} clean train scores"
    calibrated = guard.profile.name != "uncalibrated"
    if calibrated:
        bench.thresholds[MAGDR] = float(guard.profile.threshold)
        thr_source[MAGDR] = f"profile '{guard.profile.name}' (magdr.calibrate, train split)"
    cal_fpr = {n: float((cal_scores[n] > bench.thresholds[n]).mean()) for n in bench.names}
    lap("thresholds", t0)

    # ---- Table 1 ----
    t0 = time.time()
    suite = detection.attack_suite(args.cw_steps, args.steps, args.eps, args.step)
    det, attacked = detection.run(bench, val, suite, seed=args.seed)
    if (args.eps, args.step, args.steps) != (0.05, 0.01, 10):
        # What Ruiz et al.'s exact setting does to this G, for the record.
        ref_suite = detection.attack_suite(args.cw_steps, 10, 0.05, 0.01)
        ref = detection.run_attack(bench, ref_suite["PGD"], val, args.seed)
        det["ruiz_pgd"] = {
            "ok": int(ref.ok.sum()),
            "n": len(val),
            "mse_median": float(ref.mse.median()),
            "mse_max": float(ref.mse.max()),
        }
    lap("detection", t0)

    # ---- Table 2: every attack of Table 1, and PGD at a radius the purifier never saw ----
    t0 = time.time()
    held_out = f"PGD ε {args.held_out_eps:g}"
    eps = args.held_out_eps
    held_out_pgd = detection.attack_suite(args.cw_steps, args.steps, eps, eps / 5)["PGD"]
    attacked[held_out] = detection.run_attack(bench, held_out_pgd, val, args.seed + 101)
    rec_net = (
        magdr.Guard(
            guard.G, parser=guard.parser, profile=guard.profile, device=device, purifier=None
        )
        if guard.purifier is not None
        else None
    )
    pgd = attacked["PGD"]
    rec: dict[str, Any] = {"tables": {}, "clean": reconstruction.clean(bench, val)}
    for name, a in attacked.items():
        ok = a.ok if a.ok.any() else torch.ones_like(a.ok)
        pos = Faces(a.x_adv, val.c, val.task, val.ids).subset(ok)
        # The paper's Rec-Net costs hundreds of G passes per face: measured on PGD only.
        table = reconstruction.run(
            bench,
            val.x[ok],
            pos,
            magnet,
            seed=args.seed,
            rec_net=rec_net if name == "PGD" else None,
        )
        table["all_successful"] = bool(a.ok.any())
        rec["tables"][name] = table
    rec["held_out"] = held_out
    rec["purifier"] = dict(getattr(guard.purifier, "meta", {}) or {}) if guard.purifier else None
    lap("reconstruction", t0)

    # ---- Figure 3 ----
    adv_res = None
    if not args.skip_adaptive:
        t0 = time.time()
        scales = adaptive.clean_scale(cal_scores)
        sub = val.subset(slice(0, min(args.n_adaptive, len(val))))
        adv_res = adaptive.run(
            bench,
            sub,
            args.iterations,
            scales,
            evade_weight=args.evade_weight,
            eot_samples=args.eot_samples,
            eps=args.adaptive_eps or args.eps,
            step=args.adaptive_step
            or (args.step if args.adaptive_eps is None else args.adaptive_eps / 5),
            seed=args.seed,
            detectors=args.adaptive_detectors.split(",") if args.adaptive_detectors else None,
        )
        lap("adaptive", t0)

    # ---- throughput ----
    thr_res = None
    if not args.skip_throughput:
        t0 = time.time()
        m = min(args.n_throughput, len(val))
        hit = pgd.ok.nonzero().flatten()[:m]  # the PGD faces that disrupt G
        thr_res = throughput.run(
            bench, val.x[:m], pgd.x_adv[:m], None if val.c is None else val.c[:m],
            disrupted=(pgd.x_adv[hit], None if val.c is None else val.c[hit]),
        )  # fmt: skip
        lap("throughput", t0)

    # ---- report ----
    t0 = time.time()
    pngs = figures.make(bench, out, rec_net, magnet, seed=args.seed)
    wall = time.time() - t_start
    results = {
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "commit": code_commit,
        "machine": machine(device),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
        "wall_s": round(wall, 1),
        "timings_s": timings,
        "settings": {k: v for k, v in vars(args).items() if k not in ("note",)},
        "notes": args.note,
        "generator": {
            "source": str(args.generator),
            "kind": getattr(G, "meta", {}).get("kind"),
            "image_size": int(getattr(G, "image_size", 0)),
            "task": getattr(G, "task", None),
            "digest": weights_digest(G),
        },
        "parser": str(args.parser),
        "profile": {
            "name": guard.profile.name,
            "calibrated": calibrated,
            "threshold": guard.profile.threshold,
            "lam": guard.profile.lam,
            "meta": {
                k: v
                for k, v in guard.profile.meta.items()
                if isinstance(v, int | float | str) and not isinstance(v, bool)
            },
        },
        "data": {
            "val": f"{val.ids[0]}..{val.ids[-1]} ({len(val)})",
            "fit": len(fit),
            "cal": len(cal),
            "source": data_key,
        },
        "train": train_info,
        "thresholds": bench.thresholds,
        "threshold_source": thr_source,
        "train_fpr": cal_fpr,
        "detection": det,
        "reconstruction": {
            "tables": {
                name: {
                    k: v
                    for k, v in t.items()
                    if k in ("rows", "n", "guard", "guard_counts", "all_successful")
                }
                for name, t in rec["tables"].items()
            },
            "clean": rec["clean"],
            "held_out": rec["held_out"],
            "purifier": rec["purifier"],
        },
        "adaptive": adv_res,
        "throughput": thr_res,
        "success_check": {"pgd_rate": float(pgd.ok.double().mean())},
    }
    pngs += report.plots(results, out)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    report.write(results, out, pngs, scale_out=scaling.saved_section(out))
    log.info("wrote %s (%.0f s in all)", out / "REPORT.md", time.time() - t_start)
    return 0


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    return v


if __name__ == "__main__":
    raise SystemExit(main())
