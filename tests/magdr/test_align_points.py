from __future__ import annotations

import numpy as np
import pytest
import torch

from magdr.faces.align import (
    CELEBA_ANCHOR,
    CELEBA_ANCHOR_5,
    add_warped,
    align_matrices,
    anchor_matrices,
    box_matrices,
    five_point_anchors,
    point_matrices,
    warp_faces,
)
from magdr.faces.detector import CROP_FRAMING
from magdr.faces.locate import CROP_SCALE, CROP_SHIFT, FaceBox, crop_faces, crop_rects

SIZE = 128
FRAMING = CROP_FRAMING["yunet"]


def _smooth(h: int, w: int) -> np.ndarray:
    """A smooth deterministic RGB frame in about [48, 208] (resampling barely changes it)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [128 + 80 * np.sin(x / 23 + p) * np.cos(y / 29 - p) for p in (0.0, 1.0, 2.0)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([r, np.array(shift, np.float64)[:, None]], 1)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]


def _face(m_true: np.ndarray) -> FaceBox:
    """A box with five points whose anchor ``m_true`` (frame -> crop) puts on CELEBA_ANCHOR_5."""
    inv = np.linalg.inv(np.vstack([m_true, [0, 0, 1]]))[:2]
    eye_l, eye_r, mouth = _apply(inv, CELEBA_ANCHOR_5 * SIZE)
    across = (eye_r - eye_l) / np.linalg.norm(eye_r - eye_l)
    nose = (eye_l + eye_r) / 2 + 0.6 * (mouth - (eye_l + eye_r) / 2)
    pts = np.stack([eye_l, eye_r, nose, mouth - 15 * across, mouth + 15 * across])
    centre = pts.mean(0)
    side = 2.2 * np.linalg.norm(eye_r - eye_l)
    return FaceBox(
        round(centre[0] - side / 2),
        round(centre[1] - side / 2),
        round(side),
        round(side),
        0.95,
        pts,
    )


def _with_points(b: FaceBox, pts: np.ndarray) -> FaceBox:
    return FaceBox(b.x, b.y, b.w, b.h, b.score, np.asarray(pts, np.float64))


class TestFivePointMatrices:
    def test_five_point_anchors(self):
        pts = np.array([[10.0, 20.0], [30.0, 21.0], [20.0, 30.0], [12.0, 40.0], [28.0, 44.0]])
        want = np.array([[10.0, 20.0], [30.0, 21.0], [20.0, 42.0]])
        np.testing.assert_allclose(five_point_anchors(pts), want)
        batch = np.stack([pts, pts + 7])
        got = five_point_anchors(batch)
        assert got.shape == (2, 3, 2)
        np.testing.assert_allclose(got, np.stack([want, want + 7]))

    @pytest.mark.parametrize(("angle", "scale"), [(0.0, 1.0), (12.0, 0.6), (-25.0, 1.7)])
    def test_points_go_onto_the_celeba_anchor(self, angle, scale):
        m_true = _similarity(angle, scale, (-40.0, 25.0))
        face = _face(m_true)
        (m,) = point_matrices([face], SIZE, FRAMING)
        np.testing.assert_allclose(m, m_true, atol=1e-9)
        got = _apply(m, five_point_anchors(face.points))
        np.testing.assert_allclose(got, CELEBA_ANCHOR_5 * SIZE, atol=1e-9)
        # not the dlib anchor, and not the box square
        assert np.abs(got - CELEBA_ANCHOR * SIZE).max() > 0.5
        assert np.abs(m - box_matrices([face], SIZE, FRAMING)[0]).max() > 1e-3

    def test_align_matrices_target(self):
        face = _face(_similarity(8.0, 0.8, (10.0, -5.0)))
        anchors = five_point_anchors(face.points)[None]
        for target in (CELEBA_ANCHOR, CELEBA_ANCHOR_5):
            (m,) = align_matrices(anchors, 64, target=target)
            a = _apply(m, anchors[0])
            np.testing.assert_allclose(a[2], target[2] * 64, atol=1e-9)
            np.testing.assert_allclose(
                (a[0] + a[1]) / 2, (target[0] + target[1]) / 2 * 64, atol=1e-9
            )
        assert align_matrices(np.zeros((0, 3, 2)), 64).shape == (0, 2, 3)

    def test_insane_points_fall_back_to_the_framed_box(self):
        good = _face(_similarity(5.0, 0.7, (-30.0, 10.0)))
        c = np.array([good.x + good.w / 2, good.y + good.h / 2])
        rot90 = np.array([[0.0, -1.0], [1.0, 0.0]])
        rolled = _with_points(good, (good.points - c) @ rot90.T + c)
        eyes_y = good.points[:2, 1].mean()
        squashed = good.points.copy()
        squashed[3:, 1] = eyes_y + 0.05 * good.w  # mouth 0.05 box widths below the eyes
        flat = _with_points(good, squashed)
        boxes = [good, rolled, flat]
        mats = point_matrices(boxes, SIZE, FRAMING)
        fallback = box_matrices(boxes, SIZE, FRAMING)
        assert mats.shape == (3, 2, 3)
        np.testing.assert_allclose(mats[1:], fallback[1:])
        assert np.abs(mats[0] - fallback[0]).max() > 1e-3
        # the detector's framing, not the Haar default
        assert np.abs(fallback[1] - box_matrices([rolled], SIZE)[0]).max() > 1e-3

    def test_no_boxes(self):
        assert point_matrices([], SIZE, FRAMING).shape == (0, 2, 3)

    def test_anchor_matrices_uses_the_given_fallback(self):
        face = _face(_similarity(0.0, 1.0, (0.0, 0.0)))
        anchors = five_point_anchors(face.points)[None]
        sentinel = np.full((1, 2, 3), 7.0)
        out = anchor_matrices(anchors, [face], SIZE, CELEBA_ANCHOR_5, sentinel)
        assert not np.allclose(out, sentinel)
        bad = anchors.copy()
        bad[0, 2] = bad[0, :2].mean(0)  # mouth on the eyes: length 0
        out = anchor_matrices(bad, [face], SIZE, CELEBA_ANCHOR_5, sentinel)
        np.testing.assert_array_equal(out, sentinel)


class TestBoxFraming:
    def test_framing_sets_the_square(self):
        boxes = [FaceBox(50, 40, 60, 70, 1.0), FaceBox(0, 0, 33, 30, 1.0)]
        for framing in ((CROP_SCALE, CROP_SHIFT), FRAMING):
            mats = box_matrices(boxes, 64, framing)
            for m, (x0, y0, side, _) in zip(mats, crop_rects(boxes, *framing), strict=True):
                # the square's outer pixel edges go onto the crop's
                corners = np.array([[x0 - 0.5, y0 - 0.5], [x0 + side - 0.5, y0 + side - 0.5]])
                np.testing.assert_allclose(
                    _apply(m, corners), [[-0.5, -0.5], [63.5, 63.5]], atol=1e-9
                )
        assert not np.allclose(box_matrices(boxes, 64, FRAMING), box_matrices(boxes, 64))
        np.testing.assert_array_equal(
            box_matrices(boxes, 64), box_matrices(boxes, 64, (CROP_SCALE, CROP_SHIFT))
        )

    def test_framed_warp_cuts_what_crop_faces_cuts(self):
        frame = _smooth(180, 220)
        boxes = [FaceBox(70, 60, 64, 72, 1.0)]
        want, _ = crop_faces(frame, boxes, 64, scale=FRAMING[0], shift=FRAMING[1])
        got = warp_faces(frame, box_matrices(boxes, 64, FRAMING), 64)
        assert float((got - want).abs().max()) < 4 / 127.5


def _crop_area(m: np.ndarray, side: int, shape: tuple[int, int], inset: float) -> np.ndarray:
    """Frame pixels whose centre maps inside the crop, ``inset`` crop pixels from its edge."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    q = _apply(m, np.stack([xx, yy], -1))
    lo, hi = -0.5 + inset, side - 0.5 - inset
    return np.all((q >= lo) & (q <= hi), -1)


