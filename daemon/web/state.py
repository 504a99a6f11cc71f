"""What the operator page shows: every stream and file the daemon guards, in bounded memory.

Sources and the service tell :class:`OperatorView` what happens (a frame in, a drop, a guarded
frame, a file started or finished); the HTTP server (:mod:`daemon.web.server`) reads it. Memory
stays bounded whatever arrives: at most :data:`MAX_STREAMS` streams (the one updated longest ago
goes first), ring buffers per stream (:data:`VERDICTS` verdicts, :data:`FLAGGED` flagged faces),
one frame per stream (downscaled to :data:`FRAME_SIDE`) and :data:`MAX_JOBS` files.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from daemon.pipeline import Guarded

MAX_STREAMS = 64
MAX_JOBS = 200
VERDICTS = 240
FLAGGED = 12
FRAME_SIDE = 640  # the page shows it at most 640 pixels wide
JPEG_QUALITY = 80
#: the pictures of a flagged face's side by side, in the page's order.
DETAIL_IMAGES = ("input", "output_before", "purified", "output", "regions")


def jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of an RGB ``(H, W, 3)`` uint8 image."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise ValueError(f"cannot encode a {image.shape} image as JPEG")
    return buf.tobytes()


class Rate:
    """Events per second over the last ``window_s`` seconds (frames/s in and out)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.times: deque[float] = deque(maxlen=256)
        self.first: float | None = None

    def tick(self, now: float) -> None:  # noqa: D102
        self.times.append(now)
        self.first = now if self.first is None else self.first

    def per_s(self, now: float) -> float:  # noqa: D102
        if self.first is None:
            return 0.0
        recent = sum(now - t <= self.window_s for t in self.times)
        # over the whole window (a batch emits frames in bursts), or the stream's life so far
        return round(recent / max(min(self.window_s, now - self.first), 1.0), 2)


@dataclass
class StreamState:
    """One stream (a ZeroMQ stream id, or a file's NAME while it is guarded)."""

    id: str
    source: str
    frames_in: int = 0
    frames_out: int = 0
    faces: int = 0
    flagged: int = 0
    dropped: int = 0
    updated: float = 0.0
    rate_in: Rate = field(default_factory=Rate)
    rate_out: Rate = field(default_factory=Rate)
    verdicts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=VERDICTS))
    flagged_faces: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=FLAGGED))
    flagged_seen: int = 0
    image: np.ndarray | None = None
    image_seq: int = -1
    frame_size: tuple[int, int] = (0, 0)
    jpeg: tuple[int, bytes] | None = None

    def summary(self, now: float) -> dict[str, Any]:
        """The ``GET /api/streams`` row."""
        return {
            "id": self.id,
            "source": self.source,
            "frames": self.frames_out,
            "frames_in": self.frames_in,
            "faces": self.faces,
            "flagged": self.flagged,
            "dropped": self.dropped,
            "fps": self.rate_out.per_s(now),
            "fps_in": self.rate_in.per_s(now),
            "frame_size": list(self.frame_size),
            "last_verdict": self.verdicts[-1] if self.verdicts else None,
        }


def _compact(v: dict[str, Any]) -> dict[str, Any]:
    """The part of a verdict the page shows (scores, boxes, chains), stamped with wall time."""
    keys = ("seq", "disrupted", "score", "threshold", "faces", "latency_ms")
    return {"time": round(time.time(), 3), **{k: v.get(k) for k in keys}}


