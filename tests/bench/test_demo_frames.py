"""bench.demo_frames: the contact sheet of a finished demo directory (real PyAV files)."""

from __future__ import annotations

import json

import cv2

from bench.demo_frames import COLUMNS, attacked_frames, render
from tests.daemon.helpers import make_clip


def test_sheet_of_a_demo_directory(tmp_path):
    demo = tmp_path / "demo"
    (demo / "outbox").mkdir(parents=True)
    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames=6, size=(64, 48))
    make_clip(demo / "outbox" / "clip.mp4", frames=6, size=(64, 48), seed=1)
    make_clip(demo / "outbox" / "clip.adv.mkv", frames=6, size=(64, 48), seed=2)
    (demo / "clip.adv.mkv.report.jsonl").write_text(
        "".join(json.dumps({"frame": i, "faces": 0}) + "\n" for i in (0, 4))
    )
    assert attacked_frames(demo) == [0, 4]
    out = render(demo, clip, tmp_path / "sheet.png")
    img = cv2.imread(str(out))
    # two rows of 256 px under a title strip, four frames of 64×48 scaled to 256 px high each
    assert img.shape[0] == 28 + 2 * 256 and img.shape[1] == len(COLUMNS) * round(64 * 256 / 48)


def test_notes_are_written_under_their_cells():
    import numpy as np

    from bench.demo_frames import sheet

    frames = [[np.full((48, 64, 3), 40, np.uint8)] * 2]
    plain = sheet(frames)
    noted = sheet(frames, notes=[["", "seam 0.000, detail 100%"]])
    w = round(64 * 256 / 48)
    assert np.array_equal(plain[:, :w], noted[:, :w])  # no note: the cell is untouched
    assert (noted[-22:, w:] == 255).mean() > 0.5 and not np.array_equal(plain, noted)
