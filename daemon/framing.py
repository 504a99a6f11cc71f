"""Where the daemon's faces come from and how they go back: the ``[guard]`` face settings.

:class:`Framing` is the daemon's one face path, shared by the pipeline, ``magdr-guard attack``
and the crops that calibration and the benchmarks take from clips (:mod:`daemon.face_crops`):

- **find**: the configured detector (:mod:`magdr.faces.detector`; YuNet by default) on the
  frame downscaled to ``detect_side``; per stream a :class:`magdr.faces.track.FaceFollower`
  that detects every ``detect_every`` frames and follows each face in between;
- **align**: the detector's five landmarks (YuNet) or dlib's 68 behind a Haar box put the eyes
  and mouth where CelebA's are (:mod:`magdr.faces.align`); else the square around the box;
- **paste**: the frame plus the warped-back difference ``result − crop`` inside a soft disc
  (:func:`magdr.faces.mask.window_mask`), and inside the regions the edit targets when the
  engine gives their mask (``paste_mask = "region"``).
  Adding a smooth difference, rather than replacing the frame's pixels with an upscaled 128-px
  face, keeps the frame's own detail above G's resolution, and nothing is pasted in the crop's
  square shape.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import structlog
import torch

from daemon.config import Config

log = structlog.get_logger()


@dataclass
class Crops:
    """Faces cut out of one frame: ``x`` ``(F, 3, S, S)`` in [-1, 1], ``rects`` ``(F, 4)``.

    ``matrices`` ``(F, 2, 3)`` (frame -> crop) when the faces were aligned, and ``rects`` are
    then the face boxes; else None and the crops are the squares ``rects``. ``boxes`` are the
    detector's ``[x, y, w, h]`` (the verdict's ``box``).
    """

    x: torch.Tensor
    rects: np.ndarray
    boxes: list[list[int]]
    matrices: np.ndarray | None = None


def landmark_locator(cfg: Config) -> Any:
    """The dlib landmark locator for ``[guard] align`` behind Haar boxes, or None.

    YuNet's own five points need none. A missing dlib or model is not fatal: faces are then
    cropped around their boxes, and a warning says so once.
    """
    g = cfg.guard
    if not g.align or g.faces != "detect" or g.detector != "haar":
        return None
    from magdr.faces.align import LandmarkLocator

    try:
        return LandmarkLocator()
    except FileNotFoundError as e:
        log.warning("face alignment off: faces are cropped around their boxes", error=str(e))
        return None


class Framing:
    """Finds, aligns and crops the faces of frames, and pastes results back.

    Args:
        cfg: the configuration (``[guard]``'s face keys are read live, so a reload applies).
        size: crop side (G's ``image_size``).
    """

    #: Streams whose followers are kept; past this the oldest are dropped (streams come and go).
    MAX_STREAMS = 1024

    def __init__(self, cfg: Config, size: int) -> None:
        from magdr.faces.detector import load_detector

        self.cfg, self.size = cfg, size
        g = cfg.guard
        self.detect = load_detector(g.detector) if g.faces == "detect" else None
        self.landmarks = landmark_locator(cfg)
        self._followers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def locate(self, image: np.ndarray, stream: str | None = None) -> list[Any]:
        """The face boxes of ``image``, followed on ``stream``, detected afresh without one.

        :class:`magdr.faces.locate.FaceBox` with the detector's landmarks, largest first.
        """
        from magdr.faces.track import FaceFollower

        g = self.cfg.guard
        if stream is None:
            return self.detect(
                image, min_size=g.min_face, max_faces=g.max_faces, max_side=g.detect_side
            )
        with self._lock:
            f = self._followers.pop(stream, None)  # re-inserted: the dict keeps recent last
            if f is None or (f.every, f.smooth) != (g.detect_every, g.smooth_landmarks):
                f = FaceFollower(
                    self.detect,
                    every=g.detect_every,
                    min_size=g.min_face,
                    max_faces=g.max_faces,
                    max_side=g.detect_side,
                    smooth=g.smooth_landmarks,
                )
            self._followers[stream] = f
            while len(self._followers) > self.MAX_STREAMS:
                self._followers.pop(next(iter(self._followers)))
        return f(image)

    def find_faces(self, image: np.ndarray, stream: str | None = None) -> Crops:
        """Locate, align and crop the faces of one RGB frame (``[guard] faces``).

        With ``stream``, faces are followed across that stream's frames (``detect_every``,
        ``smooth_landmarks``); without, each frame is detected on its own.
        """
        g = self.cfg.guard
        if g.faces == "frame":
            h, w = image.shape[:2]
            interp = cv2.INTER_AREA if min(h, w) > self.size else cv2.INTER_LINEAR
            small = cv2.resize(image, (self.size, self.size), interpolation=interp)
            x = torch.from_numpy(small).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
            return Crops(x, np.array([[0, 0, w, h]], np.int64), [[0, 0, w, h]])
        return self.crop(image, self.locate(image, stream))

    def crop(self, image: np.ndarray, boxes: list[Any]) -> Crops:
        """Align (``[guard] align``) and cut the faces ``boxes`` of ``image``."""
        from magdr.faces.align import face_matrices, point_matrices, warp_faces
        from magdr.faces.detector import CROP_FRAMING
        from magdr.faces.locate import crop_faces

        g = self.cfg.guard
        if not boxes:
            return Crops(torch.empty(0, 3, self.size, self.size), np.zeros((0, 4), np.int64), [])
        framing = CROP_FRAMING[g.detector]
        mats = None
        if g.align and boxes[0].points is not None:
            mats = point_matrices(boxes, self.size, framing)
        elif g.align and self.landmarks is not None:
            mats = face_matrices(self.landmarks(image, boxes), boxes, self.size)
        listed = [b.as_list() for b in boxes]
        if mats is not None:
            return Crops(
                warp_faces(image, mats, self.size), np.array(listed, np.int64), listed, mats
            )
        x, rects = crop_faces(image, boxes, self.size, scale=framing[0], shift=framing[1])
        return Crops(x, rects, listed)

    def paste(
        self, image: np.ndarray, faces: torch.Tensor, crops: Crops, mask: torch.Tensor | None = None
    ) -> np.ndarray:
        """Put results ``(F, 3, S, S)`` of ``crops`` back into (a copy of) the frame.

        ``paste_mask = "region"`` or ``"window"``: the frame plus ``mask · (faces − crops.x)``
        warped back, ``mask`` :math:`(F, 1, S, S)` the edit's regions from the engine
        (:func:`magdr.faces.mask.region_mask`, inside the window) or, when None, the soft disc
        :func:`magdr.faces.mask.window_mask`; ``"square"``: the faces' pixels, square-feathered.
        """
        if len(crops.boxes) == 0:
            return image
        g = self.cfg.guard
        if g.faces == "frame":
            h, w = image.shape[:2]
            pix = ((faces[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            interp = cv2.INTER_AREA if min(h, w) < self.size else cv2.INTER_LINEAR
            return cv2.resize(np.ascontiguousarray(pix), (w, h), interpolation=interp)
        mats = crops.matrices
        if g.paste_mask == "square":
            from magdr.faces.align import paste_warped
            from magdr.faces.locate import paste_faces

            if mats is not None:
                return paste_warped(image, faces, mats)
            return paste_faces(image, faces, crops.rects)
        from magdr.faces.align import add_warped, box_matrices
        from magdr.faces.detector import CROP_FRAMING
        from magdr.faces.locate import FaceBox
        from magdr.faces.mask import window_mask

        if mats is None:
            boxes = [FaceBox(*b, 0.0) for b in crops.boxes]
            mats = box_matrices(boxes, self.size, CROP_FRAMING[g.detector])
        weight = window_mask(faces.shape[-1]) if mask is None else mask  # mask: inside it
        return add_warped(image, ((faces.float().cpu() - crops.x) * weight).mul_(127.5), mats)
