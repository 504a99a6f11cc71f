"""Train the default face parser :class:`magdr.faces.parsenet.ParseNet`.

Data (fixed split, see :mod:`training.data`): Face Synthetics ``000000``–``000069`` with full
labels (mapped into BiSeNet order), warped into the CelebA framing with strong augmentation
(pose jitter, flips, colour, blur to CelebA's upscaled sharpness, noise), plus CelebA train
faces with pseudo-labels from their dlib 68 landmarks (skin core, brows, eyes, nose, lips; the
rest ignored) so the net also sees real skin, eyes and lips.

Usage::

    nice -n 10 python -m training.parser --steps 1200          # CPU, ~25 min
    python -m training.parser --resume                           # continue a run
    python -m training.parser --smoke                            # 2 steps, 4 images, temp dir
    # a smaller parser taught by the shipped one (what the guard's clean path can afford)
    python -m training.parser --teacher magdr/models/weights/parser.pt --width 8 --depth 5
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from magdr.faces.parsenet import ParseNet
from magdr.faces.regions import BISENET_CLASSES
from training import data as D
from training.common import (
    Budget,
    LossLog,
    load_ckpt,
    log,
    save_ckpt,
    seed_all,
    setup_logging,
    smoke_settings,
    tensor_state_dict,
)
from training.shared import WEIGHTS

#: Classes the parser bar is measured on; each groups BiSeNet classes (both sides together).
EVAL_GROUPS: dict[str, tuple[str, ...]] = {
    "background": ("background",),
    "skin": ("skin",),
    "brows": ("l_brow", "r_brow"),
    "eyes": ("l_eye", "r_eye"),
    "nose": ("nose",),
    "lips": ("u_lip", "l_lip"),
    "hair": ("hair",),
    "neck": ("neck", "neck_l"),
}


def _group_lut() -> np.ndarray:
    """BiSeNet class -> eval group index; other classes -> len(EVAL_GROUPS) ("other")."""
    lut = np.full(256, 255, np.int64)
    lut[: len(BISENET_CLASSES)] = len(EVAL_GROUPS)
    for g, names in enumerate(EVAL_GROUPS.values()):
        for n in names:
            lut[BISENET_CLASSES.index(n)] = g
    lut[BISENET_CLASSES.index("eye_g")] = 255  # glasses cover eyes: don't score those pixels
    return lut


def iou_table(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Per-group IoU and their mean ``mIoU`` of BiSeNet class maps (``gt`` 255 = ignore)."""
    lut = _group_lut()
    p, g = lut[pred], lut[gt]
    keep = g != 255
    out = {}
    for k, name in enumerate(EVAL_GROUPS):
        a, b = (p == k) & keep, (g == k) & keep
        union = (a | b).sum()
        out[name] = float((a & b).sum() / union) if union else float("nan")
    out["mIoU"] = float(np.nanmean([out[n] for n in EVAL_GROUPS]))
    return out


