"""Hostile files in the inbox: each ends in failed/ with a clear reason (a mid-stream corrupt
packet: a finished output with the bad packet reported), and the daemon goes on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest

from tests.daemon.helpers import folder_io, make_clip, png_header_only, read_pts, wait_until

pytestmark = pytest.mark.slow

MAX_PIXELS = 1 << 20


def make_audio_only(path: Path) -> None:
    """An MP4 with one AAC audio stream and no video."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        s.layout = "mono"
        t = np.linspace(0, 1, 8000, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(
            (0.2 * np.sin(2 * np.pi * 440 * t))[None], format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts = 8000, 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_corrupt_clip(path: Path, frames: int = 12, bad: int = 5) -> None:
    """An H.264 clip whose packet number ``bad`` is replaced by garbage (same timestamps)."""
    rng = np.random.default_rng(bad)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.options = {"g": "4", "bf": "0"}
        packets = []
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")
            f.pts = i
            packets += list(s.encode(f))
        packets += list(s.encode())
        for j, p in enumerate(packets):
            if j == bad:
                q = av.Packet(bytes([0, 0, 0, 1, 0x65]) + rng.bytes(60))
                q.pts, q.dts, q.time_base, q.stream = p.pts, p.dts, p.time_base, p.stream
                p = q
            c.mux(p)


@pytest.fixture
def daemon(service, tmp_path):
    return service(folder_io(tmp_path), guard=True, max_frame_pixels=MAX_PIXELS)


def test_hostile_files_fail_clearly_and_the_daemon_goes_on(daemon, tmp_path):
    stage, inbox = tmp_path / "stage", tmp_path / "inbox"
    outbox, failed = tmp_path / "outbox", tmp_path / "failed"
    stage.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    make_clip(outside / "secret.mp4", frames=3, size=(32, 32))
    secret = (outside / "secret.mp4").read_bytes()

    make_clip(stage / "truncated.mp4", frames=12, size=(32, 32))
    data = (stage / "truncated.mp4").read_bytes()
    (stage / "truncated.mp4").write_bytes(data[: len(data) // 2])
    make_audio_only(stage / "no_video.mp4")
    (stage / "empty.mp4").write_bytes(b"")
    (stage / "text.jpg").write_text("this is not an image, it is a note\n" * 20)
    (stage / "huge.png").write_bytes(png_header_only(20000, 20000))
    sof = bytes.fromhex("ffd8ffc0001108") + (60000).to_bytes(2, "big") * 2 + bytes(10)
    (stage / "huge.jpg").write_bytes(sof)
    (stage / "bmp.png").write_bytes(b"BM" + bytes(200))
    (stage / "garbage.avi").write_bytes(np.random.default_rng(3).bytes(4096))
    os.symlink(outside / "secret.mp4", stage / "link.mp4")
    make_corrupt_clip(stage / "corrupt.mp4")
    expect_failed = {
        "truncated": "decode",
        "no_video": "no_video",
        "empty": "empty",
        "text": "decode",
        "huge": "too_large",
        "huge-1": "too_large",
        "bmp": "decode",
        "garbage": "decode",
        "link": "not_regular",
    }
    for p in sorted(stage.iterdir()):
        os.rename(p, inbox / p.name)
    (inbox / "folder.mp4").mkdir()  # a directory with a media name is not taken

    work = daemon.folder_sources[0].work
    ok = wait_until(
        lambda: (
            len(list(failed.glob("*.error.json"))) == len(expect_failed)
            and (outbox / "corrupt.summary.json").exists()
            and not list(work.iterdir())
            and len(list(inbox.iterdir())) == 1
        ),
        60,
    )
    assert ok, "\n".join(
        str(p)
        for d in (failed, outbox, inbox, daemon.folder_sources[0].work)
        if d.exists()
        for p in d.iterdir()
    )
    errors = {
        p.name[: -len(".error.json")]: json.loads(p.read_text())
        for p in failed.glob("*.error.json")
    }
    assert {k: v["reason"] for k, v in errors.items()} == expect_failed
    for err in errors.values():
        assert err["error"] and err["input"] and (failed / err["file"]).exists(), err
    assert "symbolic link" in errors["link"]["error"]
    assert "20000x20000" in errors["huge"]["error"] or "20000x20000" in errors["huge-1"]["error"]
    assert "no video stream" in errors["no_video"]["error"]
    # the link target outside the inbox was neither read into an output nor touched
    assert (outside / "secret.mp4").read_bytes() == secret
    assert (failed / "link.mp4").is_symlink()
    assert not (outbox / "link.mp4").exists() and not (outbox / "link.summary.json").exists()

    # the corrupt packet costs its frame, not the file; the summary says which packet
    s = json.loads((outbox / "corrupt.summary.json").read_text())
    assert s["frames"] == 11 and len(s["corrupt_packets"]) == 1, s
    assert "Invalid data" in s["corrupt_packets"][0]["error"]
    assert len(read_pts(outbox / "corrupt.mp4")[0]) == 11
    assert len((outbox / "corrupt.verdicts.jsonl").read_text().splitlines()) == 11

    # and the daemon goes on
    make_clip(stage / "good.mp4", frames=4, size=(32, 32))
    os.rename(stage / "good.mp4", inbox / "good.mp4")
    assert wait_until(lambda: (outbox / "good.summary.json").exists(), 30)
    assert json.loads((outbox / "good.summary.json").read_text())["frames"] == 4
    assert all(t.is_alive() for t in daemon._workers)
    m = daemon.metrics
    # good.summary.json (the commit) lands a moment before the claim is removed and counted
    wait_until(lambda: m.files.value(outcome="done") == 2, 10)
    assert m.bad_input.value(source="folder0", reason="decode") == 4
    assert m.bad_input.value(source="folder0", reason="empty") == 1
    assert m.bad_input.value(source="folder0", reason="corrupt_packet") == 1
    assert m.files.value(outcome="failed") == len(expect_failed)
    assert m.files.value(outcome="done") == 2
    assert sorted(p.name for p in inbox.iterdir()) == ["folder.mp4"]
    assert not list(outbox.glob(".*")) and not list(daemon.folder_sources[0].work.iterdir())
    print(
        f"\nhostile files: {len(expect_failed) + 1} corrupt files tried, "
        f"{len(expect_failed)} in failed/ with reasons, corrupt.mp4 guarded with 1 bad packet "
        "reported; a good clip afterwards guarded"
    )
