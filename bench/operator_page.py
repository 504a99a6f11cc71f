"""The operator page against a running daemon: screenshots, and how often the live view updates.

    python -m bench.operator_page [--models tiny|default] [--seconds 10] [--fps 10]
                                  [--batch-size 4] [--shots DIR]
    python -m bench.operator_page --memory

Starts ``magdr-guard run`` with a ZeroMQ PULL source and ``[http]`` (with a token), sends the
bundled demo clip's frames as stream ``demo`` at ``--fps`` (with ``--models default``, also a
PGD-disrupted copy made by ``magdr-guard attack`` as stream ``demo-attacked``), opens the page in
Debian's Chromium through Playwright, counts the new frames the live view loads in ``--seconds``
and saves screenshots: the stream list, the live view, a flagged face's side by side. Frames
leave the guard a batch at a time and the page shows each batch's newest, so the live view's
rate is the smaller of the batches per second and the page's 4 events per second.
``--models tiny`` uses the tests' tiny random models with a profile that flags every face (fast;
the pictures are noise); ``default`` the shipped ones. The browser side is shared with
``tests/daemon/test_browser.py``. ``--memory`` measures instead what the page's state holds
after 1000 streams of flagged 1280x720 frames.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import av
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "daemon" / "assets" / "demo.mp4"
CHROMIUM = os.environ.get("MAGDR_CHROMIUM", "/usr/bin/chromium")
# Debian's Chromium as Playwright's browser: nothing is downloaded, nothing reaches the network
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "bench-token-0123456789"

# Counts the distinct frames the live view loads in `ms` milliseconds.
COUNT_FRAMES_JS = """ms => new Promise(done => {
  const img = document.getElementById('frame'), seqs = new Set();
  const seen = () => seqs.add(img.src.split('seq=')[1]);
  img.addEventListener('load', seen);
  setTimeout(() => { img.removeEventListener('load', seen); done(seqs.size); }, ms);
})"""


def launch(p: Any) -> Any:
    """Debian's Chromium, headless, through a started ``sync_playwright()``."""
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def clip_frames(path: Path, every: int = 1) -> list[np.ndarray]:
    """Every ``every``-th frame of a clip, RGB."""
    with av.open(str(path)) as c:
        return [
            f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(video=0)) if i % every == 0
        ]


class Sender:
    """Streams of frames over a ZeroMQ PUSH socket at ``fps``, looping, on their own thread.

    Args:
        port: the daemon's PULL port on 127.0.0.1.
        streams: ``{stream id: frames}``; a stream with fewer frames than another is sent
            only as long as it lasts, once.
        fps: frames per second of each stream.
    """

    def __init__(self, port: int, streams: dict[str, list[np.ndarray]], fps: float) -> None:
        from daemon import wire

        self.encode = wire.encode_frame
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 4)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.streams, self.period = streams, 1.0 / fps
        self.longest = max(len(f) for f in streams.values())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seq = 0
        while not self.stop.wait(self.period):
            for name, frames in self.streams.items():
                if len(frames) == self.longest or seq < len(frames):
                    img = frames[seq % len(frames)]
                    self.sock.send_multipart(self.encode(name, seq, img, "jpeg"))
            seq += 1

    def __enter__(self) -> Sender:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def flag_all_profile(path: Path) -> Path:
    """A profile that flags every face and cleans it with one cheap search (the disrupted
    path of the daemon, fast, on tiny models)."""
    from magdr.profile import Profile, RecNetSettings

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
    ).save(path)
    return path


def api(port: int, path: str) -> Any:
    """``GET path`` with the bench's token; the decoded JSON."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(d: Path, models: str, zport: int, web: int, batch_size: int = 4) -> Path:
    if models == "tiny":
        from bench.soak import tiny_models

        m = tiny_models(d)
        model = (
            f'generator = "{m["G"]}"\nparser = "{m["parser"]}"\n'
            f'profile = "{flag_all_profile(d / "flag_all.json")}"\n'
        )
    else:
        model = 'generator = "default"\n'
    (d / "token").write_text(TOKEN)
    cfg = d / "c.toml"
    cfg.write_text(f"""[model]
{model}device = "cpu"
threads = 1

[guard]
batch_size = {batch_size}
batch_timeout_ms = 30

[[sources]]
kind = "zmq"
endpoint = "tcp://127.0.0.1:{zport}"
socket = "pull"
bind = true
queue_size = 8
policy = "drop-oldest"

[http]
enabled = true
port = {web}
token = "file:{d / "token"}"

[logging]
format = "json"

