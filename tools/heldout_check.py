"""Held-out spot checks of a generator + parser + profile, as the model card reports them.

Every face is asked for the daemon's default edit (``Blond_Hair=1``) and scored by
``Guard.detect``; it prints how many are flagged:

- the first ``--n`` CelebA validation faces (clean);
- face crops of real clips framed by the daemon (``python -m daemon.face_crops``), ``--per-clip``
  of each source clip, for each ``--crops`` file;
- the validation faces PGD (Ruiz et al.'s budget) disrupted, i.e. moved G's output by MSE > 0.05;
- the same attacks carried by a video frame (``--resample``, see :func:`resampled`): the demo's
  red team attacks the 128×128 crop and adds the perturbation, resized, to the frame.

Usage::

    python -m daemon.face_crops --out runs/clips.npz --every 5 \
        ../shared/data/videos/{d3,d6,d9,s13,d0}.mp4
    python tools/heldout_check.py --crops runs/clips.npz                  # the shipped pair
    python tools/heldout_check.py --parser new.pt --profile new.json --crops runs/clips.npz
    python tools/heldout_check.py --generator cand/G.pt --profile cand/profile.json ...
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
import torch

import magdr
from bench.common import success
from magdr.celeba import CELEBA_VAL, load_celeba, to_tensor

EDIT = {"Blond_Hair": 1}


def scores(guard: magdr.Guard, x: torch.Tensor, batch: int = 20) -> torch.Tensor:
    """S_final of faces x under the default edit."""
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        out.append(guard.detect(xb, magdr.condition(guard.G, EDIT, batch=len(xb))).score.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def resampled(x: torch.Tensor, x_adv: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``x_adv`` as the daemon sees them after a video frame carried them.

    The face is drawn at ``side``×``side`` pixels, the perturbation resized onto it (bilinear, as
    ``daemon.cli.attack_file`` does), the frame rounded to 8 bits, and the face cropped back to
    G's size by the daemon's own :func:`magdr.faces.locate.crop_faces`: the attack arrives
    smoothed.
    """
    import cv2

    from magdr.faces.locate import FaceBox, crop_faces

    size = x.shape[-1]
    whole = [FaceBox(0, 0, side, side, 1.0)]

    def crop(frame: np.ndarray) -> torch.Tensor:
        pixels = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
        return crop_faces(pixels, whole, size, scale=1.0, shift=0.0)[0][0]

    def up(img: torch.Tensor) -> np.ndarray:
        hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy() * 127.5)
        return cv2.resize(hwc, (side, side), interpolation=cv2.INTER_LINEAR)

    clean, carried = [], []
    for xi, ai in zip(x, x_adv, strict=True):
        face = up(xi) + 127.5
        clean.append(crop(face))
        carried.append(crop(face + up(ai - xi)))
    return torch.stack(clean), torch.stack(carried)


def flagged(guard: magdr.Guard, x: torch.Tensor) -> tuple[str, float | None]:
    """``"k/n"`` of the faces x the guard flags, and their lowest score."""
    s = scores(guard, x)
    return f"{int((s > guard.profile.threshold).sum())}/{len(s)}", (
        round(float(s.min()), 5) if len(s) else None
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the checks; print (and with ``--out`` write) the counts as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", default="default", help="'default' or a checkpoint path")
    ap.add_argument("--parser", default="default")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--n", type=int, default=40, help="CelebA validation faces")
    ap.add_argument("--crops", action="append", default=[], help=".npz from daemon.face_crops")
    ap.add_argument("--per-clip", type=int, default=15)
    ap.add_argument("--resample", type=int, default=200, help="face side in the frame (0: skip)")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    G = magdr.load_generator(a.generator)
    guard = magdr.Guard(G, parser=a.parser, profile=a.profile, device="cpu")
    thr = guard.profile.threshold
    res: dict[str, object] = {
        "generator": a.generator,
        "parser": a.parser,
        "profile": a.profile,
        "threshold": thr,
    }

    rows = np.asarray(CELEBA_VAL[: a.n]) - 1  # CelebA image k is row k - 1
    val = to_tensor(load_celeba()["images"][rows])
    res["celeba_val_flagged"] = f"{int((scores(guard, val) > thr).sum())}/{len(val)}"

    for path in a.crops:
        z = np.load(path)
        by_clip: dict[str, list[int]] = defaultdict(list)
        for i, source in enumerate(z["sources"]):  # "clip.mp4#frame"
            by_clip[str(source).split("#")[0]].append(i)
        for clip, idx in sorted(by_clip.items()):
            s = scores(guard, to_tensor(z["images"][idx[: a.per_clip]]))
            res[f"{clip}_flagged"] = f"{int((s > thr).sum())}/{len(s)}"
            res[f"{clip}_scores"] = [round(float(s.min()), 5), round(float(s.max()), 5)]

    c = magdr.condition(G, EDIT, batch=len(val))
    x_adv = magdr.attacks.pgd(G, val, c, generator=torch.Generator().manual_seed(0)).detach()
    disrupted = success(G, val, x_adv, c)
    res["pgd_disrupted_flagged"], res["pgd_lowest_score"] = flagged(guard, x_adv[disrupted])
    if a.resample:
        x_clean, x_carried = resampled(val, x_adv, a.resample)
        disrupted = success(G, x_clean, x_carried, c)
        res["pgd_resampled_flagged"], res["pgd_resampled_lowest_score"] = flagged(
            guard, x_carried[disrupted]
        )
    res["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
