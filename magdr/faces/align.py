"""Align faces of video frames the way CelebA's faces are aligned, and paste them back.

The guarded generators were trained on CelebA's aligned crops, whose eyes and mouth sit at
fixed places. A Haar box crop (:func:`magdr.faces.locate.crop_faces`) only centres the face: its
roll, scale and position wander with the detector's box. Here a face goes through:

- landmarks: the detector's own five points (YuNet, :mod:`magdr.faces.detector`), or, behind a
  Haar box, :class:`LandmarkLocator`: dlib's 68-point shape predictor (Debian's
  ``libdlib-data``), started from the Haar box mapped onto the box dlib's own detector draws
  (:data:`HAAR_TO_DLIB`);
- :func:`point_matrices` / :func:`face_matrices`: the similarity transform taking the eye
  centres and the mouth centre onto CelebA's (:data:`CELEBA_ANCHOR_5` / :data:`CELEBA_ANCHOR`,
  each measured with its own landmarker; :func:`eye_mouth_similarity`), or the box square's
  where the landmarks are not sane;
- :func:`warp_faces`: the crop, area-averaged first where the face is larger than the crop, so
  a sharp HD face is not aliased on its way to G's size;
- :func:`paste_warped`: the inverse warp of each face, blended in with the warped raised-cosine
  mask of :func:`magdr.faces.locate.feather_mask`.

Frames are numpy ``uint8`` ``[H, W, 3]`` RGB; faces float tensors ``[F, 3, S, S]`` in [-1, 1];
matrices ``float64`` ``[F, 2, 3]`` map frame pixels onto crop pixels (OpenCV's affine form,
pixel centres at integers).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from magdr.faces.locate import (
    CROP_SCALE,
    CROP_SHIFT,
    FaceBox,
    check_frame,
    crop_rects,
    face_pixels,
    feather_mask,
)

#: Image-left eye centre, image-right eye centre and mouth centre (means of iBUG points 36-41,
#: 42-47, 48-59) of CelebA's aligned faces in G's square frame, as fractions of its side: the
#: mean over the 7,729 train faces (``000001``-``008000``) on which dlib found a face, measured by
#: ``python -c "from training import data as D; print(D.celeba_mean_anchor(D.load_celeba())
#: / 128)"`` (per-face spread about 1 px of 128).
CELEBA_ANCHOR = np.array([[0.38632, 0.51715], [0.60200, 0.51732], [0.49368, 0.75659]], np.float64)

#: The same anchor with YuNet's five points (eye centres, mouth corners' midpoint): the mean over
#: the 1,928 train faces of every 4th CelebA image (``000001``-``008000``, dlib-detected ones)
#: on which YuNet found a face (all of them), measured by ``python -m bench.detectors
#: --celeba-anchor``. YuNet's mouth point sits 1.6 px of 128 above dlib's lip centre; the eyes
#: agree within 1 px (median).
CELEBA_ANCHOR_5 = np.array([[0.38535, 0.52012], [0.60750, 0.51967], [0.49813, 0.74456]], np.float64)

#: dlib's frontal detector box relative to the Haar cascade's box on the same face: centre
#: shifted down by this fraction of the Haar box's height, side this fraction of its width.
#: Medians over the 270 frames (every 15th of the shared clips) where each found one face
#: (10th-90th percentile 0.04-0.13 and 0.81-0.95). The shape predictor was trained on dlib's
#: boxes, so it is started from one.
HAAR_TO_DLIB = (0.086, 0.887)


def anchor_points(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres and mouth centre of 68 iBUG landmarks.

    Args:
        landmarks: :math:`(..., 68, 2)` points in pixels.

    Returns:
        :math:`(..., 3, 2)`: image-left eye, image-right eye, mouth (CelebA anchor order).
    """
    p = np.asarray(landmarks, np.float64)
    return np.stack([p[..., 36:42, :].mean(-2), p[..., 42:48, :].mean(-2),
                     p[..., 48:60, :].mean(-2)], -2)  # fmt: skip