[daemon]
work_dir = "{d / "state"}"
watchdog = false
""")
    return cfg


def _attacked(d: Path, frames: int) -> list[np.ndarray]:
    """``frames`` frames of the demo clip disrupted by PGD (``magdr-guard attack``)."""
    out = d / "attacked"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "attack",
            str(DEMO),
            "--out",
            str(out),
            "--frames",
            str(frames),
        ],
        check=True,
        capture_output=True,
    )
    every = clip_frames(next(out.glob("demo.adv.*")))
    # the attack spreads its frames evenly over the clip; the others are left clean
    picked = np.linspace(0, len(every) - 1, frames).round().astype(int)
    return [every[i] for i in sorted(set(picked.tolist()))]


def run(
    models: str,
    seconds: float,
    fps: float,
    shots: Path,
    wait_flagged: float = 600.0,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Start the daemon, feed it, measure the page; the report."""
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        zport, web = _free_port(), _free_port()
        cfg = _config(d, models, zport, web, batch_size)
        streams = {"demo": clip_frames(DEMO)}
        if models == "default":
            streams["demo-attacked"] = _attacked(d, 8)
        log = open(d / "daemon.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    api(web, "/api/streams")
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError((d / "daemon.log").read_text()[-2000:]) from None
                    time.sleep(0.5)
            with Sender(zport, streams, fps), sync_playwright() as p:
                browser = launch(p)
                ctx = browser.new_context(
                    extra_http_headers={"Authorization": f"Bearer {TOKEN}"},
                    viewport={"width": 1280, "height": 1000},
                )
                page = ctx.new_page()
                page.goto(f"http://127.0.0.1:{web}/#stream=demo")
                page.locator("#streams tbody tr").first.wait_for(timeout=120_000)
                page.wait_for_function(
                    "() => document.getElementById('frame').naturalWidth > 0", timeout=120_000
                )
                before = {s["id"]: s["frames"] for s in api(web, "/api/streams")}
                shown = page.evaluate(COUNT_FRAMES_JS, int(seconds * 1000))
                after = {s["id"]: s for s in api(web, "/api/streams")}
                page.screenshot(path=shots / "operator-live-view.png", full_page=True)
                # a disrupted face's Rec-Net search takes long on a CPU: wait for one
                deadline = time.monotonic() + wait_flagged
                while (
                    flagged := next(
                        (s["id"] for s in api(web, "/api/streams") if s["flagged"]), None
                    )
                ) is None and time.monotonic() < deadline:
                    time.sleep(2)
                if flagged is not None:
                    page.goto(f"http://127.0.0.1:{web}/#stream={quote(flagged, safe='')}")
                    page.locator("#flagged button").first.wait_for(timeout=120_000)
                    page.locator("#flagged button").first.click()
                    page.wait_for_function(
                        "() => [...document.querySelectorAll('#sbs-pictures img')]"
                        ".every(i => i.complete && i.naturalWidth > 0)",
                        timeout=60_000,
                    )
                    page.screenshot(path=shots / "operator-flagged-face.png", full_page=True)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()
    guarded = after["demo"]["frames"] - before.get("demo", 0)
    return {
        "models": models,
        "batch_size": batch_size,
        "seconds": seconds,
        "sent_fps": fps,
        "live_view_frames_per_s": round(shown / seconds, 2),
        "guarded_frames_per_s": round(guarded / seconds, 2),
        "streams": {
            k: {f: v[f] for f in ("frames", "faces", "flagged", "dropped", "fps")}
            for k, v in after.items()
        },
        "flagged_face_shown": flagged is not None,
        "screenshots": str(shots),
    }


def state_memory(streams: int = 1000, side: tuple[int, int] = (1280, 720)) -> dict[str, Any]:
    """Memory the page's state holds after ``streams`` streams of flagged ``side`` frames
    (tracemalloc, numpy's buffers included): the bounds of :mod:`daemon.web.state` at work."""
    import tracemalloc

    from daemon.pipeline import Guarded
    from daemon.web import state as S

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (side[1], side[0], 3), dtype=np.uint8)
    crop = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    detail = {**{k: crop for k in S.DETAIL_IMAGES}, "flagged_regions": ["hair"]}
    chain = [{"name": "gaussian_blur", "params": {"sigma": 0.8}, "region": ["skin", "hair"]}]
    tracemalloc.start()
    view, frames = S.OperatorView(), 0
    for i in range(streams):
        # every 50th stream fills its ring buffers; the others send 3 frames
        for seq in range(S.VERDICTS + 20 if i % 50 == 0 else 3):
            face = {"box": [0, 0, 8, 8], "disrupted": True, "score": 0.1, "chain": chain}
            v = {
                "stream": f"s{i}",
                "seq": seq,
                "disrupted": True,
                "score": 0.1,
                "threshold": 0.05,
                "faces": [face],
            }
            view.guarded(Guarded(frame.copy(), v, source="zmq0", details=[detail]))
            frames += 1
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "frames": frames,
        "streams_sent": streams,
        "streams_kept": len(view.streams()),
        "held_mib": round(held / 2**20, 1),
        "peak_mib": round(peak / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:  # noqa: D103
    ap = argparse.ArgumentParser(
        prog="python -m bench.operator_page", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--models", choices=["tiny", "default"], default="tiny")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=10.0, help="frames per second sent per stream")
    ap.add_argument("--shots", type=Path, default=Path(tempfile.gettempdir()) / "magdr-page")
    ap.add_argument(
        "--wait-flagged",
        type=float,
        default=600.0,
        help="seconds to wait for a flagged face to screenshot",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="[guard] batch_size: the live view shows each batch's newest frame",
    )
    ap.add_argument(
        "--memory",
        action="store_true",
        help="only measure the state's memory after 1000 streams (no daemon)",
    )
    a = ap.parse_args(argv)
    report = (
        state_memory()
        if a.memory
        else run(a.models, a.seconds, a.fps, a.shots, a.wait_flagged, a.batch_size)
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
