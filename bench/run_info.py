"""Run metadata every measurement stamps on its results: the code's commit and the machine.

Below every stage that uses it (``python -m bench``, ``bench.scaling``, ``bench.soak``,
``bench.video``, ``bench.demo_frames``): it imports no other module of ``bench``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from."""
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return info


def machine_label(device: torch.device) -> str:
    """A run's machine in a few words: the GPU's name, else the CPU cores."""
    m = machine(device)
    return m.get("gpu") or f"{m['cpu_count']} CPU cores"


def commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked code under bench/ or magdr/ differs (not
    bench/results/, which a measurement run before this one may have rewritten)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "bench",
                "magdr",
                ":!bench/results",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