def fs_val_set(fs: dict[str, np.ndarray], anchor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face Synthetics ``000070``–``000079`` in the CelebA framing (no augmentation)."""
    pairs = [fs_warp_plain(fs, i, anchor) for i in D.FS_VAL]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def fs_warp_plain(fs: dict[str, np.ndarray], i: int, anchor: np.ndarray) -> tuple:
    """One Face Synthetics face warped into the CelebA framing without jitter."""
    return D.fs_warp(fs["images"][i], fs["labels"][i], fs["anchor"][i], anchor)


@torch.no_grad()
def predict(net: ParseNet, images: np.ndarray, batch: int = 50) -> np.ndarray:
    """Argmax BiSeNet classes ``[B,H,W]`` of uint8 RGB images ``[B,H,W,3]``."""
    net.eval()
    out = [net(D.to_tensor(images[i : i + batch])).argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy().astype(np.uint8)


def _colour_jitter(img: np.ndarray, rng: np.random.Generator, strong: bool) -> np.ndarray:
    x = img.astype(np.float32) / 255
    k = 1.0 if strong else 0.5
    grey = x.mean(2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - 0.5 * k, 1 + 0.4 * k)  # saturation
    x = x * rng.uniform(1 - 0.15 * k, 1 + 0.15 * k, 3)  # white balance
    m = x.mean()
    x = m + (x - m) * rng.uniform(1 - 0.3 * k, 1 + 0.3 * k) + rng.uniform(-0.12, 0.12) * k
    x = np.clip(x, 0, 1) ** rng.uniform(1 - 0.25 * k, 1 + 0.25 * k)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down- and up-sample (CelebA faces are 89 px upscaled to 128), plus sensor noise."""
    s = int(rng.uniform(56, 112))
    img = cv2.resize(cv2.resize(img, (s, s), interpolation=cv2.INTER_AREA), (D.SIZE, D.SIZE),
                     interpolation=cv2.INTER_CUBIC)  # fmt: skip
    noise = rng.normal(0, rng.uniform(0, 6), img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _flip(img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return img[:, ::-1].copy(), D.FLIP_CLASSES[lab[:, ::-1]]


_HAIR = BISENET_CLASSES.index("hair")


def _recolour_hair(im: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give the synthetic hair a random natural colour (blond to black, some red and grey).

    The Face Synthetics sample's hair is mostly dark; real CelebA hair is often blond, which a
    parser never shown blond hair takes for a hat or background.
    """
    m = lab == _HAIR
    if m.sum() < 20:
        return im
    x = im.astype(np.float32)
    lum = x.mean(2, keepdims=True)
    target = rng.uniform(25, 210)
    tint = np.array([1.0, 0.85, 0.65]) if rng.random() < 0.7 else rng.uniform(0.6, 1.1, 3)
    if rng.random() < 0.15:  # grey / white
        tint = np.ones(3)
    new = (lum - lum[m].mean()) * rng.uniform(0.7, 1.4) + target
    new = new * tint / tint.mean()
    x[m] = np.clip(new[m], 0, 255)
    return x.astype(np.uint8)


def fs_batch(fs, anchor, idx, rng) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Augmented Face Synthetics samples."""
    ims, lbs = [], []
    for i in idx:
        im, lb = D.fs_warp(fs["images"][i], fs["labels"][i], fs["anchor"][i], anchor, rng)
        if rng.random() < 0.6:
            im = _recolour_hair(im, lb, rng)
        if rng.random() < 0.5:
            im, lb = _flip(im, lb)
        im = _degrade(_colour_jitter(im, rng, True), rng)
        ims.append(im)
        lbs.append(lb)
    return np.stack(ims), np.stack(lbs)


def celeba_batch(images, labels, idx, rng) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Augmented CelebA samples with their landmark pseudo-labels."""
    ims, lbs = [], []
    for i in idx:
        im, lb = images[i], labels[i]
        if rng.random() < 0.5:
            im, lb = _flip(im, lb)
        ims.append(_colour_jitter(im, rng, False))
        lbs.append(lb)
    return np.stack(ims), np.stack(lbs)


def one_cycle(lr: float, frac: float, warmup: float = 0.05) -> float:
    """The learning rate of torch's ``OneCycleLR`` shape at training fraction ``frac``.

    Cosine warm-up from ``lr/25`` over ``warmup``, then cosine down to ``lr/25/1e4`` (torch's
    ``div_factor`` and ``final_div_factor``). Written out so that the schedule can follow wall
    time (``--max-minutes``) as well as steps.
    """
    lo, end = lr / 25, lr / 25 / 1e4
    if frac < warmup:
        return lo + (lr - lo) * (1 - math.cos(math.pi * frac / warmup)) / 2
    return end + (lr - end) * (1 + math.cos(math.pi * (frac - warmup) / (1 - warmup))) / 2


def main(argv: list[str] | None = None) -> dict[str, float]:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--fs-batch", type=int, default=8)
    ap.add_argument("--celeba-batch", type=int, default=4)
    ap.add_argument("--celeba-weight", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/parser"))
    ap.add_argument("--out", type=Path, default=WEIGHTS / "parser.pt")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--init", type=Path, default=None, help="ParseNet weights to start from")
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="end (and finish the lr schedule) after this much wall time",
    )
    ap.add_argument(
        "--teacher", type=Path, default=None,
        help="distil this ParseNet (e.g. the shipped parser.pt) into a smaller one: the "
        "student matches the teacher's class probabilities on every augmented image",
    )  # fmt: skip
    ap.add_argument(
        "--label-weight", type=float, default=1.0,
        help="with --teacher: weight of the labelled loss beside the teacher's (0 = teacher only)",
    )  # fmt: skip
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="2 steps on 4 images into a temp dir")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="magdr-parser-"))
        smoke_settings(a, argv, steps=2, fs_batch=2, celeba_batch=2, width=4, depth=3,
                       run_dir=tmp, ckpt_every=1, log_every=1)  # fmt: skip
        smoke_settings(a, argv, out=a.run_dir / "parser.pt")
    setup_logging(a.run_dir)
    rng = seed_all(a.seed)

    if a.smoke:
        cel = D.fake_faces(4)
        fs_imgs = cel["images"]
        fs = {
            "images": np.stack([cv2.resize(i, (256, 256)) for i in fs_imgs]),
            "labels": rng.integers(0, 19, (4, 256, 256)).astype(np.uint8),
            "anchor": np.tile(np.float32([[100, 110], [156, 110], [128, 170]]), (4, 1, 1)),
        }
        anchor = np.array([[50, 66], [77, 66], [63, 97]], np.float32)
        fs_train, fs_val, cel_train = [0, 1, 2], [3], np.arange(4)
    else:
        cel = D.load_celeba(a.data)
        fs = D.load_facesynthetics(a.data)
        anchor = D.celeba_mean_anchor(cel)
        fs_train, fs_val = list(D.FS_TRAIN), list(D.FS_VAL)
        ntr = len(D.CELEBA_TRAIN)
        cel_train = np.nonzero(cel["detected"][:ntr])[0]
    log.info("pseudo-labelling %d CelebA train faces from landmarks", len(cel_train))
    cel_labels = {int(i): D.landmark_labels(cel["landmarks"][i]) for i in cel_train}

    net = ParseNet(width=a.width, depth=a.depth)
    if a.init is not None:
        net = ParseNet.from_state_dict(torch.load(a.init, map_location="cpu", weights_only=True))
    dev = torch.device(a.device)
    net.to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    ckpt = a.run_dir / "ckpt.pt"
    start = 0
    if a.resume and ckpt.exists():
        start = load_ckpt(ckpt, rng, net=net, opt=opt)
        log.info("resumed at step %d", start)
    teacher = None
    if a.teacher is not None:
        sd = torch.load(a.teacher, map_location="cpu", weights_only=True)
        teacher = ParseNet.from_state_dict(sd).to(dev).eval()
    budget = Budget(a.steps, a.max_minutes)
    losses = LossLog(a.run_dir)
    # Class weights: thin parts (brows, eyes, lips) are few pixels but what MagDR's regions need.
    w = torch.ones(len(BISENET_CLASSES), device=dev)
    for n in ("l_brow", "r_brow", "l_eye", "r_eye", "u_lip", "l_lip", "nose", "mouth"):
        w[BISENET_CLASSES.index(n)] = 3.0
    net.train()
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc="parser")
    step = start
    for step in bar:  # noqa: B007 - the last step is saved after the loop
        if budget.done(step):
            break
        for g in opt.param_groups:
            g["lr"] = one_cycle(a.lr, budget.fraction(step))
        xi, yi = fs_batch(fs, anchor, rng.choice(fs_train, a.fs_batch), rng)
        xc, yc = celeba_batch(
            cel["images"], cel_labels, rng.choice(cel_train, a.celeba_batch), rng
        )  # fmt: skip
        x = D.to_tensor(np.concatenate([xi, xc])).to(dev)
        y = torch.from_numpy(np.concatenate([yi, yc]).astype(np.int64)).to(dev)
        logits = net(x)
        ce = F.cross_entropy(logits, y, weight=w, ignore_index=D.IGNORE, reduction="none")
        valid = (y != D.IGNORE).float()
        nf = a.fs_batch
        l_fs = (ce[:nf]).sum() / valid[:nf].sum().clamp(min=1)
        l_cel = (ce[nf:]).sum() / valid[nf:].sum().clamp(min=1)
        loss = l_fs + a.celeba_weight * l_cel
        l_kd = None
        if teacher is not None:
            # Distillation: the teacher's soft classes on the same augmented pixels, so a
            # smaller student keeps the regions MagDR's profile was fitted on.
            with torch.no_grad():
                soft = teacher(x).softmax(1)
            l_kd = -(soft * logits.log_softmax(1)).sum(1).mean()
            loss = a.label_weight * loss + l_kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        shown = {"fs": l_fs.item(), "celeba": l_cel.item()}
        if l_kd is not None:
            shown["teacher"] = l_kd.item()
        bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            losses.write(step + 1, shown)
        if (step + 1) % a.ckpt_every == 0 or step + 1 == a.steps:
            save_ckpt(ckpt, step + 1, rng, net=net, opt=opt)
    else:
        step = a.steps
    if step < a.steps and step % a.ckpt_every:  # stopped by --max-minutes: keep the last state
        save_ckpt(ckpt, step, rng, net=net, opt=opt)
    log.info("stopped at step %d after %.0f s", step, time.monotonic() - budget.t0)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensor_state_dict(net), a.out)
    net.cpu()
    ims, lbs = zip(*[fs_warp_plain(fs, i, anchor) for i in fs_val], strict=True)
    table = iou_table(predict(net, np.stack(ims)), np.stack(lbs))
    log.info("Face Synthetics val IoU: %s", " ".join(f"{k}={v:.3f}" for k, v in table.items()))
    log.info("wrote %s", a.out)
    return table


if __name__ == "__main__":
    main()
