"""Plain helpers for the daemon tests: synthetic clips, config files and their TOML tables,
free ports, waiting, ZeroMQ test peers, and the daemon as a subprocess or an in-process service
(each started one stopped again however the test ends)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import zmq

if TYPE_CHECKING:
    from daemon.service import Service

ROOT = Path(__file__).resolve().parents[2]
DAEMON = [sys.executable, "-m", "daemon"]


# ---- media ------------------------------------------------------------------------------------
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


def png_header_only(w: int, h: int) -> bytes:
    """A PNG signature + IHDR declaring ``w x h`` RGB and nothing else (a decompression bomb's
    head: a decoder that trusts it allocates ``w*h*3`` bytes before finding the data gone)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


# ---- config -----------------------------------------------------------------------------------
def write_config(
    path: Path,
    models: dict[str, Path],
    body: str = "",
    guard: bool = False,
    faces: str = "frame",
    work: Path | None = None,
    batch_timeout_ms: int = 20,
    max_frame_pixels: int | None = None,
    precision: str = "float32",
) -> Path:
    """A config file for tests: tiny models, 'frame' faces, small batches, short timers.

    ``precision`` is float32 unless asked: tests compare the daemon's faces with float32 passes
    of G, and ``"auto"`` would pick bfloat16 on a CPU with AVX-512 BF16.
    """
    pixels = "" if max_frame_pixels is None else f"max_frame_pixels = {max_frame_pixels}\n"
    text = (
        f"""
[model]
generator = "{models["G"]}"
parser = "{models["parser"]}"
profile = "{models["profile"]}"
device = "cpu"
threads = 1
precision = "{precision}"

[guard]
{pixels}enabled = {str(guard).lower()}
batch_size = 4
batch_timeout_ms = {batch_timeout_ms}
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


def toml_table(array: str, **keys: object) -> str:
    """One ``[[array]]`` table of a config body, keys in the order given."""
    lines = [f"[[{array}]]"] + [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    return "\n" + "\n".join(lines) + "\n"


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str | Path):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml_value, v)) + "]"
    return str(v)


def folder_io(root: Path) -> str:
    """Config body: a folder source ``root/inbox`` (stable after 0.2 s), a folder sink
    ``root/outbox``."""
    return toml_table("sources", kind="folder", path=root / "inbox", stable_s=0.2) + toml_table(
        "sinks", kind="folder", path=root / "outbox"
    )


def zmq_source(port: int, **keys: object) -> str:
    """Config body: a ZeroMQ source on ``tcp://127.0.0.1:port`` with ``keys``."""
    return toml_table("sources", kind="zmq", endpoint=f"tcp://127.0.0.1:{port}", **keys)


def zmq_sink(port: int, **keys: object) -> str:
    """Config body: a ZeroMQ sink on ``tcp://127.0.0.1:port`` with ``keys``."""
    return toml_table("sinks", kind="zmq", endpoint=f"tcp://127.0.0.1:{port}", **keys)


def daemon_env(**extra: str) -> dict[str, str]:
    """Environment for a daemon subprocess (this checkout on the path, few threads)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


# ---- waiting, ports, sockets ------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], object], timeout: float) -> bool:
    """Poll ``cond`` every 50 ms until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def connect(ctx: zmq.Context, kind: int, port: int, **options: int | bytes) -> zmq.Socket:
    """A ``kind`` socket connected to ``tcp://127.0.0.1:port``; ``options`` (ZeroMQ option
    names, e.g. ``SUBSCRIBE=b"", RCVTIMEO=10000``) are set before connecting."""
    s = ctx.socket(kind)
    for name, value in options.items():
        s.setsockopt(getattr(zmq, name), value)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


class Notify:
    """A real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def wait_for(self, key: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(msg)
            if key in msg:
                return msg
        raise AssertionError(f"no {key} in {self.messages}")

    def close(self) -> None:
        self.sock.close()


# ---- the daemon -------------------------------------------------------------------------------
def run_daemon(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m daemon ARGS`` to completion, output captured as text."""
    return subprocess.run(
        [*DAEMON, *args], capture_output=True, text=True, env=daemon_env(), timeout=timeout
    )


def start_daemon(cfg: Path, log: Path, notify: Notify | None = None) -> subprocess.Popen:
    """``python -m daemon run --config CFG`` in the background, stdout and stderr appended to
    ``log``; ``notify`` becomes its ``$NOTIFY_SOCKET``."""
    env = daemon_env(**({"NOTIFY_SOCKET": notify.path} if notify else {}))
    with open(log, "ab") as f:
        return subprocess.Popen(
            [*DAEMON, "run", "--config", str(cfg)], stdout=f, stderr=subprocess.STDOUT, env=env
        )


def stop_process(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@contextmanager
def running_daemon(
    cfg: Path, log: Path, notify: Notify | None = None
) -> Iterator[subprocess.Popen]:
    """:func:`start_daemon`, killed on the way out if the test left it running."""
    proc = start_daemon(cfg, log, notify)
    try:
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def running_service(cfg: Path) -> Iterator[Service]:
    """The daemon's :class:`~daemon.service.Service` in-process (no systemd), started from the
    config file ``cfg`` and stopped on the way out."""
    from daemon.config import load_config
    from daemon.notify import Notifier
    from daemon.service import Service

    svc = Service(load_config(cfg), Notifier(env={}))
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
