"""Shared plumbing of the training scripts: seeding, checkpoints, loss logs, smoke data."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("training")


def seed_all(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return a NumPy generator for data augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def setup_logging(run_dir: Path) -> None:
    """Log to ``run_dir/train.log`` and to stderr."""
    run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("training")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler()):
        h.setFormatter(fmt)
        root.addHandler(h)


def smoke_settings(a: argparse.Namespace, argv: list[str] | None, **values: object) -> None:
    """Set ``--smoke``'s small values on ``a``, except for options given on the command line.

    So a test can still ask a smoke run for, say, ``--ckpt-every 1000`` and see it honoured.
    """
    given = {arg.split("=")[0] for arg in (sys.argv[1:] if argv is None else argv)}
    for name, value in values.items():
        if "--" + name.replace("_", "-") not in given:
            setattr(a, name, value)


class LossLog:
    """Appends one JSON line of losses per logged step to ``run_dir/losses.jsonl``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "losses.jsonl"
        self.t0 = time.time()

    def write(self, step: int, losses: dict[str, float]) -> None:  # noqa: D102
        rec = {"step": step, "t": round(time.time() - self.t0, 1), **losses}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("step %d %s", step, " ".join(f"{k}={v:.4f}" for k, v in losses.items()))


class Budget:
    """Training progress in [0, 1] by steps or by wall time, whichever runs out first.

    ``--max-minutes`` makes a run end on time on an unknown machine (a lent GPU): schedules
    that read :meth:`fraction` then still decay to their end instead of stopping mid-way.
    """

    def __init__(self, steps: int, max_minutes: float | None = None) -> None:
        self.steps = steps
        self.seconds = None if max_minutes is None else max_minutes * 60.0
        self.t0 = time.monotonic()

    def fraction(self, step: int) -> float:  # noqa: D102
        f = step / max(self.steps, 1)
        if self.seconds is not None:
            spent = time.monotonic() - self.t0
            f = max(f, spent / self.seconds if self.seconds > 0 else 1.0)
        return min(f, 1.0)

    def done(self, step: int) -> bool:  # noqa: D102
        return step >= self.steps or self.fraction(step) >= 1.0


def save_ckpt(path: Path, step: int, rng: np.random.Generator, **state: object) -> None:
    """Atomically write a resumable checkpoint (models, optimisers, step, RNG states)."""
    obj = {
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "np_rng": rng.bit_generator.state,
        **{k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_ckpt(path: Path, rng: np.random.Generator, **state: object) -> int:
    """Restore what :func:`save_ckpt` wrote into the given objects; return the step."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    for k, v in state.items():
        if hasattr(v, "load_state_dict") and k in obj:
            v.load_state_dict(obj[k])  # type: ignore[union-attr]
    torch.set_rng_state(obj["torch_rng"])
    rng.bit_generator.state = obj["np_rng"]
    return int(obj["step"])


def tensor_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain, contiguous, CPU state dict (loads with ``weights_only=True``)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
