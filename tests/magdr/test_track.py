from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from daemon.media import decode
from magdr.faces.detector import YuNet
from magdr.faces.locate import FaceBox
from magdr.faces.track import FaceFollower, FollowStats, OneEuro, iou

DEMO = Path(__file__).resolve().parents[2] / "daemon" / "assets" / "demo.mp4"

#: Five landmarks as fractions of a box (eyes, nose, mouth corners).
_LAYOUT = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])


def _box(x: int, y: int, w: int, h: int | None = None, score: float = 0.95) -> FaceBox:
    h = w if h is None else h
    return FaceBox(x, y, w, h, score, np.array([x, y]) + _LAYOUT * (w, h))


def _frame(fid: int, h: int = 200, w: int = 240) -> np.ndarray:
    """A frame whose every pixel says where it is and which frame it belongs to: (x, y, fid)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x, y, np.full_like(x, fid)], -1).astype(np.uint8)


@dataclass
class Call:
    fid: int
    origin: tuple[int, int]
    shape: tuple[int, ...]
    max_side: int
    max_faces: int | None
    min_size: int

    @property
    def full(self) -> bool:
        return self.origin == (0, 0) and self.max_side == 320


@dataclass
class FakeDetector:
    """A scripted detector: ``world[fid]`` are the frame's faces in frame pixels.

    Called on a window crop it returns the faces that overlap the crop, in the crop's
    pixels (read off the crop's corner pixel), largest first, as a real detector does.
    """

    world: dict[int, list[FaceBox]]
    calls: list[Call] = field(default_factory=list)

    def __call__(self, img, *, min_size, max_faces, max_side):
        x0, y0, fid = (int(v) for v in img[0, 0])
        h, w = img.shape[:2]
        self.calls.append(Call(fid, (x0, y0), img.shape, max_side, max_faces, min_size))
        out = []
        for b in self.world.get(fid, []):
            if b.x < x0 + w and b.x + b.w > x0 and b.y < y0 + h and b.y + b.h > y0:
                out.append(FaceBox(b.x - x0, b.y - y0, b.w, b.h, b.score, b.points - (x0, y0)))
        out.sort(key=lambda b: -b.w * b.h)
        return out if max_faces is None else out[:max_faces]

    def kinds(self, fid: int) -> list[str]:
        return ["full" if c.full else "window" for c in self.calls if c.fid == fid]


def _same(got: list[FaceBox], want: list[FaceBox]) -> None:
    assert [b.as_list() for b in got] == [b.as_list() for b in want]
    assert [b.score for b in got] == [b.score for b in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.points, w.points)


class TestSchedule:
    def test_every_three(self):
        world = {k: [_box(80 + k, 60, 48)] for k in range(1, 5)}
        det = FakeDetector(world)
        follow = FaceFollower(det, every=3)
        for k in range(1, 5):
            _same(follow(_frame(k)), world[k])
        assert [det.kinds(k) for k in range(1, 5)] == [["full"], ["window"], ["window"], ["full"]]
        assert follow.stats == FollowStats(frames=4, detections=2, followed=2, lost=0)

    def test_calls_made(self):
        det = FakeDetector({k: [_box(80 + k, 60, 48)] for k in (1, 2)})
        follow = FaceFollower(
            det, every=3, min_size=20, max_faces=4, max_side=320, window=2.0, window_side=150
        )
        follow(_frame(1))
        follow(_frame(2))
        full, window = det.calls
        assert (full.shape, full.max_side, full.max_faces, full.min_size) == (
            (200, 240, 3),
            320,
            4,
            20,
        )
        # a window of 2 box sides around the frame-1 box (81, 60, 48, 48), at window_side
        assert window.origin == (57, 36) and window.shape == (96, 96, 3)
        assert (window.max_side, window.max_faces, window.min_size) == (150, None, 20)

    def test_window_clipped_at_the_frame_edge(self):
        det = FakeDetector({k: [_box(4 + k, 150, 40)] for k in (1, 2)})
        follow = FaceFollower(det, every=2)
        follow(_frame(1))
        _same(follow(_frame(2)), det.world[2])
        window = det.calls[1]
        # centred on the box it would start at x = -15: it is shifted to 0 and keeps its side
        # across, and is cut at the frame's bottom edge
        assert window.origin == (0, 130)
        assert window.shape == (200 - 130, 80, 3)

    def test_every_one_always_detects(self):
        det = FakeDetector({k: [_box(80, 60, 48)] for k in range(1, 5)})
        follow = FaceFollower(det, every=1)
        for k in range(1, 5):
            follow(_frame(k))
        assert all(c.full for c in det.calls) and len(det.calls) == 4
        assert follow.stats == FollowStats(frames=4, detections=4, followed=0, lost=0)

    @pytest.mark.parametrize("every", [0, -1])
    def test_every_below_one_raises(self, every):
        with pytest.raises(ValueError, match="every"):
            FaceFollower(FakeDetector({}), every=every)

    def test_changed_frame_shape_forces_detection(self):
        det = FakeDetector({k: [_box(80, 60, 48)] for k in range(1, 4)})
        follow = FaceFollower(det, every=5)
        follow(_frame(1))
        follow(_frame(2, h=210))
        follow(_frame(3, h=210))
        assert [det.kinds(k) for k in (1, 2, 3)] == [["full"], ["full"], ["window"]]
        assert follow.stats.lost == 0


class TestLost:
    @pytest.mark.parametrize(
        ("moved", "next_kinds"),
        [
            pytest.param([], ["full"], id="not-found"),
            pytest.param([_box(81, 60, 48, score=0.5)], ["window", "full"], id="low-score"),
            pytest.param([_box(112, 60, 48)], ["window"], id="far-off"),  # IoU 0.2
        ],
    )
    def test_lost_face_is_detected_in_the_same_frame(self, moved, next_kinds):
        world = {1: [_box(80, 60, 48)], 2: moved, 3: moved}
        det = FakeDetector(world)
        follow = FaceFollower(det, every=3, min_score=0.8)
        follow(_frame(1))
        _same(follow(_frame(2)), moved)
        assert det.kinds(2) == ["window", "full"]
        assert follow.stats == FollowStats(frames=2, detections=2, followed=0, lost=1)
        # the detection restarted the schedule: frame 3 follows what it found (nothing to
        # follow: detect; a face still scoring low: lost again)
        follow(_frame(3))
        assert det.kinds(3) == next_kinds
        assert follow.stats.lost == 1 + (next_kinds == ["window", "full"])

    def test_small_move_is_followed(self):
        world = {1: [_box(80, 60, 48)], 2: [_box(92, 66, 48, score=0.81)]}
        assert iou(world[1][0], world[2][0]) > 0.3
        det = FakeDetector(world)
        follow = FaceFollower(det, every=3, min_score=0.8)
        follow(_frame(1))
        _same(follow(_frame(2)), world[2])
        assert det.kinds(2) == ["window"] and follow.stats.lost == 0

    def test_one_of_two_lost_redetects_both(self):
        a, b = _box(20, 60, 40), _box(150, 60, 56)
        det = FakeDetector({1: [a, b], 2: [b]})
        follow = FaceFollower(det, every=4)
        follow(_frame(1))
        _same(follow(_frame(2)), [b])
        assert det.kinds(2)[-1] == "full" and follow.stats.lost == 1


class TestIdentity:
    def test_each_window_keeps_its_own_face(self):
        # both windows see both faces; the larger one comes first in every detection
        a1, b1 = _box(30, 70, 40), _box(75, 60, 56)
        a2, b2 = _box(32, 71, 40), _box(77, 61, 56)
        det = FakeDetector({1: [a1, b1], 2: [a2, b2]})
        follow = FaceFollower(det, every=3)
        _same(follow(_frame(1)), [b1, a1])
        _same(follow(_frame(2)), [b2, a2])
        assert det.kinds(2) == ["window", "window"]
        windows = det.calls[1:3]
        for c in windows:  # the test's premise: each window holds both faces
            (x0, y0), (h, w) = c.origin, c.shape[:2]
            assert (
                len(
                    det(
                        _frame(2)[y0 : y0 + h, x0 : x0 + w],
                        min_size=32,
                        max_faces=None,
                        max_side=160,
                    )
                )
                == 2
            )

    def test_tracks_keep_their_filter_across_detections(self):
        a1, b1 = _box(30, 70, 40), _box(120, 60, 56)
        a3, b3 = _box(31, 70, 60), _box(121, 60, 44)  # now a is the larger one
        det = FakeDetector({1: [a1, b1], 2: [a1, b1], 3: [a3, b3]})
        follow = FaceFollower(det, every=2, smooth=0.1)
        follow(_frame(1))
        filters = {id(t.filter): t.box.x for t in follow.tracks}
        assert len(filters) == 2 and None not in [t.filter for t in follow.tracks]
        follow(_frame(2))
        out = follow(_frame(3))
        assert det.kinds(3) == ["full"]
        assert [b.x for b in out] == [31, 121]
        assert [filters[id(t.filter)] for t in follow.tracks] == [30, 120]


class TestSmoothing:
    def test_smooth_zero_leaves_points_untouched(self):
        rng = np.random.default_rng(0)
        world = {}
        for k in range(1, 7):
            b = _box(80, 60, 48)
            world[k] = [FaceBox(b.x, b.y, b.w, b.h, b.score, b.points + rng.normal(0, 2, (5, 2)))]
        det = FakeDetector(world)
        follow = FaceFollower(det, every=3, smooth=0.0)
        for k in range(1, 7):
            (got,) = follow(_frame(k))
            np.testing.assert_array_equal(got.points, world[k][0].points)
        assert all(t.filter is None for t in follow.tracks)

    def test_smoothing_on_followed_points(self):
        rng = np.random.default_rng(0)
        base = _box(60, 40, 96).points
        world = {
            k: [FaceBox(60, 40, 96, 96, 0.95, base + rng.normal(0, 1, (5, 2)))]
            for k in range(1, 41)
        }
        raw, smooth = [], []
        follow = FaceFollower(FakeDetector(world), every=5, smooth=0.05)
        for k in range(1, 41):
            (got,) = follow(_frame(k))
            raw.append(world[k][0].points)
            smooth.append(got.points)
        np.testing.assert_array_equal(smooth[0], raw[0])  # nothing to smooth yet
        raw_step = np.diff(np.array(raw[10:]), axis=0).std()
        smooth_step = np.diff(np.array(smooth[10:]), axis=0).std()
        assert smooth_step < 0.5 * raw_step


class TestOneEuro:
    @staticmethod
    def _run(f: OneEuro, xs: np.ndarray, scale: float = 100.0) -> np.ndarray:
        return np.array([f(x, scale) for x in xs])

    def test_first_sample_passes_through(self):
        x = np.array([[3.0, 4.0], [5.0, 6.0]])
        np.testing.assert_array_equal(OneEuro(0.05)(x, 50.0), x)

    def test_static_point_jitter_is_reduced(self):
        rng = np.random.default_rng(0)
        xs = np.array([[100.0, 50.0]]) + rng.normal(0, 1.0, (300, 1, 2))
        ys = self._run(OneEuro(0.05), xs)
        raw = np.diff(xs[50:], axis=0).std()
        out = np.diff(ys[50:], axis=0).std()
        assert out < 0.4 * raw
        assert np.abs(ys[50:] - [[100.0, 50.0]]).max() < 2.0  # and stays on the point
        assert not np.allclose(ys, xs)

    @staticmethod
    def _frames_to_settle(f: OneEuro) -> int:
        for _ in range(20):
            f(np.zeros((1, 2)), 100.0)
        for n in range(1, 200):
            y = f(np.array([[20.0, 0.0]]), 100.0)  # a step of 0.2 face sizes
            if abs(y[0, 0] - 20.0) < 1.0:
                return n
        return 200

    def test_step_is_followed_quickly(self):
        fast = self._frames_to_settle(OneEuro(0.05, beta=4.0))
        slow = self._frames_to_settle(OneEuro(0.05, beta=0.0))
        assert fast <= 4
        assert slow > 2 * fast  # the speed term raises the cut-off

    def test_output_is_a_copy(self):
        f = OneEuro(0.05)
        f(np.zeros((1, 2)), 10.0)
        y = f(np.ones((1, 2)), 10.0)
        y += 100
        z = f(np.ones((1, 2)), 10.0)
        assert np.all(z < 2)


class TestIou:
    def test_values(self):
        a = FaceBox(0, 0, 10, 10, 1.0)
        assert iou(a, a) == 1.0
        assert iou(a, FaceBox(5, 0, 10, 10, 1.0)) == pytest.approx(50 / 150)
        assert iou(a, FaceBox(10, 0, 10, 10, 1.0)) == 0.0
        assert iou(a, FaceBox(20, 20, 5, 5, 1.0)) == 0.0
        assert iou(FaceBox(0, 0, 0, 0, 1.0), FaceBox(0, 0, 0, 0, 1.0)) == 0.0


@pytest.fixture(scope="module")
def demo_frames() -> list[np.ndarray]:
    return [f.image for f in itertools.islice(decode(DEMO, 1 << 30), 10)]


def test_yunet_followed_matches_detecting_every_frame(demo_frames):
    det = YuNet()
    follow = FaceFollower(det, every=5, window=1.6)
    for k, frame in enumerate(demo_frames):
        (got,) = follow(frame)
        (ref,) = det(frame, max_side=320)
        # YuNet on a window and on the whole frame: a few % of the face apart, not more
        assert np.abs(np.subtract(got.as_list(), ref.as_list())).max() <= 0.08 * ref.w, k
        assert np.abs(got.points - ref.points).max() <= 0.08 * ref.w, k
        if k % 5 == 0:
            assert got.as_list() == ref.as_list()
    assert follow.stats == FollowStats(frames=10, detections=2, followed=8, lost=0)
