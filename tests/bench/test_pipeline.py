"""``python -m bench.pipeline``: its paste-back measures and its report section."""

from __future__ import annotations

import cv2
import numpy as np

from bench import pipeline
from magdr.faces.locate import FaceBox


class _Crops:
    def __init__(self, matrices):
        self.matrices = matrices


def _scene(seed=0, side=200):
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 40, (side, side, 3))
    return np.clip(128 + cv2.GaussianBlur(noise, (0, 0), 1.0), 0, 255).astype(np.uint8)


def _face():
    # a 64-px crop cut from (68, 68): frame -> crop is a translation
    m = np.array([[[1.0, 0, -68], [0, 1.0, -68]]])
    points = np.array([[85.0, 90], [115, 90], [100, 105], [110, 120], [90, 120]])
    return _Crops(m), [FaceBox(75, 75, 50, 50, 0.9, points)]


def test_unchanged_frame_has_no_seam_and_keeps_all_detail():
    frame = _scene()
    crops, boxes = _face()
    seams, kept = pipeline.paste_quality(frame, frame.copy(), crops, boxes, 64)
    assert seams == [0.0] and kept == [1.0]


def test_a_pasted_square_shows_a_seam_and_a_blurred_face_loses_detail():
    frame = _scene()
    crops, boxes = _face()
    out = frame.copy()
    out[68:132, 68:132] = cv2.GaussianBlur(frame[68:132, 68:132], (0, 0), 3) // 2
    seams, kept = pipeline.paste_quality(frame, out, crops, boxes, 64)
    assert seams[0] > 0.5
    assert kept[0] < 0.5


def test_section_gives_ratios_to_the_floor():
    row = {
        "clip": "s.mp4",
        "size": "1280x720",
        "ffmpeg": {"frames": 100, "wall_s": 1.0, "fps": 100.0},
        "process": {
            "on": {"fps": 25.0, "wall_s": 9.0, "faces": 100, "disrupted_faces": 0},
            "off": {"fps": 50.0, "wall_s": 6.0, "faces": 100, "disrupted_faces": 0},
        },
        "stages": dict.fromkeys(("decode", "locate", "align", "guard", "paste", "encode"), 2.0),
        "tracking": {
            "every_1": {
                "locate_ms": 5.0,
                "jitter_pct": 1.0,
                "faces": 90,
                "missed_frames": 0,
                "flagged": 0,
                "detections": 90,
                "followed": 0,
                "lost": 0,
            }
        },
        "quality": {
            "region": {"faces": 3, "seam": 0.01, "detail_kept": 0.97, "detail_kept_min": 0.95},
            "square": {"faces": 3, "seam": 0.8, "detail_kept": 0.4},
        },
        "live": {
            "rate": 30.0,
            "sent": 90,
            "guarded": 60,
            "share": 2 / 3,
            "latency_ms_p50": 120.0,
            "latency_ms_p99": 400.0,
        },
    }
    text = pipeline.section(
        [row],
        "python -m bench.pipeline",
        {"commit": "abc", "machine": "2 CPU cores", "date": "2026-12-07", "gpu_note": "no GPU"},
    )
    assert text.startswith("## Pipeline\n")
    assert "| s.mp4 (1280x720) | 100 | 100.0 | 25.0 | 4.00 |" in text
    assert "| 2.0 | 12.0 |" in text
    assert "| s.mp4 | 3 | 0.010 | 0.800 | 0.97 (0.95) | 0.40 |" in text
    assert "| s.mp4 | 30 | 90 | 67% | 120 | 400 |" in text
