from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.media import decode
from magdr.faces.detector import (
    CROP_FRAMING,
    DETECTORS,
    POINT_NAMES,
    YUNET_PATH,
    YUNET_SHA256,
    YuNet,
    haar,
    load_detector,
)
from magdr.faces.locate import FaceBox
from magdr.faces.track import iou

DEMO = Path(__file__).resolve().parents[2] / "daemon" / "assets" / "demo.mp4"


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """The demo clip's first frame: RGB uint8, one frontal face."""
    img = next(iter(decode(DEMO, 1 << 30))).image
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    img.setflags(write=False)  # a detector writing into its input would raise
    return img


@pytest.fixture(scope="module")
def yunet() -> YuNet:
    return YuNet()


def _two_faces(frame: np.ndarray) -> np.ndarray:
    """The demo face full size on the left and at ~60% on the right of a grey canvas."""
    h, w = frame.shape[:2]
    small = cv2.resize(frame, (w * 5 // 8, h * 5 // 8), interpolation=cv2.INTER_AREA)
    canvas = np.full((h, w + small.shape[1] + 32, 3), 128, np.uint8)
    canvas[:, :w] = frame
    y0 = (h - small.shape[0]) // 2
    canvas[y0 : y0 + small.shape[0], w + 16 : w + 16 + small.shape[1]] = small
    return canvas


def test_shipped_model_matches_its_digest():
    assert YUNET_PATH.is_file()
    assert hashlib.sha256(YUNET_PATH.read_bytes()).hexdigest() == YUNET_SHA256


class TestYuNetOnDemo:
    def test_one_face_with_sane_landmarks(self, yunet, frame):
        boxes = yunet(frame)
        assert len(boxes) == 1
        b = boxes[0]
        assert isinstance(b, FaceBox) and 0.7 <= b.score <= 1.0
        assert b.w >= 64 and b.h >= 64  # the face fills about half the 256-px frame
        pts = b.points
        assert pts.shape == (5, 2) and pts.dtype == np.float64 and len(POINT_NAMES) == 5
        assert np.all((pts[:, 0] >= b.x) & (pts[:, 0] <= b.x + b.w))
        assert np.all((pts[:, 1] >= b.y) & (pts[:, 1] <= b.y + b.h))
        left_eye, right_eye, nose, left_mouth, right_mouth = pts
        assert left_eye[0] < nose[0] < right_eye[0]
        assert left_mouth[0] < right_mouth[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])

    def test_mirrored_frame_gives_mirrored_face_in_image_order(self, yunet, frame):
        (b,) = yunet(frame)
        (m,) = yunet(np.ascontiguousarray(frame[:, ::-1]))
        w = frame.shape[1]
        assert iou(m, FaceBox(w - b.x - b.w, b.y, b.w, b.h, 1.0)) > 0.8
        # image-left is still first: the mirror of the original's right eye / mouth corner
        mirrored = np.column_stack([w - 1 - b.points[:, 0], b.points[:, 1]])[[1, 0, 2, 4, 3]]
        assert m.points[0, 0] < m.points[1, 0] and m.points[3, 0] < m.points[4, 0]
        np.testing.assert_allclose(m.points, mirrored, atol=8.0)

    def test_frame_is_not_modified(self, yunet, frame):
        writable = frame.copy()
        before = writable.copy()
        for side in (160, 320):
            assert yunet(writable, max_side=side)
        np.testing.assert_array_equal(writable, before)

    def test_boxes_are_in_frame_pixels_whatever_the_detection_scale(self, yunet, frame):
        (small,) = yunet(frame, max_side=160)  # detected on a 160-px copy
        (full,) = yunet(frame, max_side=320)  # the 256-px frame itself
        assert iou(small, full) > 0.8
        np.testing.assert_allclose(small.points, full.points, atol=0.06 * full.w)

    def test_upscaled_frame_gives_scaled_boxes(self, yunet, frame):
        (b,) = yunet(frame)
        big = cv2.resize(frame, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
        (b2,) = yunet(big, max_side=320)
        assert iou(b2, FaceBox(2 * b.x, 2 * b.y, 2 * b.w, 2 * b.h, 1.0)) > 0.8
        np.testing.assert_allclose(b2.points, 2 * b.points, atol=0.06 * b2.w)

    def test_max_faces_keeps_the_largest(self, yunet, frame):
        canvas = _two_faces(frame)
        both = yunet(canvas, max_side=640, max_faces=None)
        assert len(both) == 2
        assert both[0].w * both[0].h > both[1].w * both[1].h
        assert both[0].x < frame.shape[1] <= both[1].x  # the big face is the left one
        (one,) = yunet(canvas, max_side=640, max_faces=1)
        assert one == both[0]

    def test_min_size_is_in_frame_pixels(self, yunet, frame):
        (b,) = yunet(frame)
        side = min(b.w, b.h)
        assert yunet(frame, min_size=side + 10) == []
        assert len(yunet(frame, min_size=side - 10)) == 1
        # at max_side=160 the face is ~0.6x as large in the detector's input; min_size is
        # still compared in frame pixels
        assert len(yunet(frame, min_size=side - 10, max_side=160)) == 1
        assert yunet(frame, min_size=side + 10, max_side=160) == []
        canvas = _two_faces(frame)
        both = yunet(canvas, max_side=640, max_faces=None)
        kept = yunet(canvas, max_side=640, max_faces=None, min_size=min(both[1].w, both[1].h) + 5)
        assert kept == both[:1]


class TestYuNetEdgeCases:
    def test_blank_and_noise_frames_have_no_face(self, yunet):
        assert yunet(np.zeros((120, 160, 3), np.uint8)) == []
        assert yunet(np.full((120, 160, 3), 255, np.uint8)) == []
        noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
        assert yunet(noise) == []

    def test_empty_frame(self, yunet):
        assert yunet(np.zeros((0, 64, 3), np.uint8)) == []

    @pytest.mark.parametrize(
        ("bad", "error"),
        [
            (np.zeros((32, 32, 3), np.float32), ValueError),
            (np.zeros((32, 32), np.uint8), ValueError),
            (np.zeros((32, 32, 4), np.uint8), ValueError),
            (np.zeros((32, 32, 3), np.uint8).tolist(), TypeError),
        ],
    )
    def test_bad_frames_raise(self, yunet, bad, error):
        with pytest.raises(error, match="frame"):
            yunet(bad)

    def test_missing_model_raises(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="missing"):
            YuNet(tmp_path / "absent.onnx")

    def test_same_instance_from_two_threads(self, yunet, frame):
        big = cv2.resize(frame, (384, 320), interpolation=cv2.INTER_LINEAR)
        inputs = [frame, big]
        # sequential reference, alternating sizes on one thread's network
        ref = [yunet(inputs[i % 2], max_side=640) for i in range(4)]
        assert [r[0].as_list() for r in ref[:2]] == [r[0].as_list() for r in ref[2:]]
        assert ref[0][0].as_list() != ref[1][0].as_list()
        results: dict[int, list] = {0: [], 1: []}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def work(k: int) -> None:
            try:
                barrier.wait()
                for _ in range(8):
                    results[k].append(yunet(inputs[k], max_side=640))
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        for k in (0, 1):
            assert len(results[k]) == 8
            for got in results[k]:
                assert [b.as_list() for b in got] == [b.as_list() for b in ref[k]]
                np.testing.assert_allclose(got[0].points, ref[k][0].points, atol=1e-3)
                assert got[0].score == pytest.approx(ref[k][0].score, abs=1e-4)


class _StubNet:
    """Stands in for ``cv2.FaceDetectorYN``: returns the given rows, records its input."""

    def __init__(self, rows: np.ndarray | None) -> None:
        self.rows, self.seen = rows, []

    def detect(self, img):
        self.seen.append(img.copy())
        return 1, self.rows


def _row(x, y, w, h, score, swap=False):
    """A YuNet output row in detector pixels: box, five points (optionally right-first)."""
    pts = np.array([x, y]) + np.array(
        [[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]
    ) * (w, h)
    if swap:
        pts = pts[[1, 0, 2, 4, 3]]
    return np.concatenate([[x, y, w, h], pts.ravel(), [score]]).astype(np.float32)


class TestYuNetRows:
    """How YuNet's raw rows become boxes (a stub network in place of OpenCV's)."""

    @pytest.fixture
    def stub(self, monkeypatch):
        det = YuNet()
        net = _StubNet(None)
        sizes = []

        def fake_net(w, h):
            sizes.append((w, h))
            return net

        monkeypatch.setattr(det, "_net", fake_net)
        return det, net, sizes

    def test_scaled_sorted_and_in_image_order(self, stub):
        det, net, sizes = stub
        net.rows = np.stack([_row(10, 20, 30, 36, 0.99, swap=True), _row(150, 60, 60, 70, 0.8)])
        frame = np.zeros((400, 600, 3), np.uint8)
        frame[..., 0] = 255  # red in RGB
        boxes = det(frame, max_side=300, max_faces=None, min_size=10)
        assert sizes == [(300, 200)]
        assert net.seen[0].shape == (200, 300, 3)
        assert np.all(net.seen[0][..., 2] == 255) and np.all(net.seen[0][..., 0] == 0)  # BGR
        assert [b.as_list() for b in boxes] == [[300, 120, 120, 140], [20, 40, 60, 72]]
        assert [b.score for b in boxes] == pytest.approx([0.8, 0.99])
        small = boxes[1].points
        assert small[0, 0] < small[1, 0] and small[3, 0] < small[4, 0]
        np.testing.assert_allclose(small[0], [20 + 0.3 * 60, 40 + 0.4 * 72], atol=1e-3)
        np.testing.assert_array_equal(frame[..., 1:], 0)  # input untouched
        assert det(frame, max_side=300, max_faces=1, min_size=10) == boxes[:1]

    def test_min_size_in_frame_pixels(self, stub):
        det, net, _ = stub
        net.rows = _row(10, 20, 20, 24, 0.9)[None]  # 40 x 48 frame pixels at k = 0.5
        frame = np.zeros((400, 600, 3), np.uint8)
        assert len(det(frame, max_side=300, min_size=38)) == 1
        assert det(frame, max_side=300, min_size=42) == []

    def test_no_rows(self, stub):
        det, _, _ = stub
        assert det(np.zeros((50, 60, 3), np.uint8)) == []


class TestRegistry:
    def test_load_detector_by_name(self):
        assert isinstance(load_detector(), YuNet)
        assert isinstance(load_detector("yunet"), YuNet)
        assert load_detector("haar") is haar

    def test_unknown_name_names_the_choices(self):
        with pytest.raises(KeyError) as info:
            load_detector("nope")
        msg = str(info.value)
        assert "nope" in msg and "haar" in msg and "yunet" in msg

    def test_every_detector_has_a_framing(self):
        assert set(CROP_FRAMING) == set(DETECTORS)
        for side, shift in CROP_FRAMING.values():
            assert 1.0 < side < 2.5 and 0.0 <= shift < 0.5

    def test_haar_boxes_have_no_points(self, frame):
        boxes = haar(frame)
        assert len(boxes) >= 1
        assert all(b.points is None for b in boxes)
        (y,) = YuNet()(frame)
        assert iou(boxes[0], y) > 0.4  # the same face
        assert haar(np.zeros((120, 160, 3), np.uint8)) == []
