"""Follow the faces of one video stream from frame to frame.

A full-frame detection finds every face; between two of them each known face is found again in
a window around its last box (:class:`FaceFollower`). The window is small and seen at a higher
scale than the downscaled full frame, so following costs less than detecting and gives finer
landmarks. A full detection runs again every ``every`` frames (new faces), and at once when a
followed face is lost or its score drops below ``min_score``.

Landmarks of a followed face are smoothed with a One Euro filter (Casiez et al., CHI 2012): a
low-pass whose cut-off rises with the landmarks' speed, so a still face stops jittering and a
moving one does not lag. Every frame's face still goes through G and the guard; only where the
crop is cut comes from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from magdr.faces.locate import FaceBox


def iou(a: FaceBox, b: FaceBox) -> float:
    """Intersection over union of two boxes."""
    iw = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    ih = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    inter = max(iw, 0) * max(ih, 0)
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


class OneEuro:
    """One Euro filter over an array of points, in units of the face's size per frame.

    Args:
        min_cutoff: cut-off frequency at rest, in cycles per frame (lower: steadier, laggier).
        beta: how fast the cut-off rises with speed (per face size per frame).
        d_cutoff: cut-off of the speed estimate itself.
    """

    def __init__(self, min_cutoff: float, beta: float = 4.0, d_cutoff: float = 0.15) -> None:
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None

    @staticmethod
    def _alpha(cutoff: float) -> float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau)  # one frame between samples

    def __call__(self, x: np.ndarray, scale: float) -> np.ndarray:
        """The filtered points; ``scale`` (the face's size in pixels) normalises the speed."""
        if self.x is None:
            self.x, self.dx = x.copy(), np.zeros_like(x)
            return x
        dx = (x - self.x) / max(scale, 1.0)
        a_d = self._alpha(self.d_cutoff)
        self.dx = a_d * dx + (1 - a_d) * self.dx
        cutoff = self.min_cutoff + self.beta * float(np.abs(self.dx).max())
        a = self._alpha(cutoff)
        self.x = a * x + (1 - a) * self.x
        return self.x.copy()


@dataclass
class _Track:
    box: FaceBox
    filter: OneEuro | None


@dataclass
class FollowStats:
    """What a follower did: full detections, window re-detections, and why it re-detected."""

    frames: int = 0
    detections: int = 0
    followed: int = 0
    lost: int = 0


class FaceFollower:
    """The faces of one stream: detected every ``every`` frames, followed in between.

    Args:
        detect: a detector from :func:`magdr.faces.detector.load_detector`.
        every: frames from one full detection to the next (1: detect every frame).
        min_size: smallest face side, frame pixels.
        max_faces: most faces kept.
        max_side: the full frame's longer side for detection.
        window: side of the search window around a face's last box, in box sides.
        window_side: the window is scaled to at most this side for detection.
        min_score: a followed face scoring less than this triggers a full detection.
        smooth: the One Euro filter's ``min_cutoff`` (cycles per frame) on each followed
            face's landmarks; 0 = no smoothing.

    Not thread-safe: one follower per stream, called with that stream's frames in order.
    """

    def __init__(
        self,
        detect: Callable[..., list[FaceBox]],
        *,
        every: int = 1,
        min_size: int = 32,
        max_faces: int | None = 8,
        max_side: int = 320,
        window: float = 2.0,
        window_side: int = 160,
        min_score: float = 0.8,
        smooth: float = 0.0,
    ) -> None:
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.detect, self.every = detect, every
        self.min_size, self.max_faces, self.max_side = min_size, max_faces, max_side
        self.window, self.window_side, self.min_score = window, window_side, min_score
        self.smooth = smooth
        self.tracks: list[_Track] = []
        self._since = 0  # frames since the last full detection
        self._shape: tuple[int, ...] | None = None
        self.stats = FollowStats()

    def __call__(self, frame: np.ndarray) -> list[FaceBox]:
        """The faces of the stream's next frame (boxes with their landmarks).

        Largest first as of the last full detection; followed faces keep that order.
        """
        self.stats.frames += 1
        boxes = None
        if self.tracks and self._since < self.every - 1 and frame.shape == self._shape:
            boxes = self._follow(frame)
            if boxes is None:
                self.stats.lost += 1
        if boxes is None:
            boxes = self.detect(
                frame, min_size=self.min_size, max_faces=self.max_faces, max_side=self.max_side
            )
            self.stats.detections += 1
            self._since, self._shape = 0, frame.shape
            self.tracks = self._match(boxes)
        else:
            self.stats.followed += 1
            self._since += 1
            self.tracks = [_Track(b, t.filter) for b, t in zip(boxes, self.tracks, strict=True)]
        return [self._smoothed(t) for t in self.tracks]

    def _follow(self, frame: np.ndarray) -> list[FaceBox] | None:
        """Each track's face found again in a window around its last box; None if one is lost."""
        h, w = frame.shape[:2]
        k_full = min(1.0, self.max_side / max(h, w))  # the full detection's scale
        out = []
        for t in self.tracks:
            b = t.box
            side = self.window * max(b.w, b.h)
            x0 = max(0, round(b.x + b.w / 2 - side / 2))
            y0 = max(0, round(b.y + b.h / 2 - side / 2))
            x1, y1 = min(w, round(x0 + side)), min(h, round(y0 + side))
            if x1 - x0 < self.min_size or y1 - y0 < self.min_size:
                return None
            # never coarser than the full detection: a window must not move the landmarks
            side_px = max(x1 - x0, y1 - y0)
            found = self.detect(
                np.ascontiguousarray(frame[y0:y1, x0:x1]),
                min_size=self.min_size,
                max_faces=None,
                max_side=max(self.window_side, round(side_px * k_full)),
            )
            found = [_shifted(f, x0, y0) for f in found]
            best = max(found, key=lambda f: iou(f, b), default=None)
            if best is None or best.score < self.min_score or iou(best, b) < 0.3:
                return None
            out.append(best)
        return out

    def _match(self, boxes: list[FaceBox]) -> list[_Track]:
        """Tracks for a full detection's boxes, each continuing the best-overlapping old one."""
        old = list(self.tracks)
        tracks = []
        for b in boxes:
            j = max(range(len(old)), key=lambda i: iou(b, old[i].box), default=None)
            if j is not None and iou(b, old[j].box) >= 0.3:
                tracks.append(_Track(b, old.pop(j).filter))
            else:
                tracks.append(_Track(b, OneEuro(self.smooth) if self.smooth > 0 else None))
        return tracks

    @staticmethod
    def _smoothed(t: _Track) -> FaceBox:
        if t.filter is None or t.box.points is None:
            return t.box
        return replace(t.box, points=t.filter(t.box.points, max(t.box.w, t.box.h)))


def _shifted(b: FaceBox, dx: int, dy: int) -> FaceBox:
    """``b`` found in a window whose corner is at ``(dx, dy)``, in frame pixels."""
    pts = None if b.points is None else b.points + (dx, dy)
    return FaceBox(b.x + dx, b.y + dy, b.w, b.h, b.score, pts)
