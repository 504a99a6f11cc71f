"""Inference-time variants of the purifier P against an attacker who averages over them.

Issue 30's item 2 asks whether randomness at inference (noise before P, a random resize and
pad, a random choice among purifiers), ensembles, or a stronger deterministic pre-filter make
G∘P harder to beat at a large radius. Each variant T replaces P on the purifier's road, and the
attacker runs L∞ PGD on ``MSE(G(T(x̂), c), G(x, c))`` with Expectation over Transformation
(the mean over ``--eot`` draws of T per step, Athalye et al. 2018), so a gain is not gradient
masking::

    python -m bench.purifier_variants --n 16 --steps 50 --eps 0.1 --json out.json

Counted per variant on CelebA validation faces (``008001`` on): the clean cost (PSNR of
G(T(x), c) to G(x, c)) and the share of attacked faces whose G(T(x̂), c) is still more than
0.05 MSE from G(x, c), averaged over ``--draws`` draws of T (what a published frame gets).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from magdr.attacks import PGD, SUCCESS_MSE, _mse
from magdr.metrics import psnr as psnr_db

#: A purifier variant T: faces in, purified faces out (random ones draw from their generator).
Variant = Callable[[torch.Tensor], torch.Tensor]


def _noise(P: nn.Module, sigma: float, g: torch.Generator) -> Variant:
    def T(x: torch.Tensor) -> torch.Tensor:
        n = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        return P(x + sigma * n)

    return T


def _resize_pad(P: nn.Module, g: torch.Generator, smallest: float = 0.8) -> Variant:
    """Shrink by a random factor in [smallest, 1], pad at a random place, purify, undo."""

    def T(x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        s = int(torch.randint(int(smallest * size), size + 1, (), generator=g))
        top, left = (int(v) for v in torch.randint(0, size - s + 1, (2,), generator=g))
        small = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        padded = F.pad(small, (left, size - s - left, top, size - s - top), mode="replicate")
        out = P(padded)[..., top : top + s, left : left + s]
        return F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)

    return T


def _down_up(P: nn.Module) -> Variant:
    return lambda x: P(
        F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    )


def _choice(P: nn.Module, Q: nn.Module, g: torch.Generator) -> Variant:
    return lambda x: P(x) if torch.rand((), generator=g) < 0.5 else Q(x)


#: name -> (what it does, is it random, T from (P, Q, generator)).
VARIANTS: dict[str, tuple[str, bool, Callable[..., Variant]]] = {
    "P": ("the shipped purifier (the guard's road)", False, lambda P, Q, g: P),
    "P∘P": ("the purifier twice", False, lambda P, Q, g: lambda x: P(P(x))),
    "down-up": ("2× average-pool and bilinear up, then P", False, lambda P, Q, g: _down_up(P)),
    "noise 0.05": ("Gaussian noise σ 0.05 before P", True, lambda P, Q, g: _noise(P, 0.05, g)),
    "noise 0.1": ("Gaussian noise σ 0.1 before P", True, lambda P, Q, g: _noise(P, 0.1, g)),
    "resize-pad": (
        "random shrink to 80-100 % and pad, P, undo",
        True,
        lambda P, Q, g: _resize_pad(P, g),
    ),
    "mean of P and Q": (
        "mean of P's and the second purifier's outputs",
        False,
        lambda P, Q, g: lambda x: 0.5 * (P(x) + Q(x)),
    ),
    "P or Q": ("P or the second purifier, at random", True, lambda P, Q, g: _choice(P, Q, g)),
}


class EoTPGD(PGD):
    """L∞ PGD on ``MSE(G(T(x̂), c), r)``, each step's loss the mean over ``eot`` draws of T."""

    def __init__(self, G: nn.Module, T: Variant, eot: int = 1, **kw: Any) -> None:
        super().__init__(G, **kw)
        self.T, self.eot = T, int(eot)

    def _objective(
        self, c: torch.Tensor | None, r: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        def expected(x_adv: torch.Tensor) -> torch.Tensor:
            return torch.stack([_mse(self.G(self.T(x_adv), c), r) for _ in range(self.eot)]).mean(0)

        return expected


def run_variant(
    G: nn.Module, T: Variant, random: bool, x: torch.Tensor, c: torch.Tensor,
    eps_list: Sequence[float], steps: int, step: float, eot: int, draws: int, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """One variant: its clean cost and, per ε, the attacked faces it lets through."""
    draws = draws if random else 1
    with torch.no_grad():
        ref = G(x, c)
        clean = torch.stack([psnr_db(G(T(x), c), ref) for _ in range(draws)]).mean(0)
    out: dict[str, Any] = {"clean_psnr_db": float(clean.mean()),
                           "clean_psnr_min_db": float(clean.min()), "eps": {}}  # fmt: skip
    for eps in eps_list:
        t0 = time.monotonic()
        attack = EoTPGD(G, T, eot=eot if random else 1, eps=eps, step=step, steps=steps)
        x_adv = attack(x, c, reference=ref, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            mse = torch.stack([_mse(G(T(x_adv), c), ref) for _ in range(draws)])
            plain = _mse(G(x_adv, c), ref)
        out["eps"][str(eps)] = {
            "faces": len(x),
            "through": float((mse > SUCCESS_MSE).float().sum(1).mean()),
            "median_mse": float(mse.median()),
            "disrupting_plain_g": int((plain > SUCCESS_MSE).sum()),
            "seconds": time.monotonic() - t0,
        }
    return out


def section(res: dict[str, Any]) -> str:
    """The report's "Purifier variants at inference" section."""
    eps = sorted({e for v in res["variants"].values() for e in v["eps"]}, key=float)
    lines = [
        "## Purifier variants at inference",
        "",
        f"`{res['command']}` — commit `{res['commit'][:12]}`, {res['machine']}. {res['attack']}",
        "",
        "Each variant T stands in for P on the purifier's road; *through*: G(T(x̂), c) still "
        "more than 0.05 MSE from G(x, c) (mean over draws of a random T). Clean: PSNR of "
        "G(T(x), c) to G(x, c) on the same faces unattacked.",
        "",
        "| variant | what | random | clean PSNR mean / min | "
        + " | ".join(f"through at ε {e}" for e in eps)
        + " |",
        "| --- | --- | --- | ---: |" + " ---: |" * len(eps),
    ]
    for name, v in res["variants"].items():
        cells = []
        for e in eps:
            r = v["eps"].get(e)
            cells.append(f"{r['through']:g}/{r['faces']} (median MSE {r['median_mse']:.3f})"
                         if r else "–")  # fmt: skip
        lines.append(f"| {name} | {VARIANTS[name][0]} | {'yes' if VARIANTS[name][1] else 'no'} | "
                     f"{v['clean_psnr_db']:.1f} / {v['clean_psnr_min_db']:.1f} dB | "
                     f"{' | '.join(cells)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.purifier_variants``."""
    ap = argparse.ArgumentParser(prog="python -m bench.purifier_variants",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--variants", default=",".join(VARIANTS), help="of: " + ", ".join(VARIANTS))
    ap.add_argument("--n", type=int, default=16, help="CelebA validation faces")
    ap.add_argument("--eps", default="0.1")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--step", type=float, default=0.01)
    ap.add_argument("--eot", type=int, default=4, help="draws of a random T per attack step")
    ap.add_argument("--draws", type=int, default=4, help="draws of a random T counted")
    ap.add_argument("--second", default="detector",
                    help="the ensembles' second purifier Q: a shipped name or a path")  # fmt: skip
    ap.add_argument("--edit", default="Blond_Hair=1")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=None)
    a = ap.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    if unknown := [v for v in names if v not in VARIANTS]:
        ap.error(f"--variants: unknown {', '.join(unknown)}; expected of {', '.join(VARIANTS)}")
    import magdr
    from bench.run_info import commit, machine_label
    from magdr.celeba import CELEBA_VAL, load_celeba, to_tensor
    from magdr.purifier import load_purifier

    torch.manual_seed(0)
    G = magdr.load_generator("default")
    P, Q = load_purifier("default"), load_purifier(a.second)
    for m in (G, P, Q):
        m.requires_grad_(False)
    images = load_celeba()["images"][CELEBA_VAL.start - 1 : CELEBA_VAL.start - 1 + a.n]
    x = to_tensor(images)
    attr, value = a.edit.split("=")
    c = magdr.condition(G, {attr: float(value)}, batch=len(x))
    eps_list = [float(e) for e in a.eps.split(",")]
    res: dict[str, Any] = {"variants": {}}
    for name in names:
        g = torch.Generator().manual_seed(1)
        _, random, make = VARIANTS[name]
        res["variants"][name] = run_variant(G, make(P, Q, g), random, x, c, eps_list, a.steps,
                                            a.step, a.eot, a.draws)  # fmt: skip
        print(name, json.dumps(res["variants"][name]), flush=True)
    res |= {
        "command": shlex.join(["python", "-m", "bench.purifier_variants", *(argv or sys.argv[1:])]),
        "commit": commit(),
        "machine": machine_label(torch.device("cpu")),
        "attack": f"PGD through G∘T: {a.steps} steps of {a.step} from one random start, "
        f"EoT over {a.eot} draws per step for a random T, {a.draws} draws counted; second "
        f"purifier Q = {a.second}; edit {a.edit}; {a.n} CelebA validation faces from 008001.",
    }  # fmt: skip
    text = section(res)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    if a.report:
        from bench.report import put_section

        put_section(a.report, "## Purifier variants at inference", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
