"""Face tracks and the temporal rule's k-of-n bookkeeping."""

from __future__ import annotations

import pytest

from daemon.tracks import Track, Tracker, iou


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_track_flags_at_k_of_the_last_n_and_stays_flagged():
    t = Track(2, 3)
    assert [t.update(o) for o in (True, False, False, True)] == [False] * 4  # 1 of any 3
    assert t.update(True) is True  # False, True, True
    assert t.update(False) is True and t.update(False) is True  # from then on


def test_tracker_continues_overlapping_boxes_per_stream():
    tr = Tracker(1, 1)
    a, b = [10, 10, 50, 50], [200, 10, 50, 50]
    first = tr.assign("s", [a, b])
    moved = tr.assign("s", [[205, 12, 50, 50], [12, 11, 50, 50]])  # order swapped, moved a bit
    assert moved[0] is first[1] and moved[1] is first[0]
    assert tr.assign("t", [a])[0] not in first  # another stream: its own tracks
    far = tr.assign("s", [[400, 300, 50, 50]])[0]
    assert far not in first  # far away: a new face
    assert tr.assign("s", [[401, 300, 50, 50]])[0] is far
    tr.assign("s", [])  # a faceless frame ends every track
    assert tr.assign("s", [[401, 300, 50, 50]])[0] is not far
