"""Measure the default models against their bars on the validation split (issue 3).

Parser (:mod:`training.parser`):

- IoU on Face Synthetics ``000070``–``000079`` (warped into the CelebA framing) over background,
  skin, brows, eyes, nose, lips, hair, neck; bar: mean ≥ 0.65;
- on the real CelebA validation faces ``008001``–``009000``: IoU against the dlib-landmark
  pseudo-labels (skin core, brows, eyes, nose, lips: the only real labels there are) and the
  share of pixels given to each region (a collapsed parser shows up as a zero share).

Generator (:mod:`training.stargan`), for each target attribute (hair colours: set that colour;
Male/Young: flip the face's own label; everything else at ``G.neutral``):

- hair colours: mean ``|G(x,c) − x|`` inside the parser's hair region ≥ 2× the mean outside;
- PSNR(G(x,c), x) over the pixels outside ``G.target_regions(c)`` (regions from the parser on x)
  ≥ 22 dB (data range 2, i.e. the same as on [0,1] images);
- recognisability: the *evaluation* classifier (:mod:`training.classifier` ``eval``, never
  used in G's training) finds the requested value in G's output for ≥ 80% of faces (StarGAN's
  classification accuracy). Reported over all faces and over the faces whose own label differs.
  For hair colours a second classifier (``hair``, same module) that sees only the input face's
  hair region reports the same, beside it: an edit recognised by ``eval`` but not by ``hair``
  changed something else than the hair.

A generator smaller than the data (``image_size`` 64, issue 3's fallback) is measured at its
own size: faces area-shrunk (:func:`training.data.shrink`), the parser run on the 128×128
face and its probabilities averaged down; the classifiers see G's output upsampled to 128, and
their accuracy on real faces treated the same way is reported beside their full-size accuracy.

``--G recolour`` evaluates :class:`RecolourReference` instead of a network: the parser's hair
recoloured to the train faces' colour statistics (stage 1's pseudo-target), nothing else changed.
It shows what the bars make of a plain, localised hair recolouring.

Usage::

    python -m training.evaluate                  # everything, 1000 val faces -> runs/eval.json
    python -m training.evaluate --n 200 --only G
    python -m training.evaluate --only G --G recolour --out runs/eval_recolour.json
    python -m training.evaluate --only G --G recolour --recolour-on G.pt   # G's edits + recolour
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from magdr.faces.parsenet import ParseNet
from magdr.faces.regions import BISENET_CLASSES, CLASS_TO_REGION, REGIONS, group_regions
from magdr.models.base import Generator
from magdr.models.stargan import StarGAN
from training import data as D
from training.classifier import accuracy, hair_maps
from training.parser import iou_table, predict
from training.shared import RUNS, WEIGHTS, AttrNet, cached_region_probs, hair_only
from training.stargan import (
    NEUTRAL,
    classifier_input,
    hair_blend_mask,
    hair_colour_stats,
    recolour_hair,
    spread,
)

HAIR = BISENET_CLASSES.index("hair")


def load_G(path: Path) -> StarGAN:
    """The StarGAN checkpoint ``path`` with the metadata of its ``.json`` neighbour."""
    meta = json.loads(path.with_suffix(".json").read_text())
    sd = torch.load(path, map_location="cpu", weights_only=True)
    kw = {k: meta[k] for k in ("image_size", "attributes", "neutral") if k in meta}
    return StarGAN.from_state_dict(sd, **kw).eval()


class RecolourReference(Generator):
    """Not a network: stage 1's hair recolouring (:func:`recolour_hair`) as an "editor".

    A hair-colour request moves the parser's hair to the mean YCbCr statistics of the train faces
    with that colour (:func:`hair_colour_stats`, moved apart by :func:`spread` as in training);
    Male/Young requests return x. With a ``base`` generator the recolouring is applied to
    ``base(x, c)`` instead of x (``--recolour-on``): what the bars make of that generator's
    edits with the hair itself recoloured, i.e. the target of ``stargan.py --teacher-edits all``.
    """

    c_dim = 5

    def __init__(self, parser: ParseNet, mus: torch.Tensor, sds: torch.Tensor,
                 base: Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        self.parser, self.mus, self.sds, self.base = parser, mus, sds, base
        self.attributes, self.neutral = list(D.STARGAN_ATTRS), list(NEUTRAL)
        self.attribute_targets = {
            a: ("hair" if a.endswith("_Hair") else "face+hair") for a in self.attributes
        }

    @classmethod
    def from_train_faces(cls, parser_path: Path, parser: ParseNet, cel: dict,
                         factor: float = 1.5, base: Generator | None = None
                         ) -> RecolourReference:  # fmt: skip
        """Colour statistics from the train split's hair maps (``--hair-spread`` default 1.5)."""
        train = np.arange(len(D.CELEBA_TRAIN))
        hair = cached_region_probs(parser_path, cel["images"])[train, 0]  # stargan.py's cache
        mus, sds = hair_colour_stats(cel["images"][train], hair, cel["attrs"][train])
        return cls(parser, spread(mus, factor), sds, base)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        assert c is not None
        edited = x if self.base is None else self.base(x, c)
        hair = hair_blend_mask(self.parser(x).softmax(1)[:, HAIR : HAIR + 1])
        k = c[:, :3].argmax(1)
        y = recolour_hair(edited, hair, k, self.mus.to(x), self.sds.to(x))
        return torch.where((c[:, :3].sum(1) > 0)[:, None, None, None], y, edited)


