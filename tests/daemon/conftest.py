"""Shared fixtures: a tiny random StarGAN checkpoint, synthetic clips, config files."""

from __future__ import annotations

import json
import os
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fresh_logging():
    """Tests that run the CLI in-process configure structlog; undo it for the next test."""
    yield
    import logging

    import structlog

    structlog.reset_defaults()
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_magdr", False):
            root.removeHandler(h)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random G (32 px), tiny parser, and a detection-only profile (huge threshold)."""
    from magdr.faces.parsenet import ParseNet
    from magdr.models.stargan import StarGAN
    from magdr.profile import Profile, RecNetSettings

    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    G = StarGAN(conv_dim=8, c_dim=5, repeat_num=1, image_size=32)
    torch.save(G.state_dict(), d / "G.pt")
    (d / "G.json").write_text(json.dumps({"image_size": 32}))
    torch.save(ParseNet(width=4, depth=2).state_dict(), d / "parser.pt")
    Profile(
        name="test-detect-only",
        threshold=1e6,
        consistency=[{"name": "jpeg", "params": {"quality": 75}}],
    ).save(d / "profile.json")
    # Flags every face and reconstructs with one cheap search: the disrupted path, fast.
    Profile(
        name="test-flag-all",
        threshold=-1e6,
        consistency=[{"name": "jpeg", "params": {"quality": 75}}],
        recnet=RecNetSettings(
            layers=[["gaussian_blur"]],
            patches=[["skin", "hair"]],
            top_categories=1,
            score_transforms=1,
            max_rounds=1,
        ),
    ).save(d / "flag_all.json")
    return {
        "G": d / "G.pt",
        "parser": d / "parser.pt",
        "profile": d / "profile.json",
        "flag_all": d / "flag_all.json",
    }


def make_clip(
    path: Path,
    frames: int = 4,
    size: tuple[int, int] = (48, 32),
    rate: int = 10,
    codec: str = "libx264",
    time_base: Fraction | None = None,
    seed: int = 0,
) -> list[int]:
    """Encode a small synthetic clip with PyAV; returns the pts written."""
    rng = np.random.default_rng(seed)
    w, h = size
    pts = []
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        tb = time_base or Fraction(1, rate)
        s.time_base = tb
        s.codec_context.time_base = tb
        step = int(round(1 / (rate * tb)))
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (i * 40) % 256
            img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 255, 3, dtype=np.uint8)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i * step, tb
            pts.append(i * step)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return pts


def read_pts(path: Path) -> tuple[list[int], Fraction]:
    """Presentation timestamps of a video's decoded frames and the stream time base."""
    with av.open(str(path)) as c:
        tb = c.streams.video[0].time_base
        return [f.pts for f in c.decode(video=0)], tb


def write_config(
    path: Path,
    models: dict[str, Path],
    body: str = "",
    guard: bool = False,
    faces: str = "frame",
    work: Path | None = None,
) -> Path:
    """A config file for tests: tiny models, 'frame' faces, small batches, short timers."""
    text = (
        f"""
[model]
generator = "{models["G"]}"
parser = "{models["parser"]}"
profile = "{models["profile"]}"
device = "cpu"
threads = 1

[guard]
enabled = {str(guard).lower()}
batch_size = 4
batch_timeout_ms = 20
faces = "{faces}"

[logging]
level = "info"
format = "json"

[daemon]
work_dir = "{work or path.parent / "state"}"
rescan_s = 1.0
drain_timeout_s = 20
"""
        + body
    )
    path.write_text(text)
    return path


def daemon_env(**extra: str) -> dict[str, str]:
    """Environment for a daemon subprocess (this checkout on the path, few threads)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


DAEMON = [sys.executable, "-m", "daemon"]
