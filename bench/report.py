"""``REPORT.md`` and its PNGs (matplotlib, Agg backend) from the results of one run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import MAGDR
from bench.reconstruction import MAGDR as GUARDED
from bench.reconstruction import NO_DEFENCE, best_baseline


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(t: torch.Tensor) -> np.ndarray:
    return ((t.detach().cpu().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def grid(
    path: Path,
    rows: list[tuple[str, torch.Tensor]],
    title: str,
    col_labels: list[str] | None = None,
) -> str:
    """Save an image grid: one labelled row per ``(label, images [K,3,H,W])``, titled columns."""
    import textwrap

    plt = _plt()
    k = max(len(t) for _, t in rows)
    fig, axes = plt.subplots(
        len(rows), k, figsize=(1.5 * k + 1.0, 1.5 * len(rows) + 0.6), squeeze=False
    )
    for r, (label, imgs) in enumerate(rows):
        for j in range(k):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(imgs):
                ax.imshow(_img(imgs[j]))
            if r == 0 and col_labels and j < len(col_labels):
                ax.set_title(textwrap.fill(col_labels[j], 16), fontsize=6)
            if j == 0:
                ax.set_ylabel(
                    textwrap.fill(label, 14), fontsize=7, rotation=0, ha="right", va="center"
                )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """ROC curves per attack and the Figure 3 curve; returns the PNG names."""
    plt = _plt()
    names = []
    roc = results["detection"]["roc"]
    attacks = list(roc)
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.6 * len(attacks), 3.6), squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        rows = results["detection"]["rows"][attack]["all"]
        for det, curve in roc[attack].items():
            auc = rows[det]["auroc"]
            ax.plot(
                curve["fpr"], curve["tpr"], label=f"{det} ({auc:.2f})", lw=2 if det == MAGDR else 1
            )
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ok = results["detection"]["success"][attack]
        ax.set_title(f"{attack} ({ok['ok']}/{ok['n']} successful)", fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    names.append("roc.png")

    adv = results.get("adaptive")
    if adv:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for det, cur in adv["curves"].items():
            xs = [p["iterations"] for p in cur["points"]]
            ys = [p["f1"] for p in cur["points"]]
            style = "-o" if cur["attacked"] == det else "--."
            ax.plot(xs, ys, style, label=det, lw=2 if det == MAGDR else 1, ms=4)
        ax.set_xscale("log")
        ax.set_xticks(adv["iterations"])
        ax.set_xticklabels([str(i) for i in adv["iterations"]])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("adaptive attack iterations")
        ax.set_ylabel("F1")
        ax.set_title("Defence-aware attacks (Fig. 3)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fig3_adaptive.png", dpi=110)
        plt.close(fig)
        names.append("fig3_adaptive.png")
    return names


def _f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


#: Sections other commands write into ``REPORT.md`` (``python -m bench.soak --report``); a run of
#: ``python -m bench`` keeps them as they are.
OWN_SECTIONS = ("## Soak", "## Video")


def section(text: str, heading: str) -> str:
    """The ``heading`` section of markdown ``text``, up to the next ``## `` (``''`` if none)."""
    lines = text.splitlines(keepends=True)
    if heading + "\n" not in lines:
        return ""
    start = lines.index(heading + "\n")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[start:end])


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def put_section(path: Path, heading: str, body: str) -> None:
    """Replace the ``heading`` section of markdown file ``path`` with ``body``, or append it."""
    text = path.read_text() if path.exists() else ""
    old = section(text, heading)
    body = body.rstrip("\n") + "\n\n"
    if old:
        text = text.replace(old, body, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text.rstrip("\n") + "\n")