def five_point_anchors(points: np.ndarray) -> np.ndarray:
    """Eye centres and mouth centre of five-point landmarks (:mod:`magdr.faces.detector`).

    Args:
        points: :math:`(..., 5, 2)` image-left eye, image-right eye, nose, mouth corners.

    Returns:
        :math:`(..., 3, 2)`: the two eyes and the mouth corners' midpoint.
    """
    p = np.asarray(points, np.float64)
    return np.stack([p[..., 0, :], p[..., 1, :], (p[..., 3, :] + p[..., 4, :]) / 2], -2)


def eye_mouth_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2×3 similarity taking the eye-midpoint -> mouth axis of ``src`` onto that of ``dst``.

    The eye-mouth axis, unlike the eye distance, barely shrinks with head yaw, so turned faces
    keep a sane scale.

    Args:
        src: :math:`(3, 2)` left eye, right eye, mouth.
        dst: :math:`(3, 2)` the same points where they should go.

    Returns:
        ``float64`` :math:`(2, 3)`, ``dst ≈ M[:, :2] @ src + M[:, 2]``.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)

    def axis(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mid = (a[0] + a[1]) / 2
        return mid, a[2] - mid

    (ms, vs), (md, vd) = axis(src), axis(dst)
    scale = np.linalg.norm(vd) / max(np.linalg.norm(vs), 1e-6)
    ang = np.arctan2(vd[1], vd[0]) - np.arctan2(vs[1], vs[0])
    r = scale * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    return np.concatenate([r, (md - r @ ms)[:, None]], 1)


def align_matrices(
    anchors: np.ndarray, size: int, target: np.ndarray = CELEBA_ANCHOR
) -> np.ndarray:
    """Frame -> crop similarities placing each face's anchor on ``target``.

    Args:
        anchors: :math:`(F, 3, 2)` from :func:`anchor_points`, frame pixels.
        size: crop side (``G.image_size``).
        target: :math:`(3, 2)` where the anchor goes, as fractions of the side
            (:data:`CELEBA_ANCHOR`, or :data:`CELEBA_ANCHOR_5` for five-point anchors).

    Returns:
        ``float64`` :math:`(F, 2, 3)`.
    """
    dst = np.asarray(target, np.float64) * size
    return np.stack([eye_mouth_similarity(a, dst) for a in np.reshape(anchors, (-1, 3, 2))]
                    ) if len(anchors) else np.zeros((0, 2, 3))  # fmt: skip


#: Eye-midpoint-to-mouth distance of a sane landmark fit, in Haar box widths: CelebA's is
#: 0.42 (0.24 of a crop 1.75 box widths wide). Outside this range, or rolled further than
#: :data:`MAX_ROLL_DEG`, the landmarks missed the face (a false box, a profile) and the face is
#: cropped as the square around its box instead.
EYE_MOUTH_RANGE = (0.2, 0.8)
MAX_ROLL_DEG = 50.0


def box_matrices(boxes: Sequence[FaceBox], size: int, framing: tuple[float, float] = (
        CROP_SCALE, CROP_SHIFT)) -> np.ndarray:  # fmt: skip
    """Frame -> crop matrices of the squares :func:`~magdr.faces.locate.crop_faces` cuts.

    Args:
        boxes: located faces.
        size: crop side.
        framing: crop side and upward shift in box units (the detector's
            :data:`magdr.faces.detector.CROP_FRAMING`).

    Returns:
        ``float64`` :math:`(F, 2, 3)`; with :func:`warp_faces` they cut the same crops as
        ``crop_faces`` (within resampling).
    """
    out = np.zeros((len(boxes), 2, 3))
    for i, (x0, y0, side, _) in enumerate(crop_rects(boxes, *framing)):
        k = size / side
        # pixel centres: q + 0.5 = k (p - x0 + 0.5), as cv2.resize maps them
        out[i] = [[k, 0, 0.5 * k - 0.5 - k * x0], [0, k, 0.5 * k - 0.5 - k * y0]]
    return out


def face_matrices(landmarks: np.ndarray, boxes: Sequence[FaceBox], size: int) -> np.ndarray:
    """Aligning matrices from dlib's 68 landmarks; the box square where they are not sane.

    Args:
        landmarks: :math:`(F, 68, 2)` from :class:`LandmarkLocator`, frame pixels.
        boxes: the faces' Haar boxes (same order).
        size: crop side.

    Returns:
        ``float64`` :math:`(F, 2, 3)` frame -> crop.
    """
    anchors = anchor_points(landmarks).reshape(-1, 3, 2)
    return anchor_matrices(anchors, boxes, size, CELEBA_ANCHOR, box_matrices(boxes, size))


def point_matrices(boxes: Sequence[FaceBox], size: int, framing: tuple[float, float]) -> np.ndarray:
    """Aligning matrices from the boxes' own five points (YuNet); the box square where not sane.

    Args:
        boxes: faces with ``points`` (:class:`magdr.faces.detector.YuNet`).
        size: crop side.
        framing: the detector's box-square framing (:data:`magdr.faces.detector.CROP_FRAMING`).

    Returns:
        ``float64`` :math:`(F, 2, 3)` frame -> crop.
    """
    if not boxes:
        return np.zeros((0, 2, 3))
    if any(b.points is None for b in boxes):
        raise ValueError(
            "boxes: point_matrices needs each box's five points (a detector "
            "with landmarks, e.g. YuNet); Haar boxes have none"
        )
    anchors = five_point_anchors(np.stack([b.points for b in boxes]))
    return anchor_matrices(
        anchors, boxes, size, CELEBA_ANCHOR_5, box_matrices(boxes, size, framing)
    )


def anchor_matrices(
    anchors: np.ndarray,
    boxes: Sequence[FaceBox],
    size: int,
    target: np.ndarray,
    fallback: np.ndarray,
) -> np.ndarray:
    """Similarities placing ``anchors`` on ``target``; ``fallback`` rows where they are not sane.

    Sane: the eye-midpoint-to-mouth distance within :data:`EYE_MOUTH_RANGE` box widths and the
    face rolled by at most :data:`MAX_ROLL_DEG`.
    """
    mats = align_matrices(anchors, size, target)
    for i, (a, b) in enumerate(zip(anchors, boxes, strict=True)):
        axis = a[2] - (a[0] + a[1]) / 2
        roll = np.degrees(np.arctan2(-axis[0], axis[1]))  # 0 for an upright face
        length = np.linalg.norm(axis) / max(b.w, 1)
        if not EYE_MOUTH_RANGE[0] <= length <= EYE_MOUTH_RANGE[1] or abs(roll) > MAX_ROLL_DEG:
            mats[i] = fallback[i]
    return mats


def _invert(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(m, np.float64))


def _corners(m: np.ndarray, w: int, h: int) -> np.ndarray:
    """Where the corners of a ``w``×``h`` image land under the affine ``m``."""
    c = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    return c @ m[:, :2].T + m[:, 2]


def _warp(src: np.ndarray, m: np.ndarray, w: int, h: int, border: int) -> np.ndarray:
    """``cv2.warpAffine(src, m, (w, h))`` that averages instead of aliasing when it shrinks.

    Only the part of ``src`` the output sees is used; where ``m`` shrinks, that part is first
    area-resized to the output's scale (bilinear sampling of a 4× larger face skips 3 of every
    4 pixels), and the warp that is left is near 1:1.
    """
    sh, sw = src.shape[:2]
    seen = _corners(_invert(m), w, h)  # the part of src the output samples, plus a margin
    x0, y0 = np.floor(seen.min(0)).astype(int) - 2
    x1, y1 = np.ceil(seen.max(0)).astype(int) + 3
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, sw), min(y1, sh)
    if x1 <= x0 or y1 <= y0:  # the output sees only the replicated border
        x0, y0, x1, y1 = min(max(x0, 0), sw - 1), min(max(y0, 0), sh - 1), sw, sh
    roi = src[y0:y1, x0:x1]
    m = m.copy()
    m[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    scale = np.sqrt(abs(np.linalg.det(m[:, :2])))
    if scale < 1.0:
        rw, rh = max(1, round(roi.shape[1] * scale)), max(1, round(roi.shape[0] * scale))
        sx, sy = rw / roi.shape[1], rh / roi.shape[0]
        roi = cv2.resize(roi, (rw, rh), interpolation=cv2.INTER_AREA)
        # pixel centres: small (q + 0.5) = s (p + 0.5)  ->  p = (q + 0.5) / s - 0.5
        m[:, 2] += m[:, :2] @ np.array([0.5 / sx - 0.5, 0.5 / sy - 0.5])
        m[:, :2] = m[:, :2] @ np.diag([1 / sx, 1 / sy])
    return cv2.warpAffine(roi, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)


def warp_faces(frame: np.ndarray, matrices: np.ndarray, size: int) -> torch.Tensor:
    """Cut aligned faces out of a frame.

    Args:
        frame: RGB image, ``uint8`` :math:`(H, W, 3)`.
        matrices: :math:`(F, 2, 3)` frame -> crop, from :func:`align_matrices`.
        size: crop side.

    Returns:
        ``float32`` :math:`(F, 3, size, size)` in [-1, 1]; outside the frame the edge pixels
        are replicated (as :func:`~magdr.faces.locate.crop_faces` does).

    Example:
        >>> m = np.array([[[0.5, 0, 0], [0, 0.5, 0]]])
        >>> warp_faces(np.zeros((64, 64, 3), np.uint8), m, 32).shape
        torch.Size([1, 3, 32, 32])
    """
    frame = check_frame(frame)
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError("frame: cannot crop faces from an empty frame")
    mats = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
    out = np.empty((len(mats), size, size, 3), np.uint8)
    for i, m in enumerate(mats):
        out[i] = _warp(frame, m, size, size, cv2.BORDER_REPLICATE)
    faces = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return faces.contiguous()


def unwarp(
    img: np.ndarray, matrix: np.ndarray, frame_hw: tuple[int, int], *, replicate: bool = False
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Warp a crop-sized image back onto the part of the frame its crop came from.

    Args:
        img: ``float32`` :math:`(S, S)` or :math:`(S, S, C)` in crop pixels (a face, a mask, an
            attack's perturbation).
        matrix: :math:`(2, 3)` frame -> crop, the one the crop was cut with.
        frame_hw: the frame's ``(H, W)``.
        replicate: outside the crop, repeat its edge (for faces, which a mask then fades out);
            else 0.

    Returns:
        ``((rows, cols), part)``: the frame slices the crop covers and ``img`` warped onto them;
        ``None`` when the crop lies entirely outside the frame.
    """
    h, w = frame_hw
    side = img.shape[0]
    back = _invert(matrix)
    corners = _corners(back, side, side)
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 1, (w, h))
    if x1 <= x0 or y1 <= y0:
        return None
    back[:, 2] -= (x0, y0)
    border = cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT
    return (slice(y0, y1), slice(x0, x1)), _warp(img, back, x1 - x0, y1 - y0, border)


def paste_warped(
    frame: np.ndarray,
    faces: torch.Tensor | np.ndarray,
    matrices: np.ndarray,
    *,
    feather: float = 0.15,
) -> np.ndarray:
    """Warp (guarded) aligned faces back into a copy of the frame with feathered borders.

    Each face and its :func:`~magdr.faces.locate.feather_mask` go through the inverse of the
    face's matrix (:func:`unwarp`); the frame becomes ``mask·face + (1-mask)·frame``. Faces are
    pasted in order (later on top).

    Args:
        frame: RGB image, ``uint8`` :math:`(H, W, 3)`; not modified.
        faces: :math:`(F, 3, S, S)` in [-1, 1] (tensor or array).
        matrices: :math:`(F, 2, 3)` frame -> crop, the ones the faces were cut with.
        feather: border ramp width as a fraction of the crop side.

    Returns:
        a new ``uint8`` :math:`(H, W, 3)` frame.
    """
    frame = check_frame(frame)
    mats = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
    pix = face_pixels(faces, len(mats), "matrices")
    out = frame.copy()
    for face, m in zip(pix, mats, strict=True):
        back = unwarp(face, m, frame.shape[:2], replicate=True)
        if back is None:
            continue  # entirely outside the frame
        where, big = back
        _, mask = unwarp(feather_mask(face.shape[0], feather), m, frame.shape[:2])
        region = out[where].astype(np.float32)
        blended = region + mask[..., None] * (big - region)
        out[where] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def add_warped(
    frame: np.ndarray, parts: torch.Tensor | np.ndarray, matrices: np.ndarray
) -> np.ndarray:
    """A copy of the frame plus each crop-sized difference warped back where its crop came from.

    This is how the daemon pastes an edit: ``frame + warp⁻¹(mask · (result − crop))``. The
    difference is smooth at crop scale, so once enlarged it adds the edit without replacing
    the frame's own detail above the crop's resolution; outside its mask it adds nothing.

    Args:
        frame: RGB image, ``uint8`` :math:`(H, W, 3)`; not modified.
        parts: :math:`(F, 3, S, S)` signed differences in pixel levels (255 = full range).
        matrices: :math:`(F, 2, 3)` frame -> crop, the ones the crops were cut with.

    Returns:
        a new ``uint8`` :math:`(H, W, 3)` frame.
    """
    frame = check_frame(frame)
    mats = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
    if isinstance(parts, torch.Tensor):
        parts = parts.detach().to("cpu", torch.float32).numpy()
    parts = np.ascontiguousarray(np.asarray(parts, np.float32).transpose(0, 2, 3, 1))
    if len(parts) != len(mats):
        raise ValueError(f"parts: expected {len(mats)} (one per matrix), got {len(parts)}")
    out = frame.copy()
    for part, m in zip(parts, mats, strict=True):
        back = unwarp(part, m, frame.shape[:2])
        if back is None:
            continue  # entirely outside the frame
        where, big = back
        out[where] = np.clip(out[where] + big + 0.5, 0, 255).astype(np.uint8)  # + 0.5: round
    return out


class LandmarkLocator:
    """dlib's 68-point shape predictor on located faces (Debian's ``libdlib-data`` model).

    Args:
        model_path: ``shape_predictor_68_face_landmarks.dat``; default:
            :func:`magdr.faces.parsing.find_landmark_model`.

    Raises:
        FileNotFoundError: dlib or the model is missing (the message says how to get them).
    """

    def __init__(self, model_path: str | Path | None = None) -> None:
        from magdr.faces.parsing import dlib_shape_predictor

        dlib, self._predictor, self.model_path = dlib_shape_predictor(model_path, "alignment")
        self._rect = dlib.rectangle
        self._lock = threading.Lock()  # one 100 MB model shared by the source threads

    def __call__(self, frame: np.ndarray, boxes: Sequence[FaceBox]) -> np.ndarray:
        """68 landmarks per box.

        Args:
            frame: RGB image, ``uint8`` :math:`(H, W, 3)`.
            boxes: Haar boxes from :func:`magdr.faces.locate.locate_faces`.

        Returns:
            ``float64`` :math:`(F, 68, 2)` in frame pixels.
        """
        frame = np.ascontiguousarray(check_frame(frame))
        out = np.zeros((len(boxes), 68, 2), np.float64)
        down, scale = HAAR_TO_DLIB
        for i, b in enumerate(boxes):
            side = scale * b.w
            cx, cy = b.x + b.w / 2, b.y + b.h / 2 + down * b.h
            rect = self._rect(round(cx - side / 2), round(cy - side / 2),
                              round(cx + side / 2), round(cy + side / 2))  # fmt: skip
            with self._lock:
                shape = self._predictor(frame, rect)
            out[i] = [(p.x, p.y) for p in shape.parts()]
        return out
