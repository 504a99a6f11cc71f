"""Train the purifier P (:mod:`magdr.purifier`) against one generator G.

1. Faces: CelebA train faces (``000001``–``008000``), each with a random one-attribute edit
   (:func:`magdr.calibrate.random_edits`), as the attacks in the benchmark are made.
2. Attacked copies: a pool made once (and cached under ``runs/cache``) by the *training* attacks
   only, ``--attacks pgd,ifgsm,cw`` (one drawn per chunk; PGD and I-FGSM at a radius drawn from
   ``--eps``, C&W-L2 with ``--cw-steps`` Adam steps); targeted PGD and larger radii stay held
   back, so the benchmark measures how P generalises.
3. Loss (module docstring of :mod:`magdr.purifier`): G's output on P(x̂) against G's output on
   x, plus ``--ssim`` × its SSIM distance (L1 alone leaves the edit's texture soft), plus
   ``--beta`` × the input distance, plus ``--gamma`` × identity on clean faces (input and
   output), so a false alarm costs nothing.

``--adversarial R`` hardens a purifier that serves as the detector's consistency transform
(Eq. 7 with K = 1: S = MSE(G(x̂), G(P(x̂)))) against ``bench``'s Figure 3 attacker, less its
EoT pool: in each of R rounds, ``--adv-faces`` pool faces are attacked by PGD (``--adv-eps``,
``--adv-steps``) that disrupts G while pushing S under the profile's threshold (λ_e =
``--adv-evade``), against the current P; the attacked faces join the pool and P trains on it
for ``--steps``/R steps with the loss above, so the perturbations P let through are the ones it
learns to undo (measured in ``MODEL_CARD.md``, detector purifier, Limits).

``--robust SHARE`` trains P against an attacker who aims at what the guard publishes for a
purified face, G(P(x̂)) (``bench.end_to_end``): that share of each attacked batch is made
afresh by PGD through G∘P against the current P (Madry et al., ICLR 2018), at a radius drawn
from ``--robust-eps`` with ``--robust-steps`` steps of 2.5 ε / steps, so P learns to undo the
perturbations that beat *it*, not only those made against G alone. The rest of the batch
still comes from the pool.

``--teacher PATH`` distils instead: a (smaller) P learns to give what a trained purifier T gives,
L1(P(x̂), T(x̂)) + ``--gamma`` × L1(P(x), T(x)), on the same pool. No pass of G per step, so
it trains in minutes; the guard's detector runs such a P on every face (the profile's
consistency transform), where the full P's cost would be most of the clean path.

Usage::

    python -m training.purifier                        # default G, CPU: see MODEL_CARD.md
    python -m training.purifier --G path/G.pt --device cuda --faces 2048 --steps 3000
    python -m training.purifier --width 12 --teacher default --out P12.pt   # distil
    python -m training.purifier --init detector --adversarial 3 --out Pd.pt   # harden
    python -m training.purifier --init default --robust 0.5 --out P.pt   # PGD through G∘P
    python -m training.purifier --smoke                # 2 steps on fabricated faces, temp dir

``magdr-guard calibrate --purifier ...`` runs the same :func:`main`. The result is a checkpoint
and a JSON file beside it; point ``[model] purifier`` (daemon) or ``Guard(purifier=...)`` at it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from magdr.checkpoints import weights_digest
from magdr.metrics import dssim
from magdr.purifier import DEFAULT_PURIFIER, Purifier, load_purifier, save_purifier
from training import data as D
from training.common import Budget, LossLog, log, seed_all, setup_logging

TRAIN_ATTACKS = ("pgd", "ifgsm", "cw")


def attack_pool(
    G: torch.nn.Module,
    x: torch.Tensor,
    c: torch.Tensor,
    attacks: list[str],
    eps: list[float],
    steps: int,
    rng: np.random.Generator,
    chunk: int = 32,
    cw_steps: int = 30,
) -> torch.Tensor:
    """Attacked copies of ``x``: per chunk of faces one attack and one radius, drawn by ``rng``.

    The step size of PGD and I-FGSM is ε/4, so every radius is reached within the ``steps``
    iterations; C&W-L2 (``cw``, no radius) runs ``cw_steps`` Adam steps at its defaults.
    """
    from magdr import attacks as A

    out = []
    dev = next(G.parameters()).device
    for i in tqdm(range(0, x.shape[0], chunk), desc="attack pool"):
        xb, cb = x[i : i + chunk].to(dev), c[i : i + chunk].to(dev)
        method = attacks[int(rng.integers(len(attacks)))]
        e = float(eps[int(rng.integers(len(eps)))])
        kw = {"eps": e, "step": e / 4, "steps": steps}
        if method == "pgd":
            gen = torch.Generator(device=dev).manual_seed(int(rng.integers(2**31)))
            out.append(A.pgd(G, xb, cb, generator=gen, **kw).cpu())
        elif method == "ifgsm":
            out.append(A.ifgsm(G, xb, cb, **kw).cpu())
        elif method == "cw":
            out.append(A.cw_l2(G, xb, cb, steps=cw_steps).cpu())
        else:
            raise ValueError(f"--attacks: unknown {method!r}; expected {', '.join(TRAIN_ATTACKS)}")
    return torch.cat(out)


class DetectorHinge(torch.nn.Module):
    """relu((S − τ) / s) for S = MSE(G(x), G(P(x))), P as the detector's one transform (Eq. 7).

    What a defence-aware attacker pushes down (``bench.adaptive``'s hinge): S below τ and no
    further; ``s`` is the spread of clean scores, the hinge's unit.
    """

    def __init__(self, G: torch.nn.Module, P: torch.nn.Module, threshold: float, scale: float):
        super().__init__()
        self.G, self.P = G, P
        self.threshold, self.scale = float(threshold), max(float(scale), 1e-12)

    def consistency(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """S_cons with K = 1: how far G's output moves when P cleans its input, :math:`(B,)`."""
        from magdr.detect import consistency_score

        return consistency_score(self.G(x, c), self.G(self.P(x), c)[:, None], "l2")

    def consistency_batched(
        self, x: torch.Tensor, c: torch.Tensor, chunk: int = 32
    ) -> torch.Tensor:
        """:meth:`consistency` without gradients, ``chunk`` faces at a time, on the CPU."""
        dev = next(self.G.parameters()).device
        with torch.no_grad():
            return torch.cat([self.consistency(x[i : i + chunk].to(dev),
                                               c[i : i + chunk].to(dev)).cpu()
                              for i in range(0, len(x), chunk)])  # fmt: skip

    def score(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return ((self.consistency(x, c) - self.threshold) / self.scale).relu()


def adaptive_pool(
    hinge: DetectorHinge,
    x: torch.Tensor,
    c: torch.Tensor,
    eps: float,
    steps: int,
    evade_weight: float,
    seed: int,
    chunk: int = 16,
) -> torch.Tensor:
    """Defence-aware attacks on ``x``: disrupt G while keeping ``hinge``'s S under τ.

    :class:`magdr.attacks.AdaptivePGD` with the identity alone in its pool (the detector's P is
    in the evasion term, with its full gradient), step ε/5, random start.
    """
    from magdr.attacks import AdaptivePGD

    dev = next(hinge.G.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    attack = AdaptivePGD(
        hinge.G, guard=hinge, transforms=[], eot_samples=None, evade_weight=evade_weight,
        eps=eps, step=eps / 5, steps=steps,
    )  # fmt: skip
    out = [
        attack(x[i : i + chunk].to(dev), c[i : i + chunk].to(dev), generator=gen).cpu()
        for i in tqdm(range(0, len(x), chunk), desc="adaptive pool")
    ]
    return torch.cat(out)


class Purified(torch.nn.Module):
    """G on P's output, ``G(P(x), c)``: what a guard that purifies every face publishes."""

    def __init__(self, G: torch.nn.Module, P: torch.nn.Module) -> None:
        super().__init__()
        self.G, self.P = G, P

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.G(self.P(x), c)


def robust_attack(
    G: torch.nn.Module,
    P: torch.nn.Module,
    x: torch.Tensor,
    c: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``--robust``'s attacked faces: PGD from a random start maximising MSE(G(P(x̂), c), y)."""
    from magdr.attacks import PGD

    attack = PGD(Purified(G, P), eps=eps, step=2.5 * eps / steps, steps=steps)
    return attack(x, c, reference=y, generator=generator)


def _adversarial_round(
    hinge: DetectorHinge,
    P: torch.nn.Module,
    x: torch.Tensor,
    c: torch.Tensor,
    y: torch.Tensor,
    a: argparse.Namespace,
    seed: int,
) -> dict:
    """One ``--adversarial`` round: attack ``x`` against the current P; what the attacker got.

    Returns the attacked faces (``x_adv``) and counts: how many disrupt G, how many of those
    evade S, and the clean scores' spread (the hinge's unit, as in ``bench.adaptive``).
    """
    from magdr.attacks import SUCCESS_MSE

    P.eval()
    dev = next(P.parameters()).device
    clean = hinge.consistency_batched(x, c)
    hinge.scale = max(float(clean.std()), 1e-12)
    t0 = time.monotonic()
    x_adv = adaptive_pool(hinge, x, c, a.adv_eps, a.adv_steps, a.adv_evade, seed)
    s = hinge.consistency_batched(x_adv, c)
    disrupt = ((_outputs(hinge.G, x_adv, c, dev) - y) ** 2).flatten(1).mean(1) > SUCCESS_MSE
    out = {
        "disrupt": int(disrupt.sum()),
        "evade": int((disrupt & (s <= hinge.threshold)).sum()),
        "clean_max": float(clean.max()),
        "scale": hinge.scale,
        "seconds": round(time.monotonic() - t0),
    }
    log.info("adversarial round: %s", out)
    return {**out, "x_adv": x_adv}


def _outputs(
    G: torch.nn.Module,
    x: torch.Tensor,
    c: torch.Tensor | None,
    dev: torch.device,
    chunk: int = 64,
) -> torch.Tensor:
    """G(x, c) (or a purifier's P(x) with ``c=None``) in chunks, on the CPU."""
    with torch.no_grad():
        return torch.cat(
            [(G(x[i : i + chunk].to(dev)) if c is None
              else G(x[i : i + chunk].to(dev), c[i : i + chunk].to(dev))).cpu()
             for i in range(0, len(x), chunk)]
        )  # fmt: skip


def purifier_loss(
    P: torch.nn.Module,
    G: torch.nn.Module,
    x_adv: torch.Tensor,
    c_adv: torch.Tensor,
    y_adv: torch.Tensor,
    x_adv_clean: torch.Tensor,
    x_clean: torch.Tensor,
    c_clean: torch.Tensor,
    y_clean: torch.Tensor,
    beta: float,
    gamma: float,
    ssim: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The loss of :mod:`magdr.purifier`'s docstring; ``y_*`` are G's outputs on clean faces.

    ``ssim`` weighs ``1 - SSIM`` of G's outputs on the purified attacked faces (0: not computed).
    """
    n = x_adv.shape[0]
    p = P(torch.cat([x_adv, x_clean]))
    y = G(p, torch.cat([c_adv, c_clean]))
    terms = {
        "out": F.l1_loss(y[:n], y_adv),
        "in": F.l1_loss(p[:n], x_adv_clean),
        "id_in": F.l1_loss(p[n:], x_clean),
        "id_out": F.l1_loss(y[n:], y_clean),
    }
    total = terms["out"] + beta * terms["in"] + gamma * (terms["id_in"] + terms["id_out"])
    if ssim:
        terms["dssim"] = dssim(y[:n], y_adv).mean()
        total = total + ssim * terms["dssim"]
    terms["total"] = total
    return terms


def distill_loss(
    P: torch.nn.Module,
    x_adv: torch.Tensor,
    t_adv: torch.Tensor,
    x_clean: torch.Tensor,
    t_clean: torch.Tensor,
    gamma: float,
) -> dict[str, torch.Tensor]:
    """``--teacher``'s loss: P's output against the teacher's ``t_*``, attacked and clean faces."""
    n = x_adv.shape[0]
    p = P(torch.cat([x_adv, x_clean]))
    terms = {"out": F.l1_loss(p[:n], t_adv), "id_in": F.l1_loss(p[n:], t_clean)}
    terms["total"] = terms["out"] + gamma * terms["id_in"]
    return terms


def _cosine(lr: float, frac: float, warmup: float = 0.03) -> float:
    if frac < warmup:
        return lr * frac / warmup
    return lr * (0.01 + 0.99 * (1 + math.cos(math.pi * (frac - warmup) / (1 - warmup))) / 2)


def main(argv: list[str] | None = None) -> dict[str, float]:  # noqa: D103
    ap = argparse.ArgumentParser(
        prog="python -m training.purifier",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--G", default="default", help="generator checkpoint or 'default'")
    ap.add_argument("--faces", type=int, default=512, help="train faces in the attack pool")
    ap.add_argument("--attacks", default=",".join(TRAIN_ATTACKS))
    ap.add_argument("--eps", default="0.03,0.04,0.05,0.06", help="radii drawn per chunk")
    ap.add_argument("--attack-steps", type=int, default=10, help="PGD and I-FGSM iterations")
    ap.add_argument("--cw-steps", type=int, default=30, help="C&W-L2 Adam steps")
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=12, help="attacked faces per step")
    ap.add_argument("--clean-batch", type=int, default=4, help="clean faces per step (identity)")
    ap.add_argument("--beta", type=float, default=3.0, help="weight of the input distance")
    ap.add_argument("--ssim", type=float, default=0.5, help="weight of the output SSIM distance")
    ap.add_argument("--gamma", type=float, default=1.0, help="weight of the clean identity")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="end (and finish the lr schedule) after this much wall time",
    )
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/purifier"))
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write P (default RUN_DIR/purifier.pt; shipped: {DEFAULT_PURIFIER})",
    )
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--init", type=Path, default=None, help="purifier weights to start from")
    ap.add_argument(
        "--teacher", default=None, help="a trained purifier to distil ('default' or a path)"
    )
    ap.add_argument(
        "--adversarial", type=int, default=0, metavar="R",
        help="rounds of defence-aware attacks on P as the detector's transform (0: none)",
    )  # fmt: skip
    ap.add_argument("--adv-faces", type=int, default=64, help="pool faces attacked per round")
    ap.add_argument("--adv-eps", type=float, default=0.1, help="their L∞ radius")
    ap.add_argument("--adv-steps", type=int, default=60, help="their PGD iterations")
    ap.add_argument("--adv-evade", type=float, default=0.05, help="their λ_e")
    ap.add_argument(
        "--adv-profile", default="default",
        help="the profile whose threshold τ the attacker aims under ('default' or a JSON path)",
    )  # fmt: skip
    ap.add_argument(
        "--robust", type=float, default=0.0, metavar="SHARE",
        help="share of each attacked batch made online by PGD through G∘P (0: none)",
    )  # fmt: skip
    ap.add_argument("--robust-eps", default="0.03,0.05,0.1", help="radii drawn per step")
    ap.add_argument("--robust-steps", type=int, default=5, help="PGD iterations per batch")
    ap.add_argument("--smoke", action="store_true", help="2 steps on fabricated faces, temp dir")
    a = ap.parse_args(argv)
    if (a.adversarial or a.robust) and a.teacher is not None:
        ap.error("--adversarial and --robust train against G: not with --teacher")
    if not 0 <= a.robust <= 1:
        ap.error(f"--robust: a share in [0, 1], got {a.robust}")
    torch.set_num_threads(a.threads)
    if a.smoke:
        a.run_dir = Path(tempfile.mkdtemp(prefix="magdr-purifier-"))
        a.steps, a.faces, a.batch, a.clean_batch, a.attack_steps, a.cw_steps = 2, 8, 2, 2, 1, 1
        a.width, a.log_every = 4, 1
        a.adv_faces, a.adv_steps, a.robust_steps = min(a.adv_faces, 4), 1, 1
    out = a.out or a.run_dir / "purifier.pt"
    setup_logging(a.run_dir)
    rng = seed_all(a.seed)
    dev = torch.device(a.device)

    import magdr
    from magdr.calibrate import random_edits

    G = magdr.load_generator(a.G, device=dev).eval()
    for p in G.parameters():
        p.requires_grad_(False)
    size = int(getattr(G, "image_size", D.SIZE))
    if a.smoke:
        cel = D.fake_faces(a.faces, size=size)
        idx = np.arange(a.faces)
    else:
        cel = D.load_celeba(a.data)
        idx = np.sort(rng.choice(len(D.CELEBA_TRAIN), a.faces, replace=False))
    x = D.to_tensor(cel["images"][idx])
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area").clamp(-1, 1)
    c = random_edits(G, cel["attrs"][idx], rng)
    attacks = [s.strip() for s in a.attacks.split(",") if s.strip()]
    eps = [float(e) for e in a.eps.split(",")]
    if unknown := sorted(set(attacks) - set(TRAIN_ATTACKS)):
        ap.error(f"--attacks: unknown {', '.join(unknown)}; expected {', '.join(TRAIN_ATTACKS)}")
    log.info("attack pool: %d faces, %s, eps %s, %d steps", len(x), attacks, eps, a.attack_steps)
    key = f"{weights_digest(G)}-{hashlib.sha256(idx.tobytes()).hexdigest()[:8]}-{a.seed}-" + (
        f"{'+'.join(attacks)}-{'+'.join(map(str, eps))}-{a.attack_steps}"
        + (f"-cw{a.cw_steps}" if "cw" in attacks else "")
    )
    cache = None if a.smoke else D.cache_dir() / f"purifier-pool-{key}.pt"
    pool_s = 0  # seconds spent making the pool (0: read from the cache)
    if cache is not None and cache.exists():
        x_adv = torch.load(cache, weights_only=True)
    else:
        t0 = time.monotonic()
        x_adv = attack_pool(G, x, c, attacks, eps, a.attack_steps, rng, cw_steps=a.cw_steps)
        pool_s = round(time.monotonic() - t0)
        log.info("attack pool made in %d s", pool_s)
        if cache is not None:
            torch.save(x_adv, cache)
    y, y_adv = _outputs(G, x, c, dev), _outputs(G, x_adv, c, dev)
    mse = ((y_adv - y) ** 2).flatten(1).mean(1)
    log.info("pool: %.0f%% of attacks disrupt G (MSE > 0.05)", 100 * (mse > 0.05).float().mean())

    t_adv = t_clean = teacher = None
    if a.teacher is not None:
        T = load_purifier(a.teacher, dev)
        # a name such as "default" names whatever is shipped now: the digest says which it was
        teacher = {"path": str(a.teacher), "digest": weights_digest(T)}
        with torch.no_grad():
            t_adv, t_clean = _outputs(T, x_adv, None, dev), _outputs(T, x, None, dev)
        del T
    P = Purifier(a.width)
    if a.init is not None:
        P = load_purifier(a.init)
    P.to(dev).train()
    opt = torch.optim.Adam(P.parameters(), lr=a.lr)
    budget = Budget(a.steps, a.max_minutes)
    losses = LossLog(a.run_dir)
    # The attacked pool and, per entry, the face it was made from (--adversarial appends).
    face_of = torch.arange(len(x))
    hinge, rounds = None, []
    if a.adversarial:
        from magdr.profile import load_profile

        threshold = load_profile(a.adv_profile).threshold
        hinge = DetectorHinge(G, P, threshold, 1.0)
    robust_eps = [float(e) for e in a.robust_eps.split(",")]
    gen = torch.Generator(device=dev)
    step = 0
    bar = tqdm(range(a.steps), desc="purifier")
    for step in bar:  # noqa: B007 - the step reached is reported after the loop
        if budget.done(step):
            break
        if hinge is not None and len(rounds) < a.adversarial:
            if step >= len(rounds) * a.steps / a.adversarial:
                pick = torch.from_numpy(np.sort(rng.choice(len(x), a.adv_faces, replace=False)))
                seed = a.seed + len(rounds)
                rounds.append(_adversarial_round(hinge, P, x[pick], c[pick], y[pick], a, seed))
                x_adv = torch.cat([x_adv, rounds[-1].pop("x_adv")])
                face_of = torch.cat([face_of, pick])
                P.train()
        for g in opt.param_groups:
            g["lr"] = _cosine(a.lr, budget.fraction(step))
        n_online = round(a.batch * a.robust)
        ia = torch.from_numpy(rng.choice(len(x_adv), a.batch - n_online, replace=False))
        fa = face_of[ia]
        x_att = x_adv[ia].to(dev)
        if n_online:
            io = torch.from_numpy(rng.choice(len(x), n_online, replace=False))
            gen.manual_seed(int(rng.integers(2**31)))
            online = robust_attack(G, P, x[io].to(dev), c[io].to(dev), y[io].to(dev),
                                   float(rng.choice(robust_eps)), a.robust_steps, gen)  # fmt: skip
            x_att, fa = torch.cat([x_att, online]), torch.cat([fa, io])
        ic = torch.from_numpy(rng.choice(len(x), a.clean_batch, replace=False))
        # No flip augmentation: G(flip(x)) is not flip(G(x)), and a flipped perturbation is no
        # longer the one that disrupts G.
        if t_adv is not None:
            terms = distill_loss(
                P, x_adv[ia].to(dev), t_adv[ia].to(dev), x[ic].to(dev), t_clean[ic].to(dev),
                a.gamma,
            )  # fmt: skip
        else:
            terms = purifier_loss(
                P, G,
                x_att, c[fa].to(dev), y[fa].to(dev), x[fa].to(dev),
                x[ic].to(dev), c[ic].to(dev), y[ic].to(dev),
                a.beta, a.gamma, a.ssim,
            )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        bar.set_postfix(out=f"{terms['out'].item():.4f}", id=f"{terms['id_in'].item():.4f}")
        if (step + 1) % a.log_every == 0:
            losses.write(step + 1, {k: v.item() for k, v in terms.items()})
    else:
        step = a.steps
    wall = time.monotonic() - budget.t0
    log.info("stopped at step %d after %.0f s", step, wall)
    P.eval()
    save_purifier(
        P.cpu(), out,
        generator=str(a.G), generator_digest=weights_digest(G), trained_on="CelebA train split"
        if not a.smoke else "fabricated faces (smoke)",
        attacks=attacks, eps=eps, attack_steps=a.attack_steps,
        cw_steps=a.cw_steps if "cw" in attacks else None, faces=len(x), steps=step,
        batch=[a.batch, a.clean_batch], beta=a.beta, gamma=a.gamma, ssim=a.ssim, lr=a.lr,
        seed=a.seed, wall_s=round(wall), pool_s=pool_s, device=str(dev),
        init=None if a.init is None else {"path": str(a.init), **getattr(P, "meta", {})},
        teacher=teacher,
        adversarial=None if hinge is None else {
            "rounds": rounds, "faces": a.adv_faces, "eps": a.adv_eps, "steps": a.adv_steps,
            "evade_weight": a.adv_evade, "threshold": hinge.threshold,
        },
        robust=None if not a.robust else {
            "share": a.robust, "eps": robust_eps, "steps": a.robust_steps,
        },
    )  # fmt: skip
    log.info("wrote %s", out)
    return {"steps": float(step), "wall_s": wall}


if __name__ == "__main__":
    main()