class TestAddWarped:
    M = _similarity(20.0, 0.5, (-10.0, -20.0))  # a 64-px crop of a 128-px rotated square

    def test_zero_parts_give_an_identical_copy(self):
        frame = _smooth(120, 160)
        before = frame.copy()
        out = add_warped(frame, np.zeros((1, 3, 64, 64), np.float32), self.M[None])
        assert out is not frame and out.dtype == np.uint8
        np.testing.assert_array_equal(out, frame)
        np.testing.assert_array_equal(frame, before)
        empty = add_warped(frame, np.zeros((0, 3, 64, 64), np.float32), np.zeros((0, 2, 3)))
        np.testing.assert_array_equal(empty, frame)

    def test_constant_part_adds_inside_the_crop_only(self):
        frame = np.full((160, 200, 3), 100, np.uint8)
        before = frame.copy()
        out = add_warped(frame, np.full((1, 3, 64, 64), 10.0, np.float32), self.M[None])
        np.testing.assert_array_equal(frame, before)
        delta = out.astype(int) - 100
        inside = _crop_area(self.M, 64, frame.shape[:2], inset=1.0)
        outside = ~_crop_area(self.M, 64, frame.shape[:2], inset=-1.0)
        assert inside.sum() > 2000 and outside.sum() > 2000
        assert np.all(delta[inside] == 10)
        assert np.all(delta[outside] == 0)
        assert np.all((delta >= 0) & (delta <= 10))

    def test_tensor_parts_and_several_faces(self):
        frame = np.full((240, 320, 3), 100, np.uint8)
        m2 = _similarity(0.0, 1.0, (-230.0, -160.0))  # a 64-px square at (230, 160)
        parts = torch.zeros(2, 3, 64, 64)
        parts[0] = 10.0
        parts[1, 0] = -20.0  # red only
        out = add_warped(frame, parts, np.stack([self.M, m2]))
        assert np.all(out[165:220, 235:290] == [80, 100, 100])
        assert not _crop_area(self.M, 64, frame.shape[:2], inset=-1.0)[160:224, 230:294].any()
        inside = _crop_area(self.M, 64, frame.shape[:2], inset=1.0)
        assert np.all(out[inside] == 110)

    def test_clips_to_the_uint8_range(self):
        frame = np.full((160, 200, 3), 250, np.uint8)
        frame[:, 100:] = 5
        part = np.full((1, 3, 64, 64), 10.0, np.float32)
        part[:, :, :, 32:] = -10.0
        m = _similarity(0.0, 1.0, (-68.0, -40.0))  # the square x 68..131, y 40..103
        out = add_warped(frame, part, m[None])
        assert out.dtype == np.uint8
        assert np.all(out[50:95, 75:95] == 255)  # 250 + 10, not 4
        assert np.all(out[50:95, 105:125] == 0)  # 5 - 10, not 251
        assert np.all(out[:, :60] == 250) and np.all(out[:, 140:] == 5)

    def test_crop_outside_the_frame_is_skipped(self):
        frame = _smooth(64, 64)
        m = _similarity(0.0, 1.0, (-500.0, -500.0))
        out = add_warped(frame, np.full((1, 3, 32, 32), 50.0, np.float32), m[None])
        np.testing.assert_array_equal(out, frame)

    def test_count_mismatch_raises(self):
        frame = _smooth(64, 64)
        with pytest.raises(ValueError, match="parts"):
            add_warped(frame, np.zeros((2, 3, 32, 32), np.float32), self.M[None])
        with pytest.raises(ValueError, match="parts"):
            add_warped(frame, np.zeros((1, 3, 32, 32), np.float32), np.stack([self.M] * 2))

    def test_bad_frame_raises(self):
        with pytest.raises(ValueError, match="frame"):
            add_warped(np.zeros((64, 64), np.uint8), np.zeros((1, 3, 32, 32)), self.M[None])

    def test_warp_then_add_the_difference_round_trips(self):
        h, w = 160, 200
        a = _smooth(h, w)
        m = _similarity(15.0, 0.8, (-60.0, -10.0))
        centre = _apply(np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2], [[31.5, 31.5]])[0]
        yy, xx = np.mgrid[0:h, 0:w]
        bump = 30 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * 12.0**2))
        b = np.clip(a + bump[..., None], 0, 255).astype(np.uint8)
        part = (warp_faces(b, m[None], 64) - warp_faces(a, m[None], 64)) * 127.5
        out = add_warped(a, part, m[None])
        assert np.abs(b.astype(int) - a).max() >= 29  # the edit is large ...
        assert np.abs(out.astype(int) - b).max() <= 3  # ... and lands where it was cut
        inside = _crop_area(m, 64, (h, w), inset=1.0)
        outside = ~_crop_area(m, 64, (h, w), inset=-1.0)
        assert np.all(out[outside] == a[outside])
        assert np.abs(out[inside].astype(int) - b[inside]).mean() < 1.0
