"""What a white-box attacker gets through the whole guard: the published output, end to end.

Figure 3 counts F1 over the disruptions an adaptive attack leaves, which falls as the defence
gets stronger (the disruptions left are the evaders). A user of the daemon gets the guard's
``output``: this bench measures how often that output is still disrupted::

    python -m bench.end_to_end --n 64 --steps 200 --eps 0.03,0.05,0.1 --json out.json

The attack (:class:`GuardPGD`) differentiates everything the guard does on a face: G, the
detector's score S_final (its distilled purifier inside, Eq. 7 and 9) and the reconstructing
purifier P. A flagged face is published as G(P(x̂)), a passed one as G(x̂), so the attacker
ascends the MSE to G(x, c) of the soft mix

    (1 − g) · G(x̂, c) + g · G(P(x̂), c),     g = sigmoid((S_final(x̂) − τ) / T)

and wins either by evading the detector or by beating the purifier, whichever road is open.
The detector's and the purifier's transforms are networks (no BPDA needed). Rec-Net's search,
which runs when P leaves a face flagged, has no gradient: the third road (``replay``) runs the
real guard every few steps and ascends through the chain it chose for each face, held fixed
between runs, with BPDA through its filters. The count runs the real guard on every attacked
face. Restarts (``--restarts``, random starts) are run for each road and gate temperature
(``--temperatures``, in units of τ), and each face keeps its strongest attack: the one whose
published output is furthest from G(x, c).

Counted per ε on CelebA validation faces (``008001`` on): the share whose published output is
still more than 0.05 MSE from G(x, c) (*through*), the share the guard flags, the share that
disrupt plain G, and the paper's F1 and AUROC over the clean and attacked faces for comparison.
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

import numpy as np
import torch
from torch import nn

from magdr.attacks import PGD, SUCCESS_MSE, _mse
from magdr.calibrate import auroc
from magdr.metrics import psnr as psnr_db
from magdr.purifier import STEP_NAME

#: What :class:`GuardPGD` can aim at (its ``road``).
ATTACK_ROADS = ("gate", "purifier", "replay")


class GuardPGD(PGD):
    r"""L∞ PGD on the guard's published output (torchattacks' shape: ``attack(x, c)``).

    Maximises :math:`\mathrm{MSE}((1 - g)\,G(\hat x, c) + g\,G(P(\hat x), c),\ G(x, c))` with
    :math:`g = \sigma((S_{final}(\hat x) - \tau) / T)`: the published output of a guard that
    purifies the faces it flags (see the module docstring).

    Args:
        G: the generator.
        guard: a :class:`magdr.Guard` (its ``score``, ``purifier`` and profile threshold).
        eps: L∞ radius.
        step: step size.
        steps: iterations.
        temperature: T of the gate, in units of the threshold τ (small: a hard gate).
        random_start: start from a uniform point in the ε-ball.
        road: ``"gate"`` the soft mix above; ``"purifier"`` G(P(x̂), c) alone, the attacker
            betting that the face will be flagged (the gate starts near 0 on a clean face, so
            the mix spends its first steps on G and finds P's weak points late); ``"replay"``
            the real guard's road: every ``refresh`` steps the guard is run on x̂ and its chain
            per face (none for a face that passed, P, Rec-Net's search) is replayed
            differentiably, ``G(guard.replay(x̂, chains), c)`` with BPDA through the steps that
            have no gradient (Rec-Net's choice of chain has none: it is held between refreshes).
        refresh: steps between the real guard's runs on the ``"replay"`` road.
    """

    def __init__(
        self,
        G: nn.Module,
        guard: Any,
        eps: float = 0.1,
        step: float = 0.01,
        steps: int = 200,
        temperature: float = 0.25,
        random_start: bool = True,
        road: str = "gate",
        refresh: int = 10,
    ) -> None:
        super().__init__(G, eps=eps, step=step, steps=steps, random_start=random_start)
        if road not in ATTACK_ROADS:
            raise ValueError(f"road: expected one of {', '.join(ATTACK_ROADS)}, got {road!r}")
        if refresh < 1:
            raise ValueError(f"refresh: expected ≥ 1 step, got {refresh}")
        self.guard, self.temperature, self.road = guard, float(temperature), road
        self.refresh = int(refresh)

    def _modules(self) -> list[object]:
        return [self.G, self.guard]

    def published(self, x_adv: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """The soft model of the guard's output for ``x_adv`` (differentiable)."""
        if self.guard.purifier is not None and (self.guard.purify_all or self.road == "purifier"):
            return self.G(self.guard.purifier(x_adv), c)  # no gate: purified, flagged or not
        tau = float(self.guard.profile.threshold)
        gate = torch.sigmoid((self.guard.score(x_adv, c) - tau) / (self.temperature * tau))
        gate = gate.reshape(-1, 1, 1, 1)
        passed = self.G(x_adv, c)
        if self.guard.purifier is None:
            return passed
        return (1 - gate) * passed + gate * self.G(self.guard.purifier(x_adv), c)

    def _objective(
        self, c: torch.Tensor | None, r: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.road != "replay":
            return lambda x_adv: _mse(self.published(x_adv, c), r)
        calls, chains = 0, []

        def replayed(x_adv: torch.Tensor) -> torch.Tensor:
            nonlocal calls, chains
            if calls % self.refresh == 0:
                chains = self.guard(x_adv.detach(), c).chains
            calls += 1
            return _mse(self.G(self.guard.replay(x_adv, chains, differentiable=True), c), r)

        return replayed


@torch.no_grad()
def outcome(
    G: nn.Module, guard: Any, x: torch.Tensor, x_adv: torch.Tensor, c: torch.Tensor, batch: int = 16
) -> dict[str, np.ndarray]:
    """Per face: the real guard on ``x_adv``: published MSE to G(x, c), flag, score, plain MSE,
    and the road its output took (:data:`ROADS`: passed, cured by P alone, or Rec-Net's search).
    """
    out: dict[str, list[np.ndarray]] = {
        "published": [], "plain": [], "flagged": [], "score": [], "road": []
    }  # fmt: skip
    for i in range(0, len(x), batch):
        xb, ab, cb = x[i : i + batch], x_adv[i : i + batch], c[i : i + batch]
        ref = G(xb, cb)
        r = guard(ab, cb)
        out["published"].append(_mse(r.output, ref).cpu().numpy())
        out["plain"].append(_mse(G(ab, cb), ref).cpu().numpy())
        out["flagged"].append(r.disrupted.cpu().numpy())
        out["score"].append(r.score.cpu().numpy())
        flags = r.disrupted.tolist()
        out["road"].append(np.array([_road(f, ch) for f, ch in zip(flags, r.chains, strict=True)]))
    return {k: np.concatenate(v) for k, v in out.items()}


#: Where a face's published output came from.
ROADS = ("passed", "purifier", "recnet")


def _road(flagged: bool, chain: list[dict[str, Any]]) -> int:
    """Index into :data:`ROADS` of one face's output."""
    if not flagged:
        return 0
    return 1 if all(step.get("name") == STEP_NAME for step in chain) else 2


def strongest(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per face, the run whose published output is furthest from G(x, c)."""
    best = np.argmax(np.stack([r["published"] for r in runs]), 0)
    return {k: np.stack([r[k] for r in runs])[best, np.arange(len(best))] for k in runs[0]}


def summary(clean_scores: np.ndarray, threshold: float, att: dict[str, np.ndarray]) -> dict:
    """The counts of one ε: through, flagged, plain disruption, F1 and AUROC."""
    n = len(att["published"])
    disrupting = att["plain"] > SUCCESS_MSE
    tp = int((att["flagged"] & disrupting).sum())
    fn = int((~att["flagged"] & disrupting).sum())
    fp = int((clean_scores > threshold).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else float("nan")
    return {
        "faces": n,
        "through": int((att["published"] > SUCCESS_MSE).sum()),
        "through_by_road": {
            road: int(((att["published"] > SUCCESS_MSE) & (att["road"] == i)).sum())
            for i, road in enumerate(ROADS)
        },
        "flagged": int(att["flagged"].sum()),
        "disrupting": int(disrupting.sum()),
        "disrupting_unflagged": fn,
        "f1": f1,
        "auroc": float(auroc(clean_scores, att["score"][disrupting])) if disrupting.any()
        else float("nan"),
    }  # fmt: skip


def attacks_of(guard: Any, roads: Sequence[str], temperatures: Sequence[float]) -> list[dict]:
    """The attack settings each face is tried with: the soft gate at each temperature, the
    purifier's road and the replayed guard's, of those in ``roads``. A guard without a
    purifier publishes G(x̂) or Rec-Net's; one that purifies every face has no gate."""
    if guard.purifier is None:
        roads = [r for r in roads if r != "purifier"] or ["gate"]
        temperatures = [1.0]  # no mix: the gate's road is plain G(x̂)
    elif guard.purify_all:
        roads = [r for r in roads if r != "gate"] or ["purifier"]
    return [{"road": road, "temperature": t} for road in roads
            for t in (temperatures if road == "gate" else [1.0])]  # fmt: skip


@torch.no_grad()
def clean_path(G: nn.Module, guard: Any, x: torch.Tensor, c: torch.Tensor, batch: int = 16
               ) -> dict[str, Any]:  # fmt: skip
    """The guard on the clean faces: S_final, flags, its output's PSNR to G(x, c) and its time
    per face against plain G's (one pass over ``x`` each, after a warm-up batch)."""
    parts = [slice(i, i + batch) for i in range(0, len(x), batch)]
    G(x[parts[0]], c[parts[0]])
    guard(x[parts[0]], c[parts[0]])
    t0 = time.perf_counter()
    refs = [G(x[s], c[s]) for s in parts]
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = [guard(x[s], c[s]) for s in parts]
    t_guard = time.perf_counter() - t0
    psnr = torch.cat([psnr_db(r.output, ref) for r, ref in zip(results, refs, strict=True)])
    return {
        "scores": torch.cat([r.score for r in results]).cpu().numpy(),
        "psnr_db": float(psnr.mean()),
        "psnr_min_db": float(psnr.min()),
        "ms_per_face": 1000 * t_guard / len(x),
        "times_plain_g": t_guard / t_plain,
    }


#: Table 2's attacks that item 3's reconstruction gate is checked on beside each defence:
#: Ruiz et al.'s PGD (10 steps of 0.01) at these radii; the baseline is Table 2's best.
STANDARD_EPS = {"PGD ε 0.05": 0.05, "PGD ε 0.08": 0.08}


def reconstruction(
    G: nn.Module, guard: Any, x: torch.Tensor, c: torch.Tensor, batch: int = 16, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per :data:`STANDARD_EPS` attack, on the faces it disrupts: the guard's output PSNR to
    G(x, c) against the blur baseline's, and how many outputs stay disrupted."""
    from bench.baselines import ruiz_blur

    parts = [slice(i, i + batch) for i in range(0, len(x), batch)]
    with torch.no_grad():
        refs = [G(x[s], c[s]) for s in parts]
    out = {}
    for name, eps in STANDARD_EPS.items():
        g = torch.Generator().manual_seed(seed)
        attack = PGD(G, eps=eps, step=0.01, steps=10)
        x_adv = torch.cat([attack(x[s], c[s], generator=g) for s in parts])
        guard_db, blur_db, still = [], [], 0
        with torch.no_grad():
            for s, ref in zip(parts, refs, strict=True):
                hit = _mse(G(x_adv[s], c[s]), ref) > SUCCESS_MSE
                if not hit.any():
                    continue
                a, cc = x_adv[s][hit], c[s][hit]
                r = guard(a, cc)
                guard_db.append(psnr_db(r.output, ref[hit]))
                blur_db.append(psnr_db(G(ruiz_blur(a), cc), ref[hit]))
                still += int((_mse(r.output, ref[hit]) > SUCCESS_MSE).sum())
        guard_db = torch.cat(guard_db) if guard_db else torch.zeros(0)
        blur_db = torch.cat(blur_db) if blur_db else torch.zeros(0)
        n = len(guard_db)
        out[name] = {
            "faces": n,
            "guard_db": float(guard_db.mean()) if n else float("nan"),
            "blur_db": float(blur_db.mean()) if n else float("nan"),
            "still_disrupted": still,
        }
    return out


def run(G: nn.Module, guard: Any, x: torch.Tensor, c: torch.Tensor, eps_list: Sequence[float],
        steps: int, step: float, restarts: int, temperatures: Sequence[float], batch: int = 16,
        seed: int = 0, log: Any = print, roads: Sequence[str] = ATTACK_ROADS, refresh: int = 10,
        ) -> dict[str, Any]:  # fmt: skip
    """Every ε: the strongest of ``restarts`` × :func:`attacks_of` attacks per face, counted;
    and the clean path (:func:`clean_path`)."""
    clean = clean_path(G, guard, x, c, batch)
    scores = clean.pop("scores")
    clean["reconstruction"] = reconstruction(G, guard, x, c, batch, seed)
    tau = float(guard.profile.threshold)
    settings = attacks_of(guard, roads, temperatures)
    rows = {}
    for eps in eps_list:
        runs = []
        t0 = time.monotonic()
        for setting in settings:
            for k in range(restarts):
                attack = GuardPGD(G, guard, eps=eps, step=step, steps=steps, refresh=refresh,
                                  **setting)  # fmt: skip
                g = torch.Generator().manual_seed(seed + 1000 * k)
                x_adv = torch.cat([attack(x[i : i + batch], c[i : i + batch], generator=g)
                                   for i in range(0, len(x), batch)])  # fmt: skip
                runs.append(outcome(G, guard, x, x_adv, c, batch))
                log(f"eps {eps} {setting} restart {k}: through "
                    f"{int((runs[-1]['published'] > SUCCESS_MSE).sum())}/{len(x)}")  # fmt: skip
        rows[str(eps)] = summary(scores, tau, strongest(runs))
        rows[str(eps)]["seconds"] = time.monotonic() - t0
    return {"clean_flagged": int((scores > tau).sum()), "clean": len(x), "clean_path": clean,
            "attacks": settings, "eps": rows}  # fmt: skip


def _num(v: float, digits: int) -> str:
    """A number, or – where it is undefined (F1 and AUROC need a disruption of plain G)."""
    return "–" if v != v else f"{v:.{digits}f}"


def _shipped_first(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return dict(sorted(results.items(), key=lambda kv: kv[0] != SHIPPED))


def section(results: dict[str, dict[str, Any]]) -> str:
    """The report's "Adaptive attacker" section: a row per defence configuration and ε, the
    shipped guard's first; a configuration's ``note`` follows its command."""
    results = _shipped_first(results)
    lines = [
        "## Adaptive attacker",
        "",
        "*Through*: the real guard's published output still more than 0.05 MSE from G(x, c) "
        "(roads: the face passed, was cured by the purifier alone, went to Rec-Net's search); "
        "F1 and AUROC (the paper's, over clean faces and attacks that disrupt plain G) are "
        "undefined when none does. Clean path: the same faces unattacked, the guard's output "
        "against G(x, c) and its time against plain G's, in the same run.",
        "",
    ]
    for name, res in results.items():
        note = f" {res['note']}" if res.get("note") else ""
        lines.append(f"- **{name}**: `{res['command']}` — commit `{res['commit'][:12]}`, "
                     f"{res['machine']}. {res['attack']}{note}")  # fmt: skip
    lines += [
        "",
        "| defence | ε | faces | published output disrupted (through) | through: passed / "
        "purifier / Rec-Net | flagged | disrupting plain G | of those unflagged | F1 | AUROC | "
        "seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, res in results.items():
        for eps, r in res["eps"].items():
            n = r["faces"]
            by_road = r.get("through_by_road")  # runs before the road was recorded have none
            roads = " / ".join(str(by_road[k]) for k in ROADS) if by_road else "–"
            lines.append(
                f"| {name} | {eps} | {n} | {r['through']}/{n} ({100 * r['through'] / n:.1f}%) | "
                f"{roads} | {r['flagged']}/{n} | {r['disrupting']}/{n} | "
                f"{r['disrupting_unflagged']} | {_num(r['f1'], 2)} | {_num(r['auroc'], 3)} | "
                f"{r['seconds']:.0f} |"
            )
    lines += [
        "",
        "Per defence, the clean path and item 3's reconstruction check: Ruiz et al.'s PGD "
        "(10 steps of 0.01) at each radius, on the faces it disrupts: their number, the guard's "
        "PSNR(O) against G(x, c) / Table 2's best baseline's (Gaussian blur σ 1.5), the gain, "
        "and the outputs still disrupted.",
        "",
        "| defence | clean faces flagged | clean output vs G(x, c): mean / min PSNR | guard "
        f"ms per face | × plain G | {' | '.join(STANDARD_EPS)} |",
        "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(STANDARD_EPS),
    ]
    for name, res in results.items():
        cp = res.get("clean_path")  # runs before it was measured have none
        cost = (f"{cp['psnr_db']:.1f} / {cp['psnr_min_db']:.1f} dB | {cp['ms_per_face']:.1f} | "
                f"{cp['times_plain_g']:.2f}") if cp else "– | – | –"  # fmt: skip
        rec = (cp or {}).get("reconstruction", {})
        cells = [(f"{r['faces']}, {r['guard_db']:.1f} / {r['blur_db']:.1f} dB "
                  f"({r['guard_db'] - r['blur_db']:+.1f}), {r['still_disrupted']}")
                 if (r := rec.get(k)) and r["faces"] else "–" for k in STANDARD_EPS]  # fmt: skip
        lines.append(f"| {name} | {res['clean_flagged']}/{res['clean']} | {cost} | "
                     f"{' | '.join(cells)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


#: Figure 3 redrawn on what the guard publishes, beside the report.
FIGURE = "fig3_end_to_end.png"


def figure(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Figure 3 on the end-to-end share: the published outputs still disrupted against ε, one
    line per defence configuration, with the issue's bars (≤ 1% at ε 0.05, ≤ 5% at ε 0.1)."""
    from bench.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, res in _shipped_first(results).items():
        eps = sorted(res["eps"], key=float)
        share = [100 * res["eps"][e]["through"] / res["eps"][e]["faces"] for e in eps]
        ax.plot([float(e) for e in eps], share, "-o", ms=4, label=name)
    ax.plot([0.05, 0.1], [1, 5], "k_", ms=14, mew=2, label="bar")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("ε (L∞, [-1, 1] units)")
    ax.set_ylabel("published outputs disrupted (%)")
    ax.set_title("White-box attacker through the whole guard (Fig. 3, end to end)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_results(path: Path | None) -> dict[str, dict[str, Any]]:
    """The defence configurations measured so far in ``path`` (``{}`` when there is none).

    A file of one run, written before runs were kept per configuration, is the shipped guard's.
    """
    if path is None or not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {SHIPPED: data} if "eps" in data else data


#: The label of the guard as shipped (``magdr.Guard(G)``).
SHIPPED = "shipped"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.end_to_end``."""
    ap = argparse.ArgumentParser(prog="python -m bench.end_to_end",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--n", type=int, default=64, help="CelebA validation faces")
    ap.add_argument("--eps", default="0.03,0.05,0.1")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step", type=float, default=0.01)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--temperatures", default="0.1,1", help="gate temperatures, in units of τ")
    ap.add_argument(
        "--roads",
        default=",".join(ATTACK_ROADS),
        help="what the attack aims at: the gate, the purifier, the replayed guard",
    )
    ap.add_argument("--refresh", type=int, default=10,
                    help="replay road: steps between runs of the real guard")  # fmt: skip
    ap.add_argument("--purifier", default="auto", help="the guard's purifier: auto | none | path")
    ap.add_argument("--purify-all", action="store_true", help="the guard purifies every face")
    ap.add_argument("--label", default=None,
                    help="the defence configuration's name in the JSON and the report "
                    "(default: 'shipped', or the purifier and --purify-all)")  # fmt: skip
    ap.add_argument("--edit", default="Blond_Hair=1", help="the condition attacked")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--json", type=Path, default=None, help="results by defence; this run's added or replaced"
    )
    ap.add_argument("--report", type=Path, default=None, help="write '## Adaptive attacker'")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the report's section and figure from --json")  # fmt: skip
    a = ap.parse_args(argv)
    if a.render:
        if not (a.json and a.report):
            ap.error("--render: needs --json and --report")
        _write_report(load_results(a.json), a.report)
        return 0
    import magdr
    from bench.run_info import commit, machine_label
    from magdr.celeba import CELEBA_VAL, load_celeba, to_tensor
    from magdr.checkpoints import resolve_device

    roads = [r.strip() for r in a.roads.split(",") if r.strip()]
    if unknown := sorted(set(roads) - set(ATTACK_ROADS)):
        ap.error(f"--roads: unknown {', '.join(unknown)}; expected {', '.join(ATTACK_ROADS)}")
    shipped = a.purifier == "auto" and not a.purify_all
    every = ", every face" if a.purify_all else ""
    label = a.label or (SHIPPED if shipped else f"purifier {a.purifier}{every}")
    device = resolve_device(a.device)
    G = magdr.load_generator("default", device=device)
    guard = magdr.Guard(G, device=device, purifier=a.purifier, purify_all=a.purify_all)
    data = load_celeba()
    x = to_tensor(data["images"][CELEBA_VAL.start - 1 : CELEBA_VAL.start - 1 + a.n]).to(device)
    attr, value = a.edit.split("=")
    c = magdr.condition(G, {attr: float(value)}, batch=len(x)).to(device)
    res = run(G, guard, x, c, [float(e) for e in a.eps.split(",")], a.steps, a.step, a.restarts,
              [float(t) for t in a.temperatures.split(",")], a.batch, roads=roads,
              refresh=a.refresh)  # fmt: skip
    aims = ", ".join(f"gate T {s['temperature']} τ" if s["road"] == "gate" else s["road"]
                     for s in res["attacks"])  # fmt: skip
    res |= {
        "command": shlex.join(["python", "-m", "bench.end_to_end", *(argv or sys.argv[1:])]),
        "commit": commit(),
        "machine": machine_label(device),
        "attack": f"GuardPGD: {a.steps} steps of {a.step}, {a.restarts} random starts × "
        f"({aims}), the strongest per face; edit {a.edit}; CelebA validation faces from 008001.",
    }  # fmt: skip
    results = load_results(a.json) | {label: res}
    text = section(results)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if a.report:
        _write_report(results, a.report)
    return 0


def _write_report(results: dict[str, dict[str, Any]], report: Path) -> None:
    from bench.report import put_section

    figure(results, report.parent / FIGURE)
    put_section(report, "## Adaptive attacker", f"{section(results)}\n![end to end]({FIGURE})\n")


if __name__ == "__main__":
    raise SystemExit(main())
