"""Attribute classifiers for StarGAN's five CelebA attributes, trained on the train split.

Two independent networks are trained by this script, each with its own seed and width:

- ``eval``: the *evaluation* classifier (StarGAN's "classification accuracy" measure). It is
  only used by :mod:`training.evaluate` to check that G's edits are recognisable, never in
  G's training.
- ``aux``: a frozen *teacher* for G's domain-classification loss (see :mod:`training.stargan`),
  so G learns from a classifier that already knows the attributes instead of waiting for D's.
- ``hair``: a second evaluation classifier that sees only the hair (:func:`hair_only`: the
  shipped parser's hair region of the *input* face, grey elsewhere). :mod:`training.evaluate`
  reports its hair-colour recognition beside ``eval``'s: an edit must change the hair itself to
  be recognised by it, not paint patterns elsewhere that a whole-image classifier reacts to.

Usage::

    nice -n 10 python -m training.classifier --which eval     # ~5 min on 2 CPU cores
    nice -n 10 python -m training.classifier --which aux --seed 1 --width 24
    nice -n 10 python -m training.classifier --which hair --seed 2
    python -m training.classifier --smoke
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import data as D
from training.common import (
    LossLog,
    load_ckpt,
    log,
    save_ckpt,
    seed_all,
    setup_logging,
    tensor_state_dict,
)
from training.shared import RUNS, WEIGHTS, AttrNet, cached_region_probs, hair_only


def load_classifier(which: str = "eval") -> AttrNet:
    """The trained classifier ``runs/classifier/{which}.pt`` in eval mode."""
    path = RUNS / "classifier" / f"{which}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: python -m training.classifier --which {which}")
    net = AttrNet.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def hair_maps(images: np.ndarray, parser_path: Path | None = None) -> np.ndarray:
    """Hair probabilities ``[B,1,H,W]`` float of the shipped parser (cached for CelebA)."""
    maps = cached_region_probs(parser_path or WEIGHTS / "parser.pt", images)
    return maps[:, :1].astype(np.float32) / 255


@torch.no_grad()
def accuracy(net: AttrNet, images: np.ndarray, attrs: np.ndarray,
             hair: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Per-attribute accuracy ``[5]`` on uint8 images ``[B,128,128,3]``.

    With ``hair`` (maps ``[B,1,H,W]``) the classifier sees :func:`hair_only` images.
    """
    net.eval()
    preds = []
    for i in range(0, len(images), 200):
        x = D.to_tensor(images[i : i + 200])
        if hair is not None:
            x = hair_only(x, torch.from_numpy(hair[i : i + 200]))
        preds.append((net(x) > 0).float().numpy())
    return (np.concatenate(preds) == attrs).mean(0)


def main(argv: list[str] | None = None) -> np.ndarray:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--which", default="eval", choices=["eval", "aux", "hair"])
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="2 steps on 4 images into a temp dir")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.run_dir = a.run_dir or RUNS / "classifier" / a.which
    a.out = a.out or RUNS / "classifier" / f"{a.which}.pt"
    if a.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="magdr-cls-"))
        a.steps, a.batch, a.width, a.run_dir, a.out = 2, 4, 4, tmp, tmp / "cls.pt"
        a.ckpt_every = a.log_every = 1
    setup_logging(a.run_dir)
    rng = seed_all(a.seed)
    if a.smoke:
        cel = D.fake_faces(4)
        train, val = np.arange(4), np.arange(4)
    else:
        cel = D.load_celeba(a.data)
        train, val = np.arange(len(D.CELEBA_TRAIN)), np.arange(len(D.CELEBA_TRAIN), 9000)
    hair = None  # the hair maps of every face, for --which hair
    if a.which == "hair":
        shape = (len(cel["images"]), 1, *cel["images"].shape[1:3])
        hair = rng.random(shape).astype(np.float32) if a.smoke else hair_maps(cel["images"])
    net = AttrNet(width=a.width)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.steps, pct_start=0.05)
    ckpt = a.run_dir / "ckpt.pt"
    start = 0
    if a.resume and ckpt.exists():
        start = load_ckpt(ckpt, rng, net=net, opt=opt, sched=sched)
    losses = LossLog(a.run_dir)
    net.train()
    for step in tqdm(range(start, a.steps), initial=start, total=a.steps, desc=f"cls-{a.which}"):
        idx = rng.choice(train, a.batch)
        x = D.to_tensor(cel["images"][idx])
        if hair is not None:
            x = hair_only(x, torch.from_numpy(hair[idx]))
        flip = torch.from_numpy(rng.random(a.batch) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        # Mild photometric noise so the classifier keys on attributes, not exact pixel values.
        x = x * (1 + 0.1 * torch.randn(a.batch, 1, 1, 1)) + 0.05 * torch.randn(a.batch, 3, 1, 1)
        y = torch.from_numpy(cel["attrs"][idx])
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % a.log_every == 0:
            losses.write(step + 1, {"bce": loss.item()})
        if (step + 1) % a.ckpt_every == 0 or step + 1 == a.steps:
            save_ckpt(ckpt, step + 1, rng, net=net, opt=opt, sched=sched)
            net.train()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensor_state_dict(net), a.out)
    acc = accuracy(net, cel["images"][val], cel["attrs"][val], None if hair is None else hair[val])
    log.info("val accuracy %s", dict(zip(D.STARGAN_ATTRS, acc.round(3).tolist(), strict=True)))
    return acc


if __name__ == "__main__":
    main()
