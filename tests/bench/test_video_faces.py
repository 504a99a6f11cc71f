"""``python -m bench.video_faces temporal``: the k-of-n trade, from per-face records."""

from __future__ import annotations

import json

from bench import video_faces
from magdr.profile import load_profile


def _records(path, clip, scores, box=(10, 10, 50, 50)):
    with open(path, "w") as f:
        for i, s in enumerate(scores):
            f.write(
                json.dumps(
                    {
                        "clip": clip,
                        "frame": i,
                        "box": list(box),
                        "align": True,
                        "psnr_keep": 20.0,
                        "score": s,
                    }
                )
                + "\n"
            )


def test_temporal_counts_clean_flags_and_frames_passed(tmp_path, capsys):
    t = float(load_profile("default").threshold)
    lo, hi = t / 2, t * 2
    _records(tmp_path / "clean.jsonl", "c.mp4", [lo, hi, lo, lo, lo, lo])  # one lone spike
    _records(tmp_path / "adv.jsonl", "a.mkv", [hi, hi, hi])
    video_faces.main(
        [
            "temporal",
            "--clean",
            str(tmp_path / "clean.jsonl"),
            "--attacked",
            str(tmp_path / "adv.jsonl"),
        ]
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.split("\n")}
    # every frame alone: the spike is a false alarm, an attack is caught at once
    assert "| 1 of 6 (16.67%) | 3 of 3 | 0.00 / 0 |" in rows["1/1"]
    # 2 of 3: no false alarm; an attack starting at frame 0 or 1 passes one frame, the
    # last frame's attack alone passes (it is the end of the clip)
    assert "| 0 of 6 (0.00%) | 3 of 3 | 1.00 / 1 |" in rows["2/3"]