def eval_parser(parser: ParseNet, cel: dict, fs: dict, n: int) -> dict:
    """Parser metrics: Face Synthetics val IoU, CelebA val pseudo-label IoU, region shares."""
    anchor = D.celeba_mean_anchor(cel)
    pairs = [D.fs_warp(fs["images"][i], fs["labels"][i], fs["anchor"][i], anchor) for i in D.FS_VAL]
    fs_pred = predict(parser, np.stack([p[0] for p in pairs]))
    fs_iou = iou_table(fs_pred, np.stack([p[1] for p in pairs]))
    val = np.arange(len(D.CELEBA_TRAIN), len(D.CELEBA_TRAIN) + n)
    val = val[cel["detected"][val]]
    pred = predict(parser, cel["images"][val])
    lab = np.stack([D.landmark_labels(cel["landmarks"][i]) for i in val])
    cel_iou = iou_table(pred, lab)
    cel_iou = {k: v for k, v in cel_iou.items() if k in ("skin", "brows", "eyes", "nose", "lips")}
    cel_iou["mIoU"] = float(np.mean(list(cel_iou.values())))
    share = {r: 0.0 for r in REGIONS}
    for j, c in enumerate(BISENET_CLASSES):
        share[CLASS_TO_REGION[c]] += float((pred == j).mean())
    hair_faces = float(((pred == HAIR).mean((1, 2)) > 0.02).mean())
    return {
        "facesynthetics_val_iou": fs_iou,
        "celeba_val_landmark_iou": cel_iou,
        "celeba_val_region_share": share,
        "celeba_val_faces_with_hair": hair_faces,
        "celeba_val_faces": len(val),
    }


