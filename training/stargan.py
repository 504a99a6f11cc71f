"""Train the default StarGAN generator (``magdr/models/weights/default_G.pt``) on a small CPU.

Plain StarGAN (WGAN-GP + domain classification + cycle reconstruction from scratch) needs
hundreds of thousands of GPU iterations; on 2 CPU cores it is hopeless (DESIGN §4). This recipe
reaches a usable editor in about an hour of CPU with the same generator, in two stages:

Stage 1 — pseudo-paired supervision (``--stage1-steps``). For a face x with real labels r and a
condition c, the target y is

- x itself when c keeps the hair (hair part of c equal to r, or all zero) — an identity
  auto-encoder, which gives G the faithful reconstruction MagDR's distortion checks rely on;
- x with its hair recoloured when c asks for another hair colour: the parser's soft hair mask
  selects the hair, and the hair pixels' YCbCr mean/std are moved to the mean statistics of the
  train faces labelled with that colour (Reinhard-style colour transfer; the texture, i.e. the
  luminance *deviations*, is kept), blended with the soft mask so nothing outside the hair moves.

Loss: ``λ_rec · mean(W · |G(x, c) − y|)`` with W = 1 (2 inside the hair when it is recoloured).
Male and Young take 0.5 ("keep the face's own value", DESIGN §8's ``condition`` default) or the
real label, both meaning "keep".

Stage 2 — StarGAN fine-tune. Male/Young are also flipped (c = 1 − r). StarGAN's objective is
added: WGAN-GP adversarial loss with a StarGAN discriminator (src + cls heads), domain
classification (D's cls head, plus a frozen auxiliary attribute classifier trained on the train
split, :mod:`training.classifier` ``aux``, so the edit direction is known from step one) and
cycle reconstruction ``|G(G(x, c), r) − x|``. The pixel loss becomes an identity loss
``|G(x, c) − x|`` outside the edited region (``--stage2-target identity``, the default):
inside the hair of a recoloured face, and inside the face and hair of a flipped one, it is
down-weighted to ``--w-inside``, so the classifiers decide what those become. (``pseudo``
keeps stage 1's recoloured target instead: the evaluation classifier recognises those targets
as the requested colour for only 15–29% of faces, so they cannot carry the recognisability
bar.)

Options tried on top (docs/training-log.md, generator parts 5–6; none is in the shipped weights):

- ``--teacher G.pt``: stage 1 as distillation. Male/Young are flipped too, their target is the
  teacher's output (:func:`distillation_target`), hair requests get the recoloured hair on top.
- ``--aux-hair CLS.pt``: the hair colours of the auxiliary loss come from a classifier that sees
  only the input face's hair (:func:`training.shared.hair_only`), so they are learnt
  from the hair itself, not from patterns elsewhere that a whole-image classifier reacts to.
- ``--lambda-tint``: penalises the mean colour shift outside the edit (:func:`colour_shift`).
- ``--teacher-edits all``: stage 1 distils the teacher's hair edits too, with the hair itself
  recoloured on top (the target an editor would need for every hair-ratio and PSNR bar).
- ``--image-size 64``: issue 3's fallback size. Faces and region maps are area-shrunk
  (:func:`training.data.shrink`); the frozen classifiers see G's output upsampled to 128.

Usage::

    nice -n 10 python -m training.stargan                # CPU
    python -m training.stargan --device cuda --max-minutes 7 ...   # see MODEL_CARD.md
    python -m training.stargan --resume
    python -m training.stargan --smoke                   # 2 steps on 4 images, temp dir
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from magdr.models.stargan import StarGAN
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
from training.shared import WEIGHTS, AttrNet, cached_region_probs, hair_only

NEUTRAL = [0.0, 0.0, 0.0, 0.5, 0.5]

_YCC = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)


def to_ycc(x: torch.Tensor) -> torch.Tensor:
    """[-1,1] RGB ``[B,3,H,W]`` -> YCbCr (Y in [0,1], chroma in [-0.5,0.5])."""
    return torch.einsum("ij,bjhw->bihw", _YCC.to(x), (x + 1) / 2)


def from_ycc(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_ycc`, back to [-1,1] RGB (not clamped)."""
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_YCC).to(y), y) * 2 - 1


