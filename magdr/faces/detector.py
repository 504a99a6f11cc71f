"""Face detectors: boxes and five landmarks per face, picked by name from :data:`DETECTORS`.

A frame goes detector → matrices → warp → G and the guard → blend back (STYLE, the face path);
this module is the first step. Two detectors share one call::

    detect = load_detector("yunet")          # or "haar"
    boxes = detect(frame, min_size=32, max_faces=8, max_side=320)
    boxes[0].points                          # (5, 2) frame pixels, or None (Haar)

- ``"yunet"`` (the default): OpenCV's ``cv2.FaceDetectorYN`` with YuNet (Wu et al., 2023; MIT),
  whose ONNX file ships in ``magdr/models/weights/`` (provenance and digest in its model card).
  It gives each face's five landmarks (eyes, nose tip, mouth corners), so faces are aligned
  without dlib. On a 1280×720 frame scaled to 320 px it costs a fraction of the Haar cascade
  (``python -m bench.detectors``; REPORT, "Face detectors").
- ``"haar"``: OpenCV's Haar cascade (:func:`magdr.faces.locate.locate_faces`); no landmarks, so
  alignment needs dlib's 68-point model (:class:`magdr.faces.align.LandmarkLocator`).

Landmark order is image-left eye, image-right eye, nose tip, image-left mouth corner,
image-right mouth corner (:data:`POINT_NAMES`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from magdr.faces.locate import CROP_SCALE, CROP_SHIFT, FaceBox, check_frame, locate_faces

#: The shipped YuNet model (OpenCV Zoo ``face_detection_yunet_2023mar.onnx``).
YUNET_PATH = (
    Path(__file__).resolve().parents[1]
    / "models"
    / "weights"
    / ("face_detection_yunet_2023mar.onnx")
)
#: SHA-256 of :data:`YUNET_PATH` (OpenCV Zoo's Git LFS pointer at commit 25f423d).
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"

POINT_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

Detector = Callable[..., list[FaceBox]]


def downscaled(frame: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The frame area-downscaled so that its longer side is at most ``max_side``, and the scale."""
    h, w = frame.shape[:2]
    k = min(1.0, max_side / max(h, w))
    if k == 1.0:
        return frame, k
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA), k


class YuNet:
    """YuNet through ``cv2.FaceDetectorYN``: boxes and five landmarks.

    Args:
        model_path: the ONNX file; default :data:`YUNET_PATH`.
        score_threshold: faces scoring below this are dropped (YuNet's scores are in [0, 1]).
        nms_threshold: IoU above which overlapping boxes are merged.

    Raises:
        FileNotFoundError: the model file is missing.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.3,
    ) -> None:
        self.model_path = Path(model_path or YUNET_PATH)
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"YuNet model {self.model_path} is missing; it ships in "
                "magdr/models/weights/ (reinstall magdr-guard)"
            )
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        # A FaceDetectorYN holds its input size and network state: one per thread.
        self._local = threading.local()

    def _net(self, w: int, h: int) -> cv2.FaceDetectorYN:
        net = getattr(self._local, "net", None)
        if net is None:
            net = cv2.FaceDetectorYN.create(
                str(self.model_path), "", (w, h), self.score_threshold, self.nms_threshold, 100
            )
            self._local.net, self._local.size = net, (w, h)
        elif self._local.size != (w, h):
            net.setInputSize((w, h))
            self._local.size = (w, h)
        return net

    def __call__(
        self,
        frame: np.ndarray,
        *,
        min_size: int = 32,
        max_faces: int | None = 8,
        max_side: int = 320,
    ) -> list[FaceBox]:
        """Faces of an RGB frame, largest first.

        Args:
            frame: RGB image, ``uint8`` :math:`(H, W, 3)`.
            min_size: smallest face side to report, in frame pixels.
            max_faces: keep at most this many (the largest); None keeps all.
            max_side: the frame is downscaled to this longer side first (YuNet finds faces
                down to about 10 px there).

        Returns:
            :class:`~magdr.faces.locate.FaceBox` es in frame pixels with ``points`` ``(5, 2)``.
        """
        frame = check_frame(frame)
        if min(frame.shape[:2]) == 0:
            return []
        small, k = downscaled(frame, max_side)
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)  # YuNet was trained on BGR input
        _, rows = self._net(bgr.shape[1], bgr.shape[0]).detect(bgr)
        if rows is None:
            return []
        boxes = []
        for r in rows:
            x, y, w, h = (float(v) / k for v in r[:4])
            if min(w, h) < min_size:
                continue
            # YuNet names eyes and mouth corners from the subject's view: image left first.
            pts = r[4:14].reshape(5, 2).astype(np.float64) / k
            for a, b in ((0, 1), (3, 4)):
                if pts[a, 0] > pts[b, 0]:
                    pts[[a, b]] = pts[[b, a]]
            boxes.append(FaceBox(round(x), round(y), round(w), round(h), float(r[14]), pts))
        boxes.sort(key=lambda b: (-b.w * b.h, -b.score))
        return boxes if max_faces is None else boxes[:max_faces]


def haar(
    frame: np.ndarray, *, min_size: int = 32, max_faces: int | None = 8, max_side: int = 640
) -> list[FaceBox]:
    """:func:`magdr.faces.locate.locate_faces` under the detectors' call (no landmarks)."""
    return locate_faces(frame, min_size=min_size, max_faces=max_faces, max_side=max_side)


#: Detector name -> factory. A factory takes no arguments and returns the detector.
DETECTORS: dict[str, Callable[[], Detector]] = {"yunet": YuNet, "haar": lambda: haar}


#: Per detector, the CelebA-like square around its box: side in box sides (the larger of width
#: and height) and upward shift of the centre in box heights
#: (:func:`magdr.faces.locate.crop_rects`).
#: YuNet's: medians over the 1,928 CelebA train crops of every 4th of ``000001``-``008000``
#: (10th-90th percentile 1.44-1.66 and 0.11-0.18), ``python -m bench.detectors
#: --celeba-anchor``. Used for
#: faces whose landmarks are not sane, and with ``align`` off.
CROP_FRAMING: dict[str, tuple[float, float]] = {
    "yunet": (1.54, 0.14),
    "haar": (CROP_SCALE, CROP_SHIFT),
}


def load_detector(name: str = "yunet") -> Detector:
    """The detector called ``name`` (a key of :data:`DETECTORS`).

    Raises:
        KeyError: an unknown name.
    """
    if name not in DETECTORS:
        raise KeyError(f"face detector {name!r}: expected one of {sorted(DETECTORS)}")
    return DETECTORS[name]()
