from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from magdr.faces.align import (
    CELEBA_ANCHOR,
    LandmarkLocator,
    align_matrices,
    anchor_points,
    box_matrices,
    eye_mouth_similarity,
    face_matrices,
    paste_warped,
    unwarp,
    warp_faces,
)
from magdr.faces.locate import FaceBox, crop_faces, locate_faces
from tests.conftest import data_dir, needs_landmarks

DATA = data_dir()


def _smooth(h: int, w: int) -> np.ndarray:
    """A smooth deterministic RGB frame (resampling barely changes it)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [128 + 80 * np.sin(x / 23 + p) * np.cos(y / 29 - p) for p in (0.0, 1.0, 2.0)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def _rotation(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([r, np.array(shift, np.float64)[:, None]], 1)


def _landmarks(anchor: np.ndarray) -> np.ndarray:
    """68 points whose eye and mouth groups average to the given anchor (the rest arbitrary)."""
    p = np.zeros((68, 2))
    spread = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    p[36:42], p[42:48] = anchor[0] + spread, anchor[1] + spread
    p[48:60] = anchor[2] + np.concatenate([spread, -spread])
    return p


class TestGeometry:
    def test_anchor_points_are_group_means(self):
        anchor = np.array([[10.0, 20.0], [30.0, 21.0], [20.0, 40.0]])
        pts = np.stack([_landmarks(anchor), _landmarks(anchor + 5)])
        np.testing.assert_allclose(anchor_points(pts), np.stack([anchor, anchor + 5]))

    def test_similarity_maps_a_similar_triangle_exactly(self):
        src = np.array([[10.0, 20.0], [30.0, 20.0], [20.0, 40.0]])
        m_true = _rotation(17.0, 1.7, (5.0, -3.0))
        dst = src @ m_true[:, :2].T + m_true[:, 2]
        m = eye_mouth_similarity(src, dst)
        np.testing.assert_allclose(m, m_true, atol=1e-9)

    def test_align_matrices_put_the_anchor_on_celeba_positions(self):
        anchor = np.array([[300.0, 200.0], [380.0, 215.0], [330.0, 320.0]])
        m = align_matrices(anchor[None], 128)
        assert m.shape == (1, 2, 3)
        mid = (anchor[0] + anchor[1]) / 2
        # the eye midpoint and the mouth land exactly; the eyes within the roll of the axis
        target = CELEBA_ANCHOR * 128
        np.testing.assert_allclose(m[0, :, :2] @ mid + m[0, :, 2], (target[0] + target[1]) / 2)
        np.testing.assert_allclose(m[0, :, :2] @ anchor[2] + m[0, :, 2], target[2])
        assert align_matrices(np.zeros((0, 3, 2)), 128).shape == (0, 2, 3)

    def test_box_matrices_cut_what_crop_faces_cuts(self):
        frame = _smooth(120, 160)
        boxes = [FaceBox(40, 30, 40, 40, 1.0), FaceBox(130, 90, 30, 30, 1.0)]  # one off the edge
        want, _ = crop_faces(frame, boxes, 64)
        got = warp_faces(frame, box_matrices(boxes, 64), 64)
        assert (got - want).abs().max() * 127.5 <= 3

    def test_insane_landmarks_fall_back_to_the_box_square(self):
        box = FaceBox(100, 100, 100, 100, 1.0)
        upright = np.array([[130.0, 140.0], [170.0, 140.0], [150.0, 182.0]])  # 0.42 box widths
        squashed = np.array([[140.0, 150.0], [160.0, 150.0], [150.0, 155.0]])  # a mouth box
        rolled = np.array([[130.0, 140.0], [130.0, 180.0], [170.0, 160.0]])  # 90° roll
        mats = face_matrices(
            np.stack([_landmarks(a) for a in (upright, squashed, rolled)]), [box] * 3, 128
        )
        np.testing.assert_allclose(mats[0], align_matrices(upright[None], 128)[0])
        np.testing.assert_allclose(mats[1:], box_matrices([box] * 2, 128))


class TestWarpFaces:
    def test_integer_shift_is_the_frame_slice(self):
        frame = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
        m = np.array([[[1.0, 0, -7], [0, 1.0, -5]]])  # crop pixel (0,0) = frame (7,5)
        face = warp_faces(frame, m, 32)
        got = np.rint((face[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        np.testing.assert_array_equal(got, frame[5:37, 7:39])

    def test_shrink_is_area_averaged(self):
        # A pixel-level checkerboard shrunk 4x must come out flat grey: bilinear sampling
        # alone would alias it into a pattern.
        frame = np.zeros((256, 256, 3), np.uint8)
        frame[(np.add.outer(np.arange(256), np.arange(256)) % 2) == 1] = 255
        m = np.array([[[0.25, 0, 0], [0, 0.25, 0]]])
        face = (warp_faces(frame, m, 64) + 1) * 127.5
        inner = face[0, :, 4:-4, 4:-4]
        assert abs(float(inner.mean()) - 127.5) < 2 and float(inner.std()) < 2

    def test_outside_the_frame_replicates_the_edge(self):
        frame = np.zeros((40, 40, 3), np.uint8)
        frame[:, -1] = 200
        m = np.array([[[1.0, 0, -30], [0, 1.0, 0]]])  # columns 30..61: the right 22 outside
        face = (warp_faces(frame, m, 32)[0] + 1) * 127.5
        assert torch.allclose(face[:, :, 12:], torch.tensor(200.0), atol=1)

    def test_bad_input_raises(self):
        m = np.zeros((1, 2, 3))
        with pytest.raises(ValueError, match="uint8"):
            warp_faces(np.zeros((8, 8, 3), np.float32), m, 8)
        with pytest.raises(ValueError, match="empty"):
            warp_faces(np.zeros((0, 8, 3), np.uint8), m, 8)


class TestPasteWarped:
    def test_round_trip_of_a_rotated_scaled_face(self):
        frame = _smooth(240, 320)
        m = np.stack([_rotation(20.0, 0.8, (-60.0, -20.0)), _rotation(-8.0, 1.3, (-250.0, -40.0))])
        faces = warp_faces(frame, m, 96)
        out = paste_warped(frame, faces, m)
        assert out.shape == frame.shape and out.dtype == np.uint8
        err = np.abs(out.astype(int) - frame.astype(int))
        assert err.max() <= 6 and err.mean() < 0.3

    def test_changes_stay_inside_the_warped_crop_and_fade_out(self):
        frame = np.full((200, 200, 3), 100, np.uint8)
        m = _rotation(30.0, 1.0, (-40.0, -60.0))[None]
        out = paste_warped(frame, torch.ones(1, 3, 64, 64), m)  # a white face
        where, cover = unwarp(np.ones((64, 64), np.float32), m[0], (200, 200))
        outside = np.ones((200, 200), bool)
        outside[where] = cover == 0
        assert outside.sum() > 200 * 200 - 64 * 64 * 1.2
        np.testing.assert_array_equal(out[outside], frame[outside])
        # the face centre is white, the ramp rises smoothly from the border
        centre = np.rint(np.linalg.solve(m[0, :, :2], np.array([32.0, 32.0]) - m[0, :, 2]))
        assert out[int(centre[1]), int(centre[0])].min() == 255
        assert np.abs(np.diff(out[..., 0].astype(int), axis=1)).max() < 40

    def test_crop_outside_the_frame_is_skipped(self):
        frame = _smooth(50, 50)
        m = np.array([[[1.0, 0, 500], [0, 1.0, 500]]])
        np.testing.assert_array_equal(paste_warped(frame, torch.zeros(1, 3, 16, 16), m), frame)
        assert unwarp(np.zeros((16, 16), np.float32), m[0], (50, 50)) is None

    def test_bad_shapes_raise(self):
        with pytest.raises(ValueError, match="len\\(matrices\\) = 2"):
            paste_warped(_smooth(20, 20), np.zeros((1, 3, 8, 8)), np.zeros((2, 2, 3)))


class TestLandmarkLocator:
    def test_missing_model_says_how_to_get_it(self, tmp_path):
        pytest.importorskip("dlib")
        with pytest.raises(FileNotFoundError, match="libdlib-data"):
            LandmarkLocator(tmp_path / "none.dat")

    @needs_landmarks
    def test_aligned_portrait_has_celeba_eyes_and_mouth(self):
        # The locator's own landmarks on the aligned crop land on the CelebA anchor.
        path = DATA / "portraits" / "s8.jpg"
        if not path.is_file():
            pytest.skip(f"face data not found: {path}")
        frame = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        locate = LandmarkLocator()
        boxes = locate_faces(frame)
        assert len(boxes) == 1
        m = face_matrices(locate(frame, boxes), boxes, 128)
        face = warp_faces(frame, m, 128)
        crop = np.ascontiguousarray(
            np.rint((face[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        )
        again = locate_faces(crop, min_size=20)
        assert len(again) == 1
        got = anchor_points(locate(crop, again))[0]
        assert np.abs(got - CELEBA_ANCHOR * 128).max() < 4