def _masked_stats(yc: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    area = w.sum((2, 3)).clamp(min=1.0)
    mu = (yc * w).sum((2, 3)) / area
    sd = (((yc - mu[:, :, None, None]) ** 2 * w).sum((2, 3)) / area + 1e-6).sqrt()
    return mu, sd


def hair_colour_stats(
    images: np.ndarray, hair: np.ndarray, attrs: np.ndarray, min_area: float = 0.03
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean YCbCr mean/std of the hair of train faces labelled with exactly one hair colour.

    Returns:
        ``mu`` and ``sd``, each ``[3 colours, 3 channels]`` (Black, Blond, Brown).
    """
    mus, sds = torch.zeros(3, 3), torch.zeros(3, 3)
    for k in range(3):
        sel = np.nonzero((attrs[:, k] == 1) & (attrs[:, :3].sum(1) == 1))[0]
        # Only confident hair pixels: a soft mask's fringe (skin, background) would pull every
        # colour's mean toward the same grey.
        sel = sel[(hair[sel] > 127).mean((1, 2)) > min_area][:600]
        x = D.to_tensor(images[sel])
        w = torch.from_numpy(hair[sel] > 127).float()[:, None]
        mu, sd = _masked_stats(to_ycc(x), w)
        mus[k], sds[k] = mu.median(0).values, sd.median(0).values
    return mus, sds


def spread(mus: torch.Tensor, factor: float) -> torch.Tensor:
    """Move the colour means apart by ``factor`` around their centre (1 = as measured)."""
    centre = mus.mean(0, keepdim=True)
    return centre + factor * (mus - centre)


def hair_blend_mask(hair: torch.Tensor) -> torch.Tensor:
    """Soft hair probability -> blend weight: 0 below 0.2, 1 above 0.8 (sharper edges)."""
    return ((hair - 0.2) / 0.6).clamp(0, 1)


def recolour_hair(
    x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, mus: torch.Tensor, sds: torch.Tensor
) -> torch.Tensor:
    """Pseudo-target of the hair-colour edit: x with its hair moved to colour ``k``'s statistics.

    Args:
        x: faces :math:`(B,3,H,W)` in [-1,1].
        m: soft hair masks :math:`(B,1,H,W)` in [0,1].
        k: target colour index per face :math:`(B,)` (0 black, 1 blond, 2 brown).
        mus: target means from :func:`hair_colour_stats`.
        sds: target standard deviations from :func:`hair_colour_stats`.
    """
    yc = to_ycc(x)
    mu, sd = _masked_stats(yc, m)
    ratio = (sds[k] / sd).clamp(0.5, 2.0)
    out = (yc - mu[:, :, None, None]) * ratio[:, :, None, None] + mus[k][:, :, None, None]
    rgb = from_ycc(out).clamp(-1, 1)
    return x * (1 - m) + rgb * m


@torch.no_grad()
def distillation_target(
    teacher: StarGAN, x: torch.Tensor, c: torch.Tensor, hair: torch.Tensor, k: torch.Tensor,
    rec: torch.Tensor, fl: torch.Tensor, mus: torch.Tensor, sds: torch.Tensor,
    hair_edits: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Stage 1's target with a ``--teacher``: its edit, then the recoloured hair.

    Faces with Male/Young flipped (``fl``) take the teacher's output for c with the hair part set
    to "keep" (all zero), so only its face edit is learnt, not its idea of hair colour; faces
    asked for another hair colour (``rec``) then get :func:`recolour_hair` on top. Every pixel
    has a target, unlike stage 2's identity loss.

    With ``hair_edits`` (``--teacher-edits all``) the teacher sees the whole of c, and a face
    asked for another hair colour starts from the teacher's own hair edit: the target keeps what
    the teacher changes to make the colour recognisable and recolours the hair itself on top.

    Args:
        teacher: a trained generator (frozen).
        x: faces :math:`(B,3,H,W)` in [-1,1].
        c: conditions :math:`(B,5)`.
        hair: soft hair masks :math:`(B,1,H,W)`.
        k: hair colour index per face :math:`(B,)`.
        rec: 1 where the hair is recoloured, :math:`(B,1,1,1)`.
        fl: 1 where Male or Young is flipped, :math:`(B,1,1,1)`.
        mus: hair colour means (:func:`hair_colour_stats`).
        sds: hair colour standard deviations.
        hair_edits: start hair-colour requests from the teacher's output, not from x.
    """
    if hair_edits:
        base = torch.where(torch.maximum(fl, rec) > 0, teacher(x, c), x)
    else:
        keep_hair = torch.cat([torch.zeros_like(c[:, :3]), c[:, 3:]], 1)
        base = torch.where(fl > 0, teacher(x, keep_hair), x)
    return torch.where(rec > 0, recolour_hair(base, hair, k, mus, sds), base)


class Discriminator(nn.Module):
    """StarGAN's PatchGAN discriminator with a source head and a domain-classification head."""

    def __init__(self, image_size: int = 128, conv_dim: int = 16, c_dim: int = 5,
                 repeat_num: int = 6, max_dim: int = 128) -> None:  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        cin, d = 3, conv_dim
        for _ in range(repeat_num):
            layers += [nn.Conv2d(cin, d, 4, 2, 1), nn.LeakyReLU(0.01)]
            cin, d = d, min(d * 2, max_dim)
        self.main = nn.Sequential(*layers)
        k = image_size // 2**repeat_num
        self.conv1 = nn.Conv2d(cin, 1, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(cin, c_dim, k, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        h = self.main(x)
        return self.conv1(h), self.conv2(h).flatten(1)


def sample_conditions(
    real: np.ndarray, rng: np.random.Generator, flip_prob: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random conditions for a batch with real labels ``real`` ``[B,5]``.

    Returns:
        c ``[B,5]`` (what G is given), cls target ``[B,5]`` (what its output should show),
        hair target index ``[B]`` (-1 = keep the hair), flipped ``[B]`` bool (Male/Young flipped).
    """
    b = len(real)
    c = np.zeros((b, 5), np.float32)
    t = real.copy()
    k = np.full(b, -1)
    u = rng.random(b)
    keep_real, keep_zero = u < 0.15, (u >= 0.15) & (u < 0.3)
    c[keep_real, :3] = real[keep_real, :3]
    for i in np.nonzero(~keep_real & ~keep_zero)[0]:
        kk = rng.integers(3)
        c[i, kk] = 1
        t[i, :3] = c[i, :3]
        already = real[i, kk] == 1 and real[i, :3].sum() == 1
        k[i] = -1 if already else kk
    flipped = np.zeros(b, bool)
    for j in (3, 4):
        v = rng.random(b)
        c[:, j] = np.where(v < 0.5, 0.5, real[:, j])
        fl = v >= 1 - flip_prob
        c[fl, j] = 1 - real[fl, j]
        t[fl, j] = c[fl, j]
        flipped |= fl
    return c, t, k, flipped


def colour_shift(fake: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean colour change ``[B,3]`` of ``fake`` against ``x``, weighted by ``w`` ``[B,1,H,W]``.

    A small G that recolours the hair tends to tint the whole image a little; per pixel that
    costs little in an L1 loss, but summed over everything outside the hair it is what the hair
    ratio and the PSNR bars see. ``--lambda-tint`` penalises it directly.
    """
    return ((fake - x) * w).sum((2, 3)) / w.sum((2, 3)).clamp(min=1e-6)


def classifier_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` bilinearly resized to the ``size`` the attribute classifiers were trained at."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def gradient_penalty(d: Discriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: ``(‖∇ D(x̂)‖₂ − 1)²`` on random interpolates (StarGAN's ``gradient_penalty``)."""
    a = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    xh = (a * real + (1 - a) * fake).requires_grad_(True)
    src, _ = d(xh)
    (g,) = torch.autograd.grad(src.sum(), xh, create_graph=True)
    return ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()


def main(argv: list[str] | None = None) -> Path:  # noqa: D103, C901
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--stage1-steps", type=int, default=3500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--conv-dim", type=int, default=16)
    ap.add_argument("--repeat-num", type=int, default=3)
    ap.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="train at this side (64: issue 3's fallback); default the data's 128",
    )
    ap.add_argument("--lr", type=float, default=1e-3, help="G's stage-1 learning rate")
    ap.add_argument("--lr2", type=float, default=2e-4, help="G's and D's stage-2 learning rate")
    ap.add_argument("--lambda-rec", type=float, default=10.0)
    ap.add_argument("--lambda-cls", type=float, default=1.0)
    ap.add_argument("--lambda-aux", type=float, default=1.0)
    ap.add_argument("--lambda-adv", type=float, default=1.0)
    ap.add_argument("--lambda-cyc", type=float, default=10.0)
    ap.add_argument(
        "--lambda-tint",
        type=float,
        default=0.0,
        help="weight of the mean colour shift outside the edit (stage 2 "
        "identity, or stage 1 with --teacher: against its target)",
    )
    ap.add_argument("--lambda-gp", type=float, default=10.0)
    ap.add_argument("--flip-prob", type=float, default=0.3, help="stage 2 Male/Young flips")
    ap.add_argument("--w-inside", type=float, default=0.1)
    ap.add_argument(
        "--stage2-target",
        choices=["identity", "pseudo"],
        default="identity",
        help="stage 2 pixel target: x outside the edited region (identity) or "
        "stage 1's recoloured hair (pseudo)",
    )
    ap.add_argument("--d-dim", type=int, default=16, help="discriminator width")
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="end (and finish the lr decay) after this much wall time",
    )
    ap.add_argument(
        "--cond-gain",
        type=float,
        default=1.0,
        help="scale the first conv's condition weights of --init (see code)",
    )
    ap.add_argument(
        "--hair-weight", type=float, default=1.0, help="extra pixel-loss weight on recoloured hair"
    )
    ap.add_argument(
        "--hair-spread",
        type=float,
        default=1.5,
        help="exaggerate the differences between the hair-colour targets",
    )
    ap.add_argument("--parser", type=Path, default=WEIGHTS / "parser.pt")
    ap.add_argument("--aux", type=Path, default=D.cache_dir().parent / "classifier/aux.pt")
    ap.add_argument(
        "--aux-hair",
        type=Path,
        default=None,
        help="a hair-only classifier (classifier.py --which hair, not the "
        "evaluation one) teaching the hair colours instead of --aux",
    )
    ap.add_argument(
        "--ae-only",
        action="store_true",
        help="warm start: identity auto-encoder only (no parser, no edits)",
    )
    ap.add_argument("--init", type=Path, default=None, help="G weights to start from")
    ap.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="stage 1 distillation: Male/Young flips (at --flip-prob) take this "
        "generator's output (hair kept) as their target",
    )
    ap.add_argument(
        "--teacher-edits",
        choices=["flips", "all"],
        default="flips",
        help="what stage 1 takes from --teacher: its Male/Young flips only, or also "
        "its hair-colour edits (the recoloured hair goes on top of either)",
    )
    ap.add_argument(
        "--n-train", type=int, default=len(D.CELEBA_TRAIN), help="use the first N train faces"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--run-dir", type=Path, default=None, help="default runs/stargan")
    ap.add_argument("--out", type=Path, default=WEIGHTS / "default_G.pt")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="2 steps on 4 images into a temp dir")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    if a.smoke:
        a.run_dir = a.run_dir or Path(tempfile.mkdtemp(prefix="magdr-stargan-"))
        smoke_settings(a, argv, steps=2, stage1_steps=1, batch=2, conv_dim=4, repeat_num=1,
                       out=a.run_dir / "G.pt", ckpt_every=1, log_every=1)  # fmt: skip
    a.run_dir = a.run_dir or Path("runs/stargan")
    if a.ae_only:
        a.stage1_steps = a.steps
    setup_logging(a.run_dir)
    rng = seed_all(a.seed)
    if a.smoke:
        cel = D.fake_faces(4, 32)
        cel["attrs"][:, :3] = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
        regions = rng.integers(0, 256, (4, 2, 32, 32)).astype(np.uint8)
        train = np.arange(4)
        aux = AttrNet(width=4).eval()
    else:
        cel = D.load_celeba(a.data)
        train = np.arange(min(a.n_train, len(D.CELEBA_TRAIN)))
        if a.ae_only:
            regions = np.zeros((len(cel["images"]), 2, D.SIZE, D.SIZE), np.uint8)
        else:
            # The maps of every CelebA face, sliced: one cache file serves every --n-train,
            # evaluate.py and classifier.py.
            regions = cached_region_probs(a.parser, cel["images"], a.device)[train]
        if a.stage1_steps < a.steps:
            sd = torch.load(a.aux, map_location="cpu", weights_only=True)
            aux = AttrNet.from_state_dict(sd).eval()
        else:
            aux = AttrNet(width=4).eval()  # stage 2 never runs: no teacher needed
    for p in aux.parameters():
        p.requires_grad_(False)
    aux_hair = None
    if a.aux_hair is not None:
        # Sees only the input face's hair: a hair-colour request is learnt from the hair
        # itself, not from whatever else a whole-image classifier reacts to.
        sd = torch.load(a.aux_hair, map_location="cpu", weights_only=True)
        aux_hair = AttrNet.from_state_dict(sd).eval().requires_grad_(False).to(a.device)
        log.info("hair colours taught by the hair-only classifier %s", a.aux_hair)
    images, attrs = cel["images"], cel["attrs"]
    if a.image_size is not None and a.image_size != images.shape[1]:
        # Issue 3's fallback: a smaller G, trained on the same crops area-shrunk; the region
        # maps (from the parser at 128) are shrunk with them. The frozen classifiers still see
        # 128×128: G's output is upsampled for them (classifier_input).
        images, regions = D.shrink(images, a.image_size), D.shrink(regions, a.image_size, False)
        log.info("training at %d×%d", a.image_size, a.image_size)
    min_area = 0.0 if a.smoke else 0.03
    if a.ae_only:  # no recolouring, and no hair maps to take colour statistics from
        mus, sds = torch.zeros(3, 3), torch.zeros(3, 3)
    else:
        mus, sds = hair_colour_stats(images[train], regions[train, 0], attrs[train], min_area)
        mus = spread(mus, a.hair_spread)
    log.info("hair YCbCr target means (black, blond, brown): %s", mus.numpy().round(3).tolist())
    log.info("hair YCbCr target stds: %s", sds.numpy().round(3).tolist())

    size, cel_size = images.shape[1], cel["images"].shape[1]
    G = StarGAN(conv_dim=a.conv_dim, c_dim=5, repeat_num=a.repeat_num, image_size=size)
    Dnet = Discriminator(image_size=size, conv_dim=a.d_dim, repeat_num=6 if size >= 64 else 4)
    dev = torch.device(a.device)
    G.to(dev)
    Dnet.to(dev)
    aux.to(dev)
    mus, sds = mus.to(dev), sds.to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=a.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(Dnet.parameters(), lr=a.lr2, betas=(0.5, 0.999))
    ckpt = a.run_dir / "ckpt.pt"
    start = 0
    if a.resume and ckpt.exists():
        start = load_ckpt(ckpt, rng, G=G, D=Dnet, opt_g=opt_g, opt_d=opt_d)
        log.info("resumed at step %d", start)
    elif a.init is not None:
        G.load_state_dict(torch.load(a.init, map_location=dev, weights_only=True))
        log.info("initialised G from %s", a.init)
        if a.cond_gain != 1.0:
            # StarGAN tiles c as constant channels and the first InstanceNorm removes constants:
            # only an attenuated offset (from the zero-padded border) reaches the interior, so
            # an auto-encoder warm start hardly sees c. Scaling the first conv's c weights makes
            # that offset large enough for G to learn the conditional edit in few steps.
            with torch.no_grad():
                G.main[0].weight[:, 3:] *= a.cond_gain
            log.info("scaled the first conv's condition weights by %g", a.cond_gain)
    teacher = None
    if a.teacher is not None:
        sd = torch.load(a.teacher, map_location=dev, weights_only=True)
        teacher = StarGAN.from_state_dict(sd).to(dev).eval().requires_grad_(False)
        what = "every edit" if a.teacher_edits == "all" else "Male/Young flips"
        log.info("stage 1 distils %s from %s", what, a.teacher)
    losses = LossLog(a.run_dir)
    budget = Budget(a.steps, a.max_minutes)
    only_stage1 = a.stage1_steps >= a.steps  # then --max-minutes sets stage 1's lr decay too
    G.train()
    Dnet.train()
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc="stargan")
    step = start
    for step in bar:  # noqa: B007 - the last step is saved after the loop
        if budget.done(step):
            break
        stage2 = step >= a.stage1_steps
        # Stage 1: constant lr then linear decay to 10% (by steps, or by time with
        # --max-minutes); stage 2: lr2, decayed the same way once stage 1 is over.
        prog = budget.fraction(step)
        if stage2:
            lr = a.lr2 * decay(prog)
        else:
            lr = a.lr * decay(max(step / max(a.stage1_steps, 1), prog if only_stage1 else 0.0))
        for g in opt_g.param_groups:
            g["lr"] = lr
        idx = rng.choice(train, a.batch)
        x = D.to_tensor(images[idx]).to(dev)
        reg = torch.from_numpy(regions[idx]).to(dev).float() / 255
        real = attrs[idx]
        flip = torch.from_numpy(rng.random(a.batch) < 0.5).to(dev)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
        reg = torch.where(flip, reg.flip(3), reg)
        hair, facehair = hair_blend_mask(reg[:, :1]), reg[:, 1:]
        flip_prob = a.flip_prob if stage2 or teacher is not None else 0.0
        c_np, t_np, k_np, fl_np = sample_conditions(real, rng, flip_prob)
        if a.ae_only:  # keep-conditions only: the hair part of c is the real labels or zeros
            c_np[k_np >= 0, :3] = real[k_np >= 0, :3]
            k_np[:] = -1
        c, t = torch.from_numpy(c_np).to(dev), torch.from_numpy(t_np).to(dev)
        real_t = torch.from_numpy(real).to(dev)
        k = torch.from_numpy(np.maximum(k_np, 0)).to(dev)
        rec = torch.from_numpy(k_np >= 0).to(dev)[:, None, None, None].float()
        fl = torch.from_numpy(fl_np).to(dev)[:, None, None, None].float()
        if stage2 and a.stage2_target == "identity":
            # StarGAN's own objective plus an identity loss *outside* the edited region: the
            # classifiers decide what the hair / face becomes, the pixel loss only keeps the
            # rest of the image (the hair-ratio and PSNR bars) where it was.
            y = x
            w = 1 - (1 - a.w_inside) * torch.maximum(rec * hair, fl * facehair)
        elif teacher is not None:
            y = distillation_target(
                teacher, x, c, hair, k, rec, fl, mus, sds, hair_edits=a.teacher_edits == "all"
            )
            w = 1 + a.hair_weight * rec * hair
        else:
            with torch.no_grad():
                y = torch.where(rec > 0, recolour_hair(x, hair, k, mus, sds), x)
            w = (1 + a.hair_weight * rec * hair) * (1 - fl * (1 - a.w_inside) * facehair)
        logs: dict[str, torch.Tensor] = {}

        if stage2:  # --- D step (WGAN-GP + domain classification on real faces) ---
            with torch.no_grad():
                fake = G(x, c)
            src_r, cls_r = Dnet(x)
            src_f, _ = Dnet(fake)
            d_cls = F.binary_cross_entropy_with_logits(cls_r, real_t)
            gp = gradient_penalty(Dnet, x, fake)
            d_loss = -src_r.mean() + src_f.mean() + a.lambda_cls * d_cls + a.lambda_gp * gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            logs.update(d_w=(src_r.mean() - src_f.mean()).detach(), d_cls=d_cls.detach(),
                        gp=gp.detach())  # fmt: skip

        # --- G step ---
        fake = G(x, c)
        l_pix = (w * (fake - y).abs()).mean()
        g_loss = a.lambda_rec * l_pix
        logs["pix"] = l_pix.detach()
        tint_applies = a.stage2_target == "identity" if stage2 else teacher is not None
        if a.lambda_tint > 0 and tint_applies:
            # Outside the edit: stage 2's weights already say where (w); stage 1's target
            # covers every pixel, so its tint is measured outside the recoloured hair.
            outside = w if stage2 else 1 - rec * hair
            l_tint = colour_shift(fake, y, outside).abs().mean()
            g_loss = g_loss + a.lambda_tint * l_tint
            logs["tint"] = l_tint.detach()
        if stage2:
            src_f, cls_f = Dnet(fake)
            g_adv = -src_f.mean()
            g_cls = F.binary_cross_entropy_with_logits(cls_f, t)
            aux_logits = aux(classifier_input(fake, cel_size))
            if aux_hair is not None:
                hair_in = hair_only(fake, reg[:, :1])
                hair_logits = aux_hair(classifier_input(hair_in, cel_size))
                aux_logits = torch.cat([hair_logits[:, :3], aux_logits[:, 3:]], 1)
            g_aux = F.binary_cross_entropy_with_logits(aux_logits, t)
            back = G(fake, real_t)
            g_cyc = (back - x).abs().mean()
            g_loss = g_loss + a.lambda_adv * g_adv + a.lambda_cls * g_cls
            g_loss = g_loss + a.lambda_aux * g_aux + a.lambda_cyc * g_cyc
            logs.update(g_adv=g_adv.detach(), g_cls=g_cls.detach(), g_aux=g_aux.detach())
            logs["cyc"] = g_cyc.detach()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            # .item() syncs a GPU: only on logged steps.
            vals = {k: v.item() for k, v in logs.items()}
            bar.set_postfix(pix=f"{vals['pix']:.4f}", stage=2 if stage2 else 1)
            losses.write(step + 1, {"lr": lr, **vals})
        if (step + 1) % a.ckpt_every == 0 or step + 1 == a.steps:
            save_ckpt(ckpt, step + 1, rng, G=G, D=Dnet, opt_g=opt_g, opt_d=opt_d)
            save_generator(G, a.run_dir / f"G_{step + 1:06d}.pt")
    else:
        step = a.steps
    if step < a.steps and step % a.ckpt_every:  # stopped by --max-minutes: keep the last state
        save_ckpt(ckpt, step, rng, G=G, D=Dnet, opt_g=opt_g, opt_d=opt_d)
        save_generator(G, a.run_dir / f"G_{step:06d}.pt")
    log.info("stopped at step %d after %.0f s", step, time.monotonic() - budget.t0)
    return save_generator(G, a.out)


def decay(frac: float) -> float:
    """Learning-rate factor: 1 for the first 60% of training, then linear down to 0.1."""
    return 1.0 if frac < 0.6 else 1.0 - 0.9 * (frac - 0.6) / 0.4


def save_generator(G: StarGAN, path: Path) -> Path:
    """Write G's plain state dict and the ``.json`` metadata the registry reads beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensor_state_dict(G), path)
    meta = {
        "kind": "stargan",
        "image_size": G.image_size,
        "attributes": list(D.STARGAN_ATTRS),
        "neutral": NEUTRAL,
        "conv_dim": G.conv_dim,
        "repeat_num": G.repeat_num,
        "attribute_targets": {
            a: ("hair" if a.endswith("_Hair") else "face+hair") for a in D.STARGAN_ATTRS
        },  # fmt: skip
        "trained_by": "training/stargan.py (see MODEL_CARD.md)",
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("wrote %s", path)
    return path


if __name__ == "__main__":
    main()