class OperatorView:
    """Thread-safe, bounded state behind the operator page and ``/api/*``.

    Args:
        outbox: the folder sink's path; the only place file outputs are served from.
    """

    def __init__(self, outbox: str | Path | None = None) -> None:
        self.outbox = Path(outbox).resolve() if outbox else None
        self._streams: OrderedDict[str, StreamState] = OrderedDict()
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.version = 0
        self.evicted = 0

    # ---- what happens -------------------------------------------------------------------
    def _stream(self, stream: str, source: str, now: float) -> StreamState:
        s = self._streams.get(stream)
        if s is None:
            if len(self._streams) >= MAX_STREAMS:  # the one updated longest ago goes
                self._streams.popitem(last=False)
                self.evicted += 1
            s = self._streams[stream] = StreamState(stream, source)
        self._streams.move_to_end(stream)
        s.updated = now
        return s

    def _touch(self) -> None:
        self.version += 1
        self._changed.notify_all()

    def frame_in(self, stream: str, source: str) -> None:
        """A frame of ``stream`` arrived (before any queue)."""
        now = time.monotonic()
        with self._lock:
            s = self._stream(stream, source, now)
            s.frames_in += 1
            s.rate_in.tick(now)
            self._touch()

    def dropped(self, stream: str, source: str) -> None:
        """A frame of ``stream`` was dropped (full queue, stopping, guard error)."""
        with self._lock:
            self._stream(stream, source, time.monotonic()).dropped += 1
            self._touch()

    def guarded(self, g: Guarded) -> None:
        """A guarded frame left the pipeline: counters, timeline, live frame, flagged faces."""
        now = time.monotonic()
        v = g.verdict
        image = _fit(g.image, FRAME_SIDE)
        flagged = [(i, d) for i, d in enumerate(g.details or []) if d]
        # encoded outside the lock: flagged faces are rare, and their crops are small
        pictures = [{k: jpeg(d[k]) for k in DETAIL_IMAGES} for _, d in flagged]
        with self._lock:
            s = self._stream(v["stream"], g.source or "?", now)
            s.frames_out += 1
            # a file's frames are counted in only here: files drop none
            s.frames_in = max(s.frames_in, s.frames_out)
            s.rate_out.tick(now)
            s.faces += len(v["faces"])
            s.flagged += sum(bool(f["disrupted"]) for f in v["faces"])
            s.verdicts.append(_compact(v))
            s.image, s.image_seq = image, v["seq"]
            s.frame_size = (g.image.shape[1], g.image.shape[0])  # the boxes' coordinates
            for (i, d), pics in zip(flagged, pictures, strict=True):
                s.flagged_faces.append(
                    {
                        "n": s.flagged_seen,
                        "seq": v["seq"],
                        "face": i,
                        "time": time.time(),
                        "box": v["faces"][i]["box"],
                        "score": v["faces"][i]["score"],
                        "score_after": d.get("score_after"),
                        "threshold": v["threshold"],
                        "chain": v["faces"][i]["chain"],
                        "regions": d.get("flagged_regions", []),
                        "pictures": pics,
                    }
                )
                s.flagged_seen += 1
            self._touch()

    def job_started(self, name: str, source: str, input_name: str) -> None:
        """A file was claimed and is being guarded."""
        with self._lock:
            while len(self._jobs) >= MAX_JOBS:
                self._jobs.popitem(last=False)
            self._jobs[name] = {
                "name": name,
                "input": input_name,
                "source": source,
                "state": "running",
                "frames": 0,
                "started": time.time(),
                "summary": None,
                "error": None,
            }
            self._touch()

    def job_progress(self, name: str, frames: int) -> None:  # noqa: D102
        with self._lock:
            if name in self._jobs:
                self._jobs[name]["frames"] = frames
                self._touch()

    def job_finished(
        self, name: str, state: str, summary: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        """A file ended: ``done`` (with its summary), ``failed`` (with the error), ``stopped``."""
        with self._lock:
            job = self._jobs.get(name)
            if job is None:
                return
            job.update(state=state, summary=summary, error=error, finished=time.time())
            if summary:
                job["frames"] = summary.get("frames", job["frames"])
            self._touch()

    # ---- what the page reads ------------------------------------------------------------
    def wake(self) -> None:
        """Wake every :meth:`wait_changed` (the server is stopping)."""
        with self._changed:
            self._changed.notify_all()

    def wait_changed(self, version: int, timeout: float) -> int:
        """Block until the state is newer than ``version`` (or ``timeout``); the version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != version, timeout)
            return self.version

    def streams(self) -> list[dict[str, Any]]:  # noqa: D102
        now = time.monotonic()
        with self._lock:
            return [s.summary(now) for s in reversed(self._streams.values())]

    def stream(self, stream: str) -> dict[str, Any] | None:
        """One stream's row, its last verdicts and its flagged faces (without pictures)."""
        now = time.monotonic()
        with self._lock:
            s = self._streams.get(stream)
            if s is None:
                return None
            flagged = [{k: f[k] for k in f if k != "pictures"} for f in s.flagged_faces]
            return {
                **s.summary(now),
                "verdicts": list(s.verdicts),
                "flagged_faces": flagged,
                "frame_seq": s.image_seq,
            }

    def frame_jpeg(self, stream: str) -> bytes | None:
        """The latest cleaned frame of ``stream`` as JPEG (encoded once per frame asked for)."""
        with self._lock:
            s = self._streams.get(stream)
            if s is None or s.image is None:
                return None
            if s.jpeg is not None and s.jpeg[0] == s.image_seq:
                return s.jpeg[1]
            image, seq = s.image, s.image_seq
        data = jpeg(image)
        with self._lock:
            s.jpeg = (seq, data)
        return data

    def flagged_picture(self, stream: str, n: int, kind: str) -> bytes | None:
        """Picture ``kind`` (:data:`DETAIL_IMAGES`) of flagged face number ``n`` of ``stream``."""
        with self._lock:
            s = self._streams.get(stream)
            for f in s.flagged_faces if s else ():
                if f["n"] == n:
                    return f["pictures"].get(kind)
        return None

    def jobs(self) -> list[dict[str, Any]]:  # noqa: D102
        with self._lock:
            return [dict(j) for j in reversed(self._jobs.values())]

    def job_output(self, name: str, key: str) -> Path | None:
        """The path of output ``key`` of a finished job, only inside the outbox, else None."""
        with self._lock:
            job = self._jobs.get(name)
            summary = job and job.get("summary")
            file = summary and summary.get("outputs", {}).get(key)
        if not file or self.outbox is None:
            return None
        path = self.outbox / file
        # the summary names plain files in the outbox; anything else is not served
        if path.parent != self.outbox or path.is_symlink() or not path.is_file():
            return None
        return path


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` downscaled so that its longer side is at most ``side`` (bounded memory)."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    k = side / max(h, w)
    return cv2.resize(
        image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA
    )
