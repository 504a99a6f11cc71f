"""Crash safety: the daemon killed (SIGKILL) at seeded random points over a folder of 20
inputs, restarted each time, loses nothing and duplicates nothing: every input ends in the
outbox exactly once or in failed/ with its reason, and no final name ever shows a half-written
file (outputs are written under a temporary name, fsynced, renamed; the summary last)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from tests.daemon.helpers import make_clip, running_service, start_daemon, stop_process, wait_until

pytestmark = pytest.mark.slow

SEED = 20240611
KILLS = 9


def make_inputs(stage: Path, rng: np.random.Generator) -> tuple[dict[str, int], set[str]]:
    """20 small inputs: clips of 6-20 frames, stills, and two broken files.

    Returns:
        ``({good input name: frames}, {broken input names})``.
    """
    good: dict[str, int] = {}
    for i in range(15):
        n = int(rng.integers(6, 21))
        make_clip(stage / f"clip{i:02d}.mp4", frames=n, size=(32, 32), seed=i)
        good[f"clip{i:02d}.mp4"] = n
    for i in range(3):
        img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        name = f"still{i}.{'png' if i % 2 else 'jpg'}"
        cv2.imwrite(str(stage / name), img)
        good[name] = 1
    data = (stage / "clip00.mp4").read_bytes()
    (stage / "broken.mp4").write_bytes(data[: len(data) // 3])
    (stage / "note.jpg").write_text("not an image")
    return good, {"broken.mp4", "note.jpg"}


class FinalNameWatcher:
    """Polls the outbox and failed/ and checks every file under a final name the first time it
    is seen (and again when replaced): it must be complete, never half-written."""

    def __init__(self, outbox: Path, failed: Path, frames: dict[str, int]) -> None:
        self.outbox, self.failed = outbox, failed
        self.frames = {Path(k).stem: v for k, v in frames.items()}
        self.seen: dict[Path, tuple[int, int]] = {}
        self.bad: list[str] = []
        self.checked = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:  # noqa: D102
        self._t.start()

    def stop(self) -> None:  # noqa: D102
        self._stop.set()
        self._t.join(10)
        self.scan()  # the final state too

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.scan()

    def scan(self) -> None:  # noqa: D102
        for d in (self.outbox, self.failed):
            try:
                names = list(d.iterdir())
            except FileNotFoundError:
                continue
            for p in names:
                if p.name.startswith("."):
                    continue
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                key = (st.st_ino, st.st_size)
                if self.seen.get(p) == key:
                    continue
                self.seen[p] = key
                err = self.check(p)
                self.checked += 1
                if err:
                    self.bad.append(f"{p.name}: {err}")

    def check(self, p: Path) -> str | None:
        """None when ``p`` is a complete output, else what is wrong."""
        name = p.name
        try:
            if name.endswith(".summary.json") or name.endswith(".error.json"):
                d = json.loads(p.read_bytes())
                if name.endswith(".error.json"):
                    return None if d.get("reason") and d.get("error") else "no reason"
                stem = name[: -len(".summary.json")]
                return None if d["frames"] == self.frames[stem] else f"frames {d['frames']}"
            if p.parent == self.failed:
                return None
            if name.endswith(".verdicts.jsonl"):
                text = p.read_text()
                lines = text.splitlines()
                stem = name[: -len(".verdicts.jsonl")]
                if not text.endswith("\n") or len(lines) != self.frames[stem]:
                    return f"{len(lines)} lines"
                seqs = [json.loads(x)["seq"] for x in lines]
                return None if seqs == list(range(len(lines))) else f"seqs {seqs}"
            if name.endswith(".mp4"):
                with av.open(str(p)) as c:
                    n = sum(1 for _ in c.decode(video=0))
                return None if n == self.frames[p.stem] else f"{n} frames decoded"
            if name.endswith((".png", ".jpg")):
                img = cv2.imread(str(p))
                return None if img is not None and img.shape == (32, 32, 3) else "unreadable"
            return "unexpected file"
        except FileNotFoundError:
            return None  # replaced while being read: the new one is checked next
        except Exception as e:
            return f"{type(e).__name__}: {e}"


def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path, folder_cfg, notify):
    rng = np.random.default_rng(SEED)
    inbox, outbox, failed = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "failed"
    claimed = tmp_path / "state" / "claimed" / "0"
    stage = tmp_path / "stage"
    inbox.mkdir()
    stage.mkdir()
    good, broken = make_inputs(stage, rng)
    for p in sorted(stage.iterdir()):
        os.rename(p, inbox / p.name)
    watcher = FinalNameWatcher(outbox, failed, good)
    watcher.start()
    kills = []
    proc: subprocess.Popen | None = None

    def all_accounted() -> bool:
        done = {p.name for p in outbox.glob("*.summary.json")}
        errs = {p.name for p in failed.glob("*.error.json")}
        return (
            len(done) + len(errs) >= len(good) + len(broken)
            and not list(inbox.iterdir())
            and not list(claimed.iterdir())
        )

    try:
        for k in range(KILLS + 1):
            proc = start_daemon(folder_cfg, tmp_path / f"log{k}.jsonl", notify)
            t_spawn = time.monotonic()
            if k == KILLS:
                break  # the last run goes to the end
            if rng.random() < 0.2:  # some kills land during start-up
                time.sleep(float(rng.uniform(0.5, 2.5)))
                kills.append(("start-up", round(time.monotonic() - t_spawn, 2)))
            else:
                notify.wait_for("READY=1", 60)
                time.sleep(float(rng.uniform(0.05, 1.6)))
                kills.append(("running", round(time.monotonic() - t_spawn, 2)))
            proc.kill()
            proc.wait(10)
        notify.wait_for("READY=1", 60)
        wait_until(all_accounted, 120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc is not None:
            stop_process(proc)
        watcher.stop()

    assert watcher.bad == [], watcher.bad  # never a half-written file under a final name
    summaries = {
        p.name[: -len(".summary.json")]: json.loads(p.read_text())
        for p in outbox.glob("*.summary.json")
    }
    errors = {
        p.name[: -len(".error.json")]: json.loads(p.read_text())
        for p in failed.glob("*.error.json")
    }
    # exactly once: one summary per good input (no NAME-1 duplicates), one error per broken one
    assert sorted(s["input"] for s in summaries.values()) == sorted(good)
    assert set(summaries) == {Path(n).stem for n in good}
    assert sorted(e["input"] for e in errors.values()) == sorted(broken)
    assert all(e["reason"] == "decode" for e in errors.values())
    for name, n in good.items():
        stem = Path(name).stem
        assert summaries[stem]["frames"] == n
        assert (outbox / name).exists() and (outbox / f"{stem}.verdicts.jsonl").exists()
    assert sorted(p.name for p in failed.iterdir() if not p.name.endswith(".error.json")) == sorted(
        broken
    )
    # nothing left behind: inbox, claims and temporary files are all gone
    assert list(inbox.iterdir()) == [] and list(claimed.iterdir()) == []
    assert not [p for d in (outbox, failed, claimed) for p in d.iterdir() if p.name.startswith(".")]
    expected = {
        f"{Path(n).stem}{s}"
        for n in good
        for s in (Path(n).suffix, ".verdicts.jsonl", ".summary.json")
    }
    assert {p.name for p in outbox.iterdir()} == expected
    resumed = sum(
        '"resuming claimed files"' in (tmp_path / f"log{k}.jsonl").read_text()
        for k in range(KILLS + 1)
    )
    print(
        f"\ncrash safety: {len(good) + len(broken)} inputs, {KILLS} SIGKILLs at {kills}, "
        f"{resumed} restarts resumed a claimed file; all {len(good)} good inputs in the outbox "
        f"exactly once, {len(broken)} broken in failed/; {watcher.checked} final-name checks, "
        "0 half-written"
    )


def test_fail_killed_between_record_and_move_is_not_duplicated(tmp_path, folder_cfg):
    """A kill after NAME.error.json is written but before the input moves to failed/: the
    restart fails the input again under the same record, not a second ``NAME-1``."""
    work = tmp_path / "state" / "claimed" / "0"
    work.mkdir(parents=True)
    (tmp_path / "failed").mkdir()
    (work / "bad.mp4").write_bytes(b"\0\0\0\x18ftypmp42 truncated")
    (tmp_path / "failed" / "bad.error.json").write_text(
        json.dumps(
            {
                "v": 1,
                "input": "bad.mp4",
                "file": "bad.mp4",
                "claimed": "bad.mp4",
                "reason": "decode",
                "error": "from the killed run",
            }
        )
    )
    with running_service(folder_cfg):
        wait_until(lambda: not list(work.iterdir()), 30)  # the restart has dealt with the claim
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == ["bad.error.json", "bad.mp4"]
    assert json.loads((tmp_path / "failed" / "bad.error.json").read_text())["reason"] == "decode"


def test_killed_after_commit_before_cleanup_is_not_redone(tmp_path, folder_cfg):
    """A kill after NAME.summary.json (the commit marker) but before the claimed input is
    removed: the restart sees the committed outputs and only finishes the claim."""
    work = tmp_path / "state" / "claimed" / "0"
    work.mkdir(parents=True)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    make_clip(work / "c.mp4", frames=3, size=(32, 32))
    st = (work / "c.mp4").stat()
    summary = {
        "input": "c.mp4",
        "frames": 3,
        "marker": "first run",
        "source": {"name": "c.mp4", "size": st.st_size, "mtime_ns": st.st_mtime_ns},
    }
    (outbox / "c.summary.json").write_text(json.dumps(summary))
    with running_service(folder_cfg):
        wait_until(lambda: not list(work.iterdir()), 30)  # the restart has dealt with the claim
    assert list(work.iterdir()) == []
    assert json.loads((outbox / "c.summary.json").read_text())["marker"] == "first run"
    assert sorted(p.name for p in outbox.iterdir()) == ["c.summary.json"]
