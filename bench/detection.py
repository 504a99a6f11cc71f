"""Table 1: detection of defence-unaware attacks, per attack and task (DESIGN §7).

Positives are the validation faces whose attack succeeded (MSE(G(x̂), G(x)) > 0.05, Ruiz et
al.); negatives are the clean validation faces and their benign copies (JPEG q75, down-up
resize, slight blur). Every detector's threshold was set beforehand on train faces at 5% FPR.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.common import Bench, benign, detection_row, output_mse, roc_curve
from bench.data import Faces

log = logging.getLogger(__name__)

AttackFn = Callable[[Any, torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor]


def attack_suite(
    cw_steps: int = 100, steps: int = 10, eps: float = 0.05, step: float = 0.01
) -> dict[str, AttackFn]:
    """The defence-unaware attacks of Table 1 with Ruiz et al.'s settings by default.

    PGD and I-FGSM: ε 0.05, step 0.01, ``steps`` (10) iterations; C&W-L2: ``magdr.attacks``
    defaults (const 0.05, Adam lr 0.01) with ``cw_steps`` iterations; targeted (Eq. 2): ε 0.05,
    ``steps`` steps towards another face's clean output (the next face of the batch; for
    unconditional face-swap models the input itself, as the paper attacks CycleGAN).
    """
    from magdr import attacks

    def targeted(G: Any, x: torch.Tensor, c: torch.Tensor | None, gen: torch.Generator):
        if getattr(G, "c_dim", 0) == 0 or x.shape[0] == 1:
            target = x
        else:
            with torch.no_grad():
                target = G(x.roll(1, 0), c.roll(1, 0))
        return attacks.targeted(G, x, c, target, eps=eps, step=step, steps=steps)

    return {
        "PGD": lambda G, x, c, gen: attacks.pgd(
            G, x, c, eps=eps, step=step, steps=steps, generator=gen
        ),
        "I-FGSM": lambda G, x, c, gen: attacks.ifgsm(G, x, c, eps=eps, step=step, steps=steps),
        "C&W-L2": lambda G, x, c, gen: attacks.cw_l2(G, x, c, steps=cw_steps),
        "Targeted": targeted,
    }


@dataclass
class Attacked:
    """One attack's output on the validation faces."""

    x_adv: torch.Tensor
    ok: torch.Tensor  # bool [B], successful
    seconds: float
    mse: torch.Tensor  # [B], MSE(G(x̂), G(x))
    linf: torch.Tensor  # [B], ‖x̂ − x‖∞


def run_attack(bench: Bench, fn: AttackFn, faces: Faces, seed: int) -> Attacked:
    """Attack every face in batches; success by Ruiz et al.'s criterion."""
    t0 = time.time()
    gen = torch.Generator(device=bench.device).manual_seed(seed)
    x_adv = bench.map_batches(lambda xb, cb: fn(bench.G, xb, cb, gen), faces.x, faces.c)
    mse = output_mse(bench.G, faces.x, x_adv, faces.c, bench.batch)
    linf = (x_adv - faces.x).abs().flatten(1).amax(1)
    return Attacked(x_adv, mse > bench.success_mse, time.time() - t0, mse, linf)


def run(
    bench: Bench, val: Faces, suite: dict[str, AttackFn], seed: int = 0
) -> tuple[dict[str, Any], dict[str, Attacked]]:
    """Table 1.

    Returns:
        ``(results, attacked)``: results hold ``rows[attack][task][detector]`` (precision,
        recall, f1, fpr, auroc, fpr@95tpr, n_pos, n_neg), ``roc[attack][detector]`` (fpr, tpr
        lists, all tasks), ``success[attack]`` and the negatives' counts; ``attacked`` the
        adversarial faces per attack.
    """
    neg_faces = benign(val)
    neg = bench.scores(neg_faces.x, neg_faces.c)
    tasks = sorted(set(val.task))
    groups = ([*tasks, "all"]) if len(tasks) > 1 else ["all"]
    res: dict[str, Any] = {"rows": {}, "roc": {}, "success": {}, "attack_s": {}}
    attacked: dict[str, Attacked] = {}
    for k, (name, fn) in enumerate(suite.items()):
        a = run_attack(bench, fn, val, seed + 17 * k)
        attacked[name] = a
        pos_faces = Faces(a.x_adv, val.c, val.task, val.ids).subset(a.ok)
        pos = bench.scores(pos_faces.x, pos_faces.c)
        log.info("%s: %d/%d successful (%.0f s)", name, int(a.ok.sum()), len(val), a.seconds)
        res["success"][name] = {
            "ok": int(a.ok.sum()),
            "n": len(val),
            "mse_median": float(a.mse.median()) if len(a.mse) else float("nan"),
            "mse_mean": float(a.mse.mean()) if len(a.mse) else float("nan"),
            "linf_mean": float(a.linf.mean()) if len(a.linf) else float("nan"),
        }
        res["attack_s"][name] = round(a.seconds, 1)
        res["rows"][name] = {}
        for task in groups:
            nm = np.array([t == task or task == "all" for t in neg_faces.task])
            pm = np.array([t == task or task == "all" for t in pos_faces.task], bool)
            res["rows"][name][task] = {
                d: detection_row(neg[d][nm], pos[d][pm], bench.thresholds[d]) for d in bench.names
            }
        res["roc"][name] = {}
        for d in bench.names:
            fpr, tpr = roc_curve(neg[d], pos[d])
            res["roc"][name][d] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    res["n_neg"] = len(neg_faces)
    res["groups"] = groups
    res["group_labels"] = {g: (tasks[0] if g == "all" and len(tasks) == 1 else g) for g in groups}
    return res, attacked
