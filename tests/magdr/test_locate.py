from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from magdr.faces.locate import (
    CROP_SCALE,
    FaceBox,
    crop_faces,
    crop_rects,
    feather_mask,
    locate_faces,
    paste_faces,
)

DATA = Path(os.environ.get("MAGDR_DATA") or Path(__file__).resolve().parents[3] / "shared/data")
PORTRAITS = DATA / "portraits"


def _portrait(name: str) -> np.ndarray:
    path = PORTRAITS / name
    if not path.is_file():
        pytest.skip(f"face data not found: {path}")
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _smooth(h: int, w: int) -> np.ndarray:
    """A smooth deterministic RGB frame (resampling barely changes it)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [128 + 80 * np.sin(x / 23 + p) * np.cos(y / 29 - p) for p in (0.0, 1.0, 2.0)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def _coords(h: int, w: int) -> np.ndarray:
    """Frame whose pixels encode their row (R) and column (G), to check crop geometry."""
    f = np.zeros((h, w, 3), np.uint8)
    f[..., 0] = np.arange(h)[:, None]
    f[..., 1] = np.arange(w)[None, :]
    f[..., 2] = 7
    return f


def _to_uint8(faces: torch.Tensor) -> np.ndarray:
    return np.rint((faces.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)


class TestLocateFaces:
    def test_blank_and_noise_frames_give_no_faces(self):
        assert locate_faces(np.zeros((120, 160, 3), np.uint8)) == []
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
        assert isinstance(locate_faces(noise), list)

    def test_empty_and_tiny_frames(self):
        assert locate_faces(np.zeros((0, 0, 3), np.uint8)) == []
        assert locate_faces(np.zeros((5, 7, 3), np.uint8)) == []

    def test_bad_input_raises(self):
        with pytest.raises(ValueError, match=r"uint8 \[H,W,3\]"):
            locate_faces(np.zeros((32, 32, 3), np.float32))
        with pytest.raises(ValueError, match=r"uint8 \[H,W,3\]"):
            locate_faces(np.zeros((32, 32), np.uint8))
        with pytest.raises(TypeError, match="numpy array"):
            locate_faces(torch.zeros(32, 32, 3))  # type: ignore[arg-type]

    def test_huge_blank_frame_is_downscaled(self):
        t = time.perf_counter()
        assert locate_faces(np.full((2400, 4000, 3), 90, np.uint8), max_side=640) == []
        assert time.perf_counter() - t < 5.0

    def test_facebox_as_list(self):
        assert FaceBox(1, 2, 3, 4, 0.5).as_list() == [1, 2, 3, 4]

    @pytest.mark.data
    def test_portrait_has_one_face(self):
        frame = _portrait("d19.jpg")  # one clear frontal face, 720x720
        boxes = locate_faces(frame)
        assert len(boxes) == 1
        b = boxes[0]
        assert 250 < b.w < 600 and b.w == b.h
        assert 0 <= b.x and b.x + b.w <= 720 and 0 <= b.y and b.y + b.h <= 720
        assert locate_faces(frame, min_size=700) == []

    @pytest.mark.data
    def test_sorted_largest_first_and_max_faces(self):
        frame = _portrait("s42.jpg")  # a large face and a small background one
        boxes = locate_faces(frame, min_size=20, min_neighbors=3, max_faces=None)
        areas = [b.w * b.h for b in boxes]
        assert len(boxes) >= 1 and areas == sorted(areas, reverse=True)
        assert locate_faces(frame, min_size=20, min_neighbors=3, max_faces=1) == boxes[:1]

    @pytest.mark.data
    def test_downscaled_detection_maps_back_to_frame_pixels(self):
        frame = _portrait("s12.jpg")  # 375x500
        (b,) = locate_faces(frame)
        big = cv2.resize(frame, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
        (B,) = locate_faces(big, max_side=500)  # detection runs at the original size
        assert abs(B.x - 4 * b.x) <= 12 and abs(B.y - 4 * b.y) <= 12
        assert abs(B.w - 4 * b.w) <= 16

    @pytest.mark.data
    @pytest.mark.parametrize("name", ["s25.jpg", "s41.jpg"])  # a dog, a cat
    def test_animals_are_rejected(self, name):
        assert locate_faces(_portrait(name)) == []


class TestCropFaces:
    def test_rect_geometry(self):
        (r,) = crop_rects([FaceBox(100, 50, 40, 40, 1.0)])
        side = round(CROP_SCALE * 40)
        assert r[2] == r[3] == side
        # centred horizontally on the box, above it vertically (forehead and hair)
        assert abs(r[0] + side / 2 - 120) <= 1
        assert r[1] + side / 2 < 70

    def test_shapes_range_and_empty(self):
        frame = _smooth(64, 80)
        faces, rects = crop_faces(frame, [FaceBox(20, 20, 24, 24, 1.0)] * 2, size=32)
        assert faces.shape == (2, 3, 32, 32) and faces.dtype == torch.float32
        assert faces.min() >= -1 and faces.max() <= 1
        assert rects.shape == (2, 4) and rects.dtype == np.int64
        faces, rects = crop_faces(frame, [], size=32)
        assert faces.shape == (0, 3, 32, 32) and rects.shape == (0, 4)

    def test_crop_at_native_size_is_the_frame_slice(self):
        frame = _coords(100, 120)
        box = FaceBox(40, 40, 20, 20, 1.0)
        (x, y, side, _) = crop_rects([box])[0]
        faces, _ = crop_faces(frame, [box], size=int(side))
        assert np.array_equal(_to_uint8(faces)[0], frame[y : y + side, x : x + side])

    def test_border_is_edge_replicated(self):
        frame = _coords(60, 60)
        box = FaceBox(0, 0, 20, 20, 1.0)  # crop reaches above and left of the frame
        (x, y, side, _) = crop_rects([box])[0]
        assert x < 0 and y < 0
        crop = _to_uint8(crop_faces(frame, [box], size=int(side))[0])[0]
        assert (crop[:-y, :, 0] == 0).all()  # rows above the frame repeat row 0
        assert (crop[:, :-x, 1] == 0).all()  # columns left of it repeat column 0
        assert np.array_equal(crop[-y:, -x:], frame[: side + y, : side + x])


class TestPasteFaces:
    def test_identity_round_trip_is_exact_at_native_size(self):
        frame = _smooth(90, 110)
        boxes = [FaceBox(30, 30, 30, 30, 1.0)]
        side = int(crop_rects(boxes)[0, 2])
        faces, rects = crop_faces(frame, boxes, size=side)
        out = paste_faces(frame, faces, rects)
        assert np.array_equal(out, frame)

    def test_identity_round_trip_with_resize(self):
        frame = _smooth(200, 240)
        faces, rects = crop_faces(frame, [FaceBox(80, 70, 60, 60, 1.0)], size=64)
        out = paste_faces(frame, faces, rects)
        x, y, s, _ = rects[0]
        inner = np.s_[y + s // 8 : y + s - s // 8, x + s // 8 : x + s - s // 8]
        diff = np.abs(out.astype(int) - frame.astype(int))
        assert diff[inner].max() <= 6 and diff.mean() < 0.5

    def test_feathered_border_has_no_seam(self):
        frame = np.zeros((100, 100, 3), np.uint8)
        rects = np.array([[20, 20, 60, 60]])
        out = paste_faces(frame, torch.ones(1, 3, 16, 16), rects, feather=0.2)
        assert (out[50, 50] == 255).all()  # middle: the face
        assert out[20, 50, 0] < 10 and out[50, 79, 0] < 10  # rectangle border: ~ the frame
        row = out[50, 20:50, 0].astype(int)
        assert (np.diff(row) >= 0).all()  # smooth monotone ramp, no step
        assert np.diff(row).max() < 40
        outside = np.ones((100, 100), bool)
        outside[20:80, 20:80] = False
        assert (out[outside] == 0).all()
        hard = paste_faces(frame, torch.ones(1, 3, 16, 16), rects, feather=0.0)
        assert (hard[20:80, 20:80] == 255).all()

    def test_multiple_faces_and_outside_rects(self):
        frame = np.full((80, 160, 3), 100, np.uint8)
        faces = torch.stack([torch.full((3, 8, 8), -1.0), torch.full((3, 8, 8), 1.0)])
        rects = np.array([[10, 10, 40, 40], [100, 30, 80, 80]])  # the second leaves the frame
        out = paste_faces(frame, faces, rects)
        assert out[30, 30, 0] == 0 and out[65, 135, 0] == 255
        assert (out[:, 60:90] == 100).all()
        far = paste_faces(frame, faces[:1], np.array([[500, 500, 20, 20]]))
        assert np.array_equal(far, frame)
        assert (frame == 100).all()  # the input frame is not modified

    def test_numpy_faces_and_bad_shapes(self):
        frame = np.zeros((40, 40, 3), np.uint8)
        out = paste_faces(frame, np.zeros((1, 3, 8, 8), np.float32), np.array([[0, 0, 40, 40]]))
        assert out[20, 20, 0] in (127, 128)
        with pytest.raises(ValueError, match="F = len"):
            paste_faces(frame, torch.zeros(2, 3, 8, 8), np.array([[0, 0, 40, 40]]))
        assert paste_faces(frame, torch.zeros(0, 3, 8, 8), np.zeros((0, 4))).shape == frame.shape

    def test_feather_mask(self):
        m = feather_mask(50, 0.2)
        assert m.shape == (50, 50) and m.dtype == np.float32
        assert m[25, 25] == 1.0 and m[0, 0] < 1e-3 and np.allclose(m, m.T)
        assert (feather_mask(10, 0.0) == 1).all()

    @pytest.mark.data
    def test_portrait_crop_paste(self):
        frame = _portrait("d9.jpg")
        boxes = locate_faces(frame)
        faces, rects = crop_faces(frame, boxes, size=128)
        assert faces.shape == (1, 3, 128, 128)
        out = paste_faces(frame, faces, rects)
        diff = np.abs(out.astype(int) - frame.astype(int))
        assert diff.mean() < 2.0
