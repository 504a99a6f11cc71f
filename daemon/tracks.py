"""Face tracks across a stream's frames, and the temporal rule that flags them.

An attack on a video disrupts face after face of one person; a clean face's score crosses the
threshold now and then, on its own. ``[guard] temporal_k`` / ``temporal_n`` read the evidence
per track: a face is reconstructed once ``k`` of its track's last ``n`` frames scored above the
threshold, and from then on every face of the track that scores above it is, with no wait.
A track is the chain of boxes that overlap (IoU) from one frame of a stream to its next; it
ends when its face is not found in a frame.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

#: Boxes of consecutive frames overlapping at least this much are the same face.
MIN_IOU = 0.3


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x, y, w, h]`` boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


class Track:
    """One face's recent verdicts and whether the temporal rule has flagged it.

    Args:
        k: frames above the threshold that flag the track.
        n: frames looked back on.
    """

    def __init__(self, k: int, n: int) -> None:
        self.k = k
        self.recent: deque[bool] = deque(maxlen=n)
        self.flagged = False

    def update(self, over: bool) -> bool:
        """Add a frame (its score above the threshold or not); True once the track is flagged."""
        self.recent.append(over)
        self.flagged = self.flagged or sum(self.recent) >= self.k
        return self.flagged


class Tracker:
    """The face tracks of every stream: each frame's boxes continue the previous frame's.

    Args:
        k: see :class:`Track`.
        n: see :class:`Track`.
    """

    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n
        self._last: dict[str, list[tuple[Sequence[float], Track]]] = {}
        self._lock = threading.Lock()

    def assign(self, stream: str, boxes: Sequence[Sequence[float]]) -> list[Track]:
        """The track of each box of a stream's next frame (greedy, largest overlap first)."""
        with self._lock:
            last = self._last.get(stream, [])
            pairs = sorted(
                ((iou(b, old), i, j) for i, b in enumerate(boxes)
                 for j, (old, _) in enumerate(last)),
                reverse=True,
            )  # fmt: skip
            tracks: list[Track | None] = [None] * len(boxes)
            taken: set[int] = set()
            for overlap, i, j in pairs:
                if overlap < MIN_IOU:
                    break
                if tracks[i] is None and j not in taken:
                    tracks[i] = last[j][1]
                    taken.add(j)
            out = [t or Track(self.k, self.n) for t in tracks]
            if len(self._last) > 1024 and stream not in self._last:  # streams come and go
                self._last.clear()
            self._last[stream] = list(zip(boxes, out, strict=True))
            return out
