"""``python -m bench.video``: the REPORT's "Video" section from per-clip rows."""

from __future__ import annotations

from bench import video
from bench.report import put_section, section


def _row(clip, faces, fe, fk, a1, d1, f1, a2, d2, f2):
    return {"clip": clip, "clean": {"faces": faces, "flagged_edit": fe, "flagged_keep": fk},
            "attacks": [{"attacked": a1, "disrupting": d1, "flagged": f1, "seconds_per_face": 30},
                        {"attacked": a2, "disrupting": d2, "flagged": f2, "seconds_per_face": 9}],
            "fps": {"on": 1.5, "off": 6.25}}  # fmt: skip


def test_section_counts_per_clip_and_all(tmp_path):
    rows = [_row("a.mp4", 100, 1, 0, 3, 3, 3, 3, 1, 1), _row("b.mp4", 50, 0, 2, 2, 1, 0, 2, 0, 0)]
    text = video.section(rows, "python -m bench.video", "default")
    assert text.startswith("## Video\n")
    lines = text.splitlines()
    a = next(line for line in lines if line.startswith("| a.mp4"))
    assert "| 100 | 1/100 (1.0%) | 0/100 (0.0%) | 3/3 (100.0%) | 3/3 (100.0%) |" in a
    assert "| 1/3 (33.3%) | 1/1 (100.0%) | 1.50 / 6.25 |" in a
    b = next(line for line in lines if line.startswith("| b.mp4"))
    assert "| 0/2 (0.0%) | – |" in b  # nothing disrupted: no recall to give
    total = next(line for line in lines if line.startswith("| **all**"))
    assert "| 150 | 1/150 (0.7%) | 2/150 (1.3%) | 4/5 (80.0%) | 3/4 (75.0%) |" in total
    text = video.section(
        rows,
        "cmd",
        "default",
        {"own": {"faces": 200, "flagged": 1}, "Blond_Hair=1": {"faces": 200, "flagged": 0}},
    )
    assert "| edit | own | Blond_Hair=1 |" in text
    assert "| flagged | 1/200 (0.5%) | 0/200 (0.0%) |" in text
    # it replaces its own section of a report and leaves the others
    report = tmp_path / "REPORT.md"
    report.write_text("# R\n\n## Table 1\n\nx\n\n## Video\n\nold\n\n## Soak\n\ny\n")
    put_section(report, "## Video", text)
    got = report.read_text()
    assert "old" not in got and section(got, "## Soak") == "## Soak\n\ny\n"
    assert section(got, "## Video").startswith(text.rstrip("\n"))