def write(
    results: dict[str, Any], out: Path, pngs: list[str], scale_out: list[str] | None = None
) -> Path:
    """Write ``REPORT.md`` (every number from ``results``, i.e. from this run).

    The :data:`OWN_SECTIONS` of an existing ``REPORT.md`` are kept. ``scale_out`` is the
    throughput section's last subsection, ``python -m bench.scaling``'s own (its
    ``saved_section``, kept across runs of the bench); the caller reads it, so that this writer
    sits below the stages that use it and imports none of them.
    """
    r = results
    m = r["machine"]
    s = r["settings"]
    det = r["detection"]
    lines = [
        "# MagDR benchmark report",
        "",
        "Every number below comes from one run of the committed code:",
        "",
        f"- command: `{r['command']}`",
        f"- commit: `{r['commit']}`",
        f"- machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} CPU cores, torch {m['torch']}, "
        f"device `{m['device']}`, host `{m['host']}`, load average at the end "
        f"{', '.join(f'{v:.1f}' for v in m.get('load_avg', []))}",
        f"- started {r['started_utc']} UTC, wall time {r['wall_s'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in r['timings_s'].items())})",
        f"- generator: `{r['generator']['source']}` ({r['generator']['kind']}, "
        f"{r['generator']['image_size']}×{r['generator']['image_size']}, task "
        f"{r['generator']['task']}, weights {r['generator']['digest']}); parser `{r['parser']}`; "
        f"profile `{r['profile']['name']}` (λ = {_f(r['profile']['lam'], 4)}, threshold "
        f"{_f(r['profile']['threshold'], 4)})",
        f"- faces: validation {r['data']['val']} (data: {r['data']['source']}); baselines trained "
        f"on {r['data']['fit']} train faces, thresholds set on {r['data']['cal']} other train "
        "faces (CelebA 000001–008000 only)",
    ]
    meta = r["profile"].get("meta") or {}
    if meta:
        shown = ", ".join(
            f"{k} {v if not isinstance(v, float) else _f(v, 3)}" for k, v in list(meta.items())[:14]
        )
        lines += [f"- profile calibration (its own record): {shown}"]
    lines += [f"- note: {n}" for n in r.get("notes", [])]
    if s["n"] < 1000 or s.get("quick"):
        lines += [
            f"- **reduced run**: {s['n']} of the 1000 validation faces"
            + (
                f", Figure 3 on {s['n_adaptive']} faces up to {max(s['iterations'])} iterations"
                if not s.get("skip_adaptive")
                else ""
            )
            + "; the full run (`python -m bench`, 1000 faces, 10–200 adaptive iterations) is "
            "meant for a GPU. Small samples make every number below noisy."
        ]
    lines += [
        "",
        "## Protocol",
        "",
        f"- Attacks (defence-unaware, on G alone): PGD ε {s['eps']}, step {s['step']}, "
        f"{s['steps']} iterations, random start"
        + (
            " (Ruiz et al.)"
            if (s["eps"], s["step"], s["steps"]) == (0.05, 0.01, 10)
            else " (**not** Ruiz et al.'s ε 0.05, step 0.01, 10 iterations)"
        )
        + "; I-FGSM (same, no random start); "
        f"C&W-L2 ({s['cw_steps']} Adam steps, const 0.05); targeted PGD (Eq. 2, same ε and steps, "
        "towards another face's clean output). An attack is a positive only when it succeeded: "
        f"MSE(G(x̂), G(x)) > {s['success_mse']}"
        + (" (Ruiz et al.)." if s["success_mse"] == 0.05 else " (NOT Ruiz et al.'s 0.05)."),
        "- Negatives: the clean validation faces and their benign copies (JPEG q75, down-up "
        "resize ×0.75, Gaussian blur σ 0.6), so false alarms on ordinary processing count.",
        f"- Thresholds: every detector's threshold gives {s['fpr']:.0%} false positives on clean "
        "(+ benign) **train** faces — the same rule MagDR's calibration uses; MagDR itself uses "
        "its calibrated profile threshold when the profile is calibrated. DD and CD are MagDR's "
        "S_dist and S_cons alone (paper's ablation), each with its own threshold.",
        "- Baselines: feature squeezing (Xu et al.: bit depth 5, median 2×2 and 3×3; score = max "
        "L1 between G's outputs); MagNet (Meng & Chen: conv auto-encoder trained on clean train "
        "faces with noise; detector = L1 reconstruction error, reformer = AE(x)); OTD (a CNN on "
        "G's outputs trained on train-split clean/benign vs successful PGD and I-FGSM outputs"
        + (
            f": {r['train']['otd_positives']} of them)."
            if "otd_positives" in r["train"]
            else ", loaded from the cache)."
        )
        + f" Training: {r['train']['ae']['steps']} auto-encoder steps, "
        f"{r['train']['otd']['steps']} OTD steps.",
        "- Pixel deflection is simplified: uniformly chosen pixels (no class-activation map, which "
        "an image-to-image model lacks), 200 deflections per 224² scaled to the image, window 10, "
        "Haar BayesShrink soft wavelet denoising in YCbCr. Resize-and-pad (Xie) shrinks to a "
        "random side in [0.9 S, S] and zero-pads back to S (G takes exactly S×S).",
        "",
        "Thresholds and their false-positive rate on the calibration faces:",
        "",
    ]
    lines += _table(
        ["detector", "threshold", "train FPR", "set by"],
        [
            [n, _f(r["thresholds"][n], 4), _f(r["train_fpr"][n]), r["threshold_source"][n]]
            for n in r["thresholds"]
        ],
    )

    lines += ["", "## Table 1 — detection (defence-unaware attacks)", ""]
    lines += [f"Negatives: {det['n_neg']}. The attacks on the validation faces:", ""]
    lines += _table(
        [
            "attack",
            "successful (positives)",
            "median MSE(G(x̂), G(x))",
            "mean MSE",
            "mean ‖x̂ − x‖∞",
            "seconds",
        ],
        [
            [
                a,
                f"{v['ok']}/{v['n']}",
                _f(v.get("mse_median"), 4),
                _f(v.get("mse_mean"), 4),
                _f(v.get("linf_mean"), 3),
                _f(float(det["attack_s"][a]), 0),
            ]
            for a, v in det["success"].items()
        ],
    )
    lines += [""]
    if det.get("ruiz_pgd"):
        v = det["ruiz_pgd"]
        lines += [
            f"For comparison, PGD at Ruiz et al.'s exact setting (ε 0.05, step 0.01, 10 "
            f"iterations) succeeds on {v['ok']}/{v['n']} of these faces (output MSE median "
            f"{_f(v['mse_median'], 4)}, max {_f(v['mse_max'], 4)}); this run uses ε {s['eps']}.",
            "",
        ]
    groups = det["groups"]
    attacks = list(det["rows"])
    dets = list(det["rows"][attacks[0]]["all"])
    lines += [
        "Precision / recall / F1 at each detector's threshold, per task group "
        + ("(hair: hair-colour edits; face: Male/Young flips) " if len(groups) > 1 else "")
        + "— the paper's Table 1 layout:",
        "",
    ]
    labels = det.get("group_labels", {})
    header = ["detector", "attack"] + [
        f"{labels.get(g, g)} {k}" for g in groups for k in ("P", "R", "F1")
    ]
    rows = []
    for d in dets:
        for attack in attacks:
            cells = []
            for g in groups:
                v = det["rows"][attack][g][d]
                cells += [_f(v["precision"]), _f(v["recall"]), _f(v["f1"])]
            rows.append([d, attack, *cells])
    lines += _table(header, rows)
    lines += [
        "",
        "Threshold-free numbers (all task groups together): AUROC, false-positive rate at 95% "
        "true-positive rate, and the false-positive rate at the threshold on the validation "
        "negatives:",
        "",
    ]
    header = ["detector"] + [f"{a}: AUROC / FPR@95%TPR / FPR" for a in attacks]
    rows = []
    for d in dets:
        cells = []
        for attack in attacks:
            v = det["rows"][attack]["all"][d]
            cells.append(f"{_f(v['auroc'])} / {_f(v['fpr@95tpr'])} / {_f(v['fpr'])}")
        rows.append([d, *cells])
    lines += _table(header, rows)
    lines += [""]

    lines += _reconstruction(r["reconstruction"], s)

    adv = r.get("adaptive")
    lines += ["## Figure 3 — defence-aware (adaptive) attacks", ""]
    if adv:
        lines += [
            f"{adv['n']} validation faces (negatives: their {adv['n_neg']} clean + benign "
            f"copies). Each detector is attacked with its own knowledge: PGD (ε {adv.get('eps')}, "
            f"step {adv.get('step')}) "
            "on the EoT mean over its input transforms (BPDA for JPEG/median/bit depth) of the "
            f"disruption MSE, minus λ_e = {adv['evade_weight']} × "
            "relu((score − threshold)/σ_clean); MagDR's pool is its consistency transforms and "
            "every Rec-Net candidate, and its learned purifier (full gradient) in every step's "
            "draw when the guard has one. Positives "
            "are the attacks that still disrupt G. DD and CD are judged on the attacks made "
            "against MagDR.",
            "",
        ]
        its = adv["iterations"]
        rows = []
        for det_name, cur in adv["curves"].items():
            rows.append(
                [
                    det_name,
                    *[f"{_f(p['f1'])} ({_f(p['success'])})" for p in cur["points"]],
                    _f(float(cur["seconds"]), 0),
                ]
            )
        lines += _table(["detector", *[f"{i} it." for i in its], "attack s"], rows)
        lines += ["", "Cells: F1 (share of attacks that still disrupt G).", ""]
        rows = [
            [det_name, *[_f(p.get("auroc")) for p in cur["points"]]]
            for det_name, cur in adv["curves"].items()
        ]
        lines += ["AUROC of the same detectors on the same faces:", ""]
        lines += _table(["detector", *[f"{i} it." for i in its]], rows)
        lines += [""]
    else:
        lines += ["Skipped in this run (`--skip-adaptive`).", ""]

    tp = r.get("throughput")
    lines += ["## Throughput", ""]
    if tp:
        rows = [
            [k, _f(v["faces_per_s"], 1), f"{v['ratio']:.3g}", f"{1 / v['ratio']:.2f}×",
             _f(v.get("peak_mem_mib"), 0)]
            for k, v in tp.items()
            if isinstance(v, dict)
        ]  # fmt: skip
        lines += [
            f"Batch {tp['batch']} unless named (each ratio against plain G at the same batch),"
            f" measured in this run on `{m['device']}`"
            + (f"; process peak RSS {tp['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in tp else "")
            + ".",
            "",
        ]
        lines += _table(
            ["", "faces/s", "ratio to plain G", "cost per face (plain G = 1)", "peak GPU MiB"],
            rows,
        )
        lines += [""]
    else:
        lines += ["Skipped in this run.", ""]
    lines += scale_out or []

    lines += ["## Figures", ""]
    if any(p.startswith(("fig1_", "fig4_")) for p in pngs):
        lines += [
            "`fig1_magdr.png` and `fig4_defences.png` (the paper's Figures 1 and 4: input, "
            "disrupted output, reconstructed input, recovered output) show faces of the demo clip "
            "bundled with the daemon (MIT), PGD-disrupted under the daemon's default edit "
            "(Blond_Hair), not CelebA's, so they are committed.",
            "",
        ]
    lines += [f"![{p}]({p})" for p in pngs]
    lines += [""]
    path = out / "REPORT.md"
    old = path.read_text() if path.exists() else ""
    path.write_text("\n".join(lines) + "\n")
    for heading in OWN_SECTIONS:
        if kept := section(old, heading):
            put_section(path, heading, kept)
    return path


#: Table 2's columns: (key, header, digits).
_REC_KEYS = [
    ("mse_i", "MSE (I)", 2),
    ("ssim_i", "SSIM (I)", 3),
    ("psnr_i", "PSNR (I)", 2),
    ("feat_i", "Feature sim. (I)", 3),
    ("mse_o", "MSE (O)", 2),
    ("ssim_o", "SSIM (O)", 3),
    ("psnr_o", "PSNR (O)", 2),
    ("feat_o", "Feature sim. (O)", 3),
    ("success_after", "still disrupted", 2),
    ("seconds", "seconds", 1),
]


def _pooled_psnr(mse_255: float) -> float:
    """PSNR of a mean MSE on the 0–255 scale (a face left unchanged has no PSNR of its own)."""
    return math.inf if mse_255 <= 0 else 10 * math.log10(255.0**2 / mse_255)


def _reconstruction(rec: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """Table 2: a summary over the attacks, then one table per attack, then clean faces."""
    tables, pur = rec["tables"], rec.get("purifier")
    lines = ["## Table 2 — reconstruction of disrupted inputs", ""]
    if pur and pur.get("attacks"):
        stages = [pur]
        while isinstance(stages[-1].get("init"), dict):
            stages.append(stages[-1]["init"])
        steps = sum(int(st.get("steps", 0)) for st in stages)
        minutes = sum(float(st.get("wall_s", 0)) + st.get("pool_s", 0) for st in stages) / 60
        trained = pur.get("attacks", [])
        unseen = [*([] if "cw" in trained else ["C&W-L2"]), "targeted PGD"]
        if s.get("held_out_eps", math.inf) > max(pur.get("eps") or [0]):
            unseen.append(rec["held_out"])
        lines += [
            f"The guard's purifier (`magdr/models/weights/purifier.pt`) was trained on "
            f"{pur.get('faces')} CelebA train faces attacked by {', '.join(trained)}"
            f" (PGD and I-FGSM at ε {', '.join(str(e) for e in pur.get('eps', []))}) only "
            f"(`python -m training.purifier`, {steps} steps in {len(stages)} stage(s), "
            f"{minutes:.0f} min on `{pur.get('device')}` with its attack pool): "
            f"{_and(unseen)} are attacks it never saw.",
            "",
        ]
    lines += [
        "(I): clean input x vs reconstructed input x*; (O): G(x) vs G(x*). MSE on the 0–255 "
        "scale; feature similarity = cosine of G's internal maps Φ_l. 'still disrupted' = share "
        f"of faces whose output after the defence is still > {s['success_mse']} MSE from G(x). "
        "Each attack's faces are the validation faces it disrupted.",
        "",
        "Summary: MagDR (the shipped guard) against the best baseline of the same attack.",
        "",
    ]
    rows = []
    for name, t in tables.items():
        rs = t["rows"]
        base = best_baseline(rs)
        ours, none = rs[GUARDED], rs[NO_DEFENCE]
        rows.append([
            name, str(t["n"]), _f(ours["psnr_o"]), f"{_f(rs[base]['psnr_o'])} ({base})",
            f"{ours['psnr_o'] - rs[base]['psnr_o']:+.2f}", _f(ours["ssim_o"], 3),
            f"{_f(ours['psnr_i'])} / {_f(none['psnr_i'])}", _f(ours["success_after"], 3),
        ])  # fmt: skip
    lines += _table(
        ["attack", "faces", "MagDR PSNR (O)", "best baseline PSNR (O)", "gain dB", "MagDR SSIM (O)",
         "PSNR (I): MagDR / attacked", "still disrupted"],
        rows,
    )  # fmt: skip
    lines += [""]
    for name, t in tables.items():
        which = "" if t.get("all_successful", True) else " (**none succeeded**: all attempts)"
        lines += [f"### {name}: {t['n']} disrupted faces{which}", ""]
        for guard_name, g in (t.get("guard_counts") or {}).items():
            lines += [
                f"- {guard_name}: flagged {g['flagged']}/{t['n']}, brought {g['recovered']} below "
                f"its threshold" + (f", {g['purifier_only']} by the purifier alone"
                                    if g.get("purifier_only") else "") + "."
            ]  # fmt: skip
        lines += [""]
        lines += _table(
            ["method", *[k[1] for k in _REC_KEYS]],
            [[m, *[_f(v[k], d) for k, _, d in _REC_KEYS]] for m, v in t["rows"].items()],
        )
        lines += [""]
    clean = rec.get("clean")
    if clean:
        lines += [f"### Clean faces ({clean['n']} validation faces, not attacked)", ""]
        rows = [
            [m, _f(v["mse_i"]), _f(_pooled_psnr(v["mse_i"])), _f(v["mse_o"]),
             _f(_pooled_psnr(v["mse_o"])), _f(v["ssim_o"], 4),
             str(v["flagged"]) if "flagged" in v else "all"]
            for m, v in clean.items() if isinstance(v, dict)
        ]  # fmt: skip
        lines += _table(
            ["through", "MSE (I)", "PSNR (I), pooled", "MSE (O)", "PSNR (O), pooled",
             "SSIM (O)", "faces changed"],
            rows,
        )  # fmt: skip
        lines += [
            "",
            "The guard changes only the faces it flags (false alarms); the purifier row applies P "
            "to every clean face, i.e. what a false alarm cured by P costs. 'pooled': the PSNR "
            "of the mean MSE (an unchanged face has no PSNR of its own).",
            "",
        ]
    return lines