def psnr_masked(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (data range 2) over the pixels where ``m`` ``[B,1,H,W]`` is 1."""
    se = ((a - b) ** 2).mean(1, keepdim=True) * m
    mse = se.sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp(min=1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


@torch.no_grad()
def eval_generator(G: Generator, parser: ParseNet, clf: AttrNet, cel: dict, n: int,
                   batch: int = 25, device: str | torch.device = "cpu",
                   hair_clf: AttrNet | None = None) -> dict:  # fmt: skip
    """Generator metrics per target attribute (see the module docstring)."""
    G, parser, clf = G.to(device), parser.to(device), clf.to(device)
    hair_clf = hair_clf.to(device) if hair_clf is not None else None
    val = np.arange(len(D.CELEBA_TRAIN), len(D.CELEBA_TRAIN) + n)
    names = list(G.attributes)
    acc: dict[str, dict[str, list]] = {
        t: {
            "ok": [],
            "ok_hair": [],
            "changed": [],
            "psnr": [],
            "in": [],
            "out": [],
            "nin": [],
            "nout": [],
        }
        for t in [*names, "keep"]
    }
    parser.eval()
    size = int(G.image_size)  # 64 for issue 3's fallback: measured at G's own size
    for s in tqdm(range(0, len(val), batch), desc="evaluate G"):
        idx = val[s : s + batch]
        x_full = D.to_tensor(cel["images"][idx]).to(device)
        x = D.to_tensor(D.shrink(cel["images"][idx], size)).to(device)
        real = torch.from_numpy(cel["attrs"][idx]).to(device)
        probs_full = parser(x_full).softmax(1)
        probs = torch.nn.functional.avg_pool2d(probs_full, x_full.shape[-1] // size)
        lab = probs.argmax(1)
        onehot = torch.nn.functional.one_hot(lab, len(BISENET_CLASSES)).permute(0, 3, 1, 2).float()
        regions = group_regions(onehot)
        hair = (lab == HAIR).float()[:, None]
        neutral = torch.tensor(G.neutral, device=device).expand(len(idx), -1)
        for t in [*names, "keep"]:
            c = neutral.clone()
            j = names.index(t) if t != "keep" else -1
            if t.endswith("_Hair"):
                c[:, j] = 1.0
                want = torch.ones(len(idx), device=device)
                changed = ~((real[:, j] == 1) & (real[:, :3].sum(1) == 1))
            elif t != "keep":
                c[:, j] = 1 - real[:, j]
                want, changed = c[:, j], torch.ones(len(idx), dtype=torch.bool, device=device)
            y = G(x, c)
            tm = (regions * G.target_regions(c)[:, :, None, None]).sum(1, keepdim=True)
            if t == "keep":
                tm = torch.zeros_like(tm)  # nothing asked: the whole face must come back
            rec = acc[t]
            rec["psnr"] += psnr_masked(y, x, 1 - tm).tolist()
            d = (y - x).abs().mean(1, keepdim=True)
            rec["in"].append(float((d * hair).sum()))
            rec["nin"].append(float(hair.sum()))
            rec["out"].append(float((d * (1 - hair)).sum()))
            rec["nout"].append(float((1 - hair).sum()))
            if t != "keep":
                y_cls = classifier_input(y, x_full.shape[-1])  # the classifiers' 128×128
                pred = (clf(y_cls)[:, j] > 0).float()
                rec["ok"] += (pred == want).tolist()
                if hair_clf is not None and t.endswith("_Hair"):
                    seen = hair_clf(hair_only(y_cls, probs_full[:, HAIR : HAIR + 1]))[:, j] > 0
                    rec["ok_hair"] += (seen.float() == want).tolist()
                rec["changed"] += changed.tolist()
    out = {}
    for t, rec in acc.items():
        din = sum(rec["in"]) / max(sum(rec["nin"]), 1)
        dout = sum(rec["out"]) / max(sum(rec["nout"]), 1)
        r = {
            "psnr_non_target_mean": float(np.mean(rec["psnr"])),
            "psnr_non_target_median": float(np.median(rec["psnr"])),
            "hair_diff": din,
            "outside_hair_diff": dout,
            "hair_ratio": din / max(dout, 1e-8),
        }
        if rec["ok"]:
            ok, ch = np.array(rec["ok"], bool), np.array(rec["changed"], bool)
            r["recognised_all"] = float(ok.mean())
            r["recognised_changed"] = float(ok[ch].mean()) if ch.any() else math.nan
        if rec["ok_hair"]:
            ok, ch = np.array(rec["ok_hair"], bool), np.array(rec["changed"], bool)
            r["hair_only_recognised_all"] = float(ok.mean())
            r["hair_only_recognised_changed"] = float(ok[ch].mean()) if ch.any() else math.nan
        out[t] = r
    return out


def bars(res: dict) -> dict[str, bool]:
    """Pass/fail of each issue-3 bar in ``res``."""
    b: dict[str, bool] = {}
    if "parser" in res:
        b["parser FS mIoU >= 0.65"] = res["parser"]["facesynthetics_val_iou"]["mIoU"] >= 0.65
    if "G" in res:
        g = res["G"]
        for t in D.STARGAN_ATTRS:
            if t.endswith("_Hair"):
                b[f"{t}: hair ratio >= 2"] = g[t]["hair_ratio"] >= 2
            b[f"{t}: PSNR non-target >= 22"] = g[t]["psnr_non_target_mean"] >= 22
            b[f"{t}: recognised >= 80%"] = g[t]["recognised_all"] >= 0.8
    return b


def markdown(res: dict) -> str:
    """The tables pasted into MODEL_CARD.md."""
    lines = []
    if "parser" in res:
        p = res["parser"]
        for title, tab in [
            ("Face Synthetics val IoU", p["facesynthetics_val_iou"]),
            ("CelebA val, IoU vs landmark pseudo-labels", p["celeba_val_landmark_iou"]),
            ("CelebA val, pixel share", p["celeba_val_region_share"]),
        ]:
            lines += [
                f"| {title} | " + " | ".join(tab) + " |",
                "|---" * (len(tab) + 1) + "|",
                "| ParseNet | " + " | ".join(f"{v:.3f}" for v in tab.values()) + " |",
                "",
            ]
        lines += [
                  f"Faces with > 2% hair pixels: {p['celeba_val_faces_with_hair']:.3f} "
                  f"of {p['celeba_val_faces']}.", ""]  # fmt: skip
    if "G" in res:
        lines += ["| target | PSNR non-target (mean / median) dB | hair ratio | "
                  "recognised (all / changed faces) | hair-only classifier (all / changed) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for t, r in res["G"].items():
            rec, rec_hair = (
                f"{r[k + 'all']:.3f} / {r[k + 'changed']:.3f}" if k + "all" in r else "–"
                for k in ("recognised_", "hair_only_recognised_")
            )
            ratio = f"{r['hair_ratio']:.2f}" if t.endswith("_Hair") else f"({r['hair_ratio']:.2f})"
            psnr = f"{r['psnr_non_target_mean']:.2f} / {r['psnr_non_target_median']:.2f}"
            lines.append(f"| {t} | {psnr} | {ratio} | {rec} | {rec_hair} |")
        lines.append("")
    for key, name in [("real_classifier_accuracy", "Evaluation classifier"),
                      ("real_classifier_accuracy_at_G_size",
                       "Evaluation classifier (faces shrunk to G's size, upsampled)"),
                      ("real_hair_classifier_accuracy", "Hair-only classifier")]:  # fmt: skip
        if key in res:
            lines += [f"{name} accuracy on real val faces: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in res[key].items()), ""]  # fmt: skip
    lines += [f"- {'PASS' if ok else 'FAIL'}: {k}" for k, ok in bars(res).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--G",
        type=Path,
        default=WEIGHTS / "default_G.pt",
        help="a StarGAN checkpoint, or 'recolour' (RecolourReference)",
    )
    ap.add_argument(
        "--recolour-on",
        type=Path,
        default=None,
        help="with --G recolour: recolour the hair of this StarGAN's output, not x's",
    )
    ap.add_argument("--parser", type=Path, default=WEIGHTS / "parser.pt")
    ap.add_argument("--classifier", type=Path, default=RUNS / "classifier/eval.pt")
    ap.add_argument(
        "--hair-classifier",
        type=Path,
        default=RUNS / "classifier/hair.pt",
        help="the hair-only classifier (skipped when the file is missing)",
    )
    ap.add_argument("--n", type=int, default=1000, help="validation faces (from 008001)")
    ap.add_argument("--only", choices=["parser", "G"], default=None)
    ap.add_argument("--out", type=Path, default=RUNS / "eval.json")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where G is evaluated (cpu | cuda)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cel = D.load_celeba(a.data)
    parser = ParseNet.from_state_dict(torch.load(a.parser, map_location="cpu", weights_only=True))
    parser.eval()
    res: dict = {"n_val": a.n}
    if a.only in (None, "parser"):
        res["parser"] = eval_parser(parser, cel, D.load_facesynthetics(a.data), a.n)
    if a.only in (None, "G"):
        sd = torch.load(a.classifier, map_location="cpu", weights_only=True)
        clf = AttrNet.from_state_dict(sd).eval()
        val = np.arange(len(D.CELEBA_TRAIN), len(D.CELEBA_TRAIN) + a.n)
        ra = accuracy(clf, cel["images"][val], cel["attrs"][val])
        res["real_classifier_accuracy"] = dict(zip(D.STARGAN_ATTRS, ra.tolist(), strict=True))
        if str(a.G) == "recolour":
            base = load_G(a.recolour_on) if a.recolour_on is not None else None
            G: Generator = RecolourReference.from_train_faces(a.parser, parser, cel, base=base)
        else:
            G = load_G(a.G)
        if G.image_size != D.SIZE:
            # What the classifier makes of real faces at G's size, upsampled as G's output is.
            small = D.to_tensor(D.shrink(cel["images"][val], int(G.image_size)))
            back_up = ((classifier_input(small, D.SIZE) + 1) * 127.5).round().clamp(0, 255)
            ra = accuracy(clf, back_up.byte().permute(0, 2, 3, 1).numpy(), cel["attrs"][val])
            res["real_classifier_accuracy_at_G_size"] = dict(zip(D.STARGAN_ATTRS, ra.tolist(),
                                                                 strict=True))  # fmt: skip
        hair_clf = None
        if a.hair_classifier.exists():
            sd = torch.load(a.hair_classifier, map_location="cpu", weights_only=True)
            hair_clf = AttrNet.from_state_dict(sd).eval()
            hair = hair_maps(cel["images"], a.parser)[val]
            ra = accuracy(hair_clf, cel["images"][val], cel["attrs"][val], hair)
            names = D.STARGAN_ATTRS[:3]
            res["real_hair_classifier_accuracy"] = dict(zip(names, ra[:3].tolist(), strict=True))
        res["G"] = eval_generator(G, parser, clf, cel, a.n, device=a.device, hair_clf=hair_clf)
    res["bars"] = bars(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))  # noqa: T201 - a command-line report
    return res


if __name__ == "__main__":
    main()
