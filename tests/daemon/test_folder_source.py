"""The folder source with real watchdog events in a temporary folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.config import FolderSinkConfig, FolderSourceConfig
from daemon.sinks.folder import FolderSink
from daemon.sources.folder import FolderSource


@pytest.fixture
def make_source(tmp_path):
    made = []

    def make(polling: bool = False, stable_s: float = 0.3, start: bool = True) -> FolderSource:
        sink = FolderSink(FolderSinkConfig(path=str(tmp_path / "outbox")))
        sink.start()
        cfg = FolderSourceConfig(path=str(tmp_path / "inbox"), polling=polling, stable_s=stable_s)
        src = FolderSource(0, cfg, str(tmp_path / "state"), sink, rescan_s=0.5)
        if start:
            src.start()
        made.append(src)
        return src

    yield make
    for s in made:
        s.stop()


def _drain(src: FolderSource, timeout: float = 3.0) -> list[tuple[Path, str]]:
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = src.next_file(0.1)
        if job:
            got.append(job)
    return got


def test_close_after_write_is_claimed(make_source, tmp_path):
    src = make_source()
    (tmp_path / "inbox" / "a.mp4").write_bytes(b"x" * 100)
    job = src.next_file(3.0)
    assert job is not None
    claimed, original = job
    assert original == "a.mp4" and claimed.parent == src.work and claimed.read_bytes() == b"x" * 100
    assert not (tmp_path / "inbox" / "a.mp4").exists()


def test_moved_in(make_source, tmp_path):
    src = make_source()
    (tmp_path / "upload.part").write_bytes(b"y")
    os.rename(tmp_path / "upload.part", tmp_path / "inbox" / "b.png")
    job = src.next_file(3.0)
    assert job is not None and job[1] == "b.png"


def test_file_still_being_written_is_not_taken(make_source, tmp_path):
    src = make_source(stable_s=0.4)
    f = open(tmp_path / "inbox" / "slow.mkv", "wb")  # noqa: SIM115
    try:
        for _ in range(8):  # keeps growing for 1.6 s: neither close nor stable size
            f.write(b"z" * 10)
            f.flush()
            assert src.next_file(0.2) is None
    finally:
        f.close()
    job = src.next_file(3.0)
    assert job is not None and job[0].stat().st_size == 80


def test_hidden_unknown_and_duplicates(make_source, tmp_path):
    src = make_source()
    inbox = tmp_path / "inbox"
    (inbox / ".hidden.mp4").write_bytes(b"h")
    (inbox / "notes.txt").write_bytes(b"t")
    (inbox / "c.avi").write_bytes(b"c")
    src.offer(inbox / "c.avi")  # a duplicate event
    src.offer(inbox / "c.avi")
    got = _drain(src, 2.0)
    assert [o for _, o in got] == ["c.avi"]
    assert (inbox / ".hidden.mp4").exists() and (inbox / "notes.txt").exists()


def test_missed_events_found_by_rescan(make_source, tmp_path):
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "early.mp4").write_bytes(b"e")  # before the observer starts
    src = make_source()
    job = src.next_file(3.0)
    assert job is not None and job[1] == "early.mp4"


def test_polling_observer(make_source, tmp_path):
    src = make_source(polling=True, stable_s=0.3)
    (tmp_path / "inbox" / "p.webm").write_bytes(b"p" * 10)
    job = src.next_file(5.0)
    assert job is not None and job[1] == "p.webm"


def test_claimed_files_resume_after_restart(make_source, tmp_path):
    src = make_source()
    (tmp_path / "inbox" / "r.mp4").write_bytes(b"r")
    claimed, _ = src.next_file(3.0)
    src.stop()  # "crash" after the claim
    again = make_source()
    job = again.next_file(0.5)
    assert job == (claimed, claimed.name)


def test_name_clash_gets_a_new_name(make_source, tmp_path):
    src = make_source()
    (tmp_path / "outbox" / "d.summary.json").write_text("{}")  # an earlier d.mp4
    (tmp_path / "inbox" / "d.mp4").write_bytes(b"d")
    claimed, original = src.next_file(3.0)
    assert claimed.name == "d-1.mp4" and original == "d.mp4"


def test_fail_moves_input_with_reason(make_source, tmp_path):
    src = make_source()
    (tmp_path / "inbox" / "bad.mp4").write_bytes(b"bad")
    claimed, original = src.next_file(3.0)
    err = src.fail(claimed, original, "decode", "bad.mp4: invalid data")
    assert err == tmp_path / "failed" / "bad.error.json"
    assert (tmp_path / "failed" / "bad.mp4").read_bytes() == b"bad"
    assert '"reason": "decode"' in err.read_text()
    assert not claimed.exists()
