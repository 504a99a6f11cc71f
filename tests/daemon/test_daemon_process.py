"""The daemon as a subprocess: sd_notify, SIGKILL mid-file + restart, SIGTERM drain, SIGHUP."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.daemon.helpers import (
    make_clip,
    run_daemon,
    running_daemon,
    wait_until,
    write_config,
    zmq_source,
)

pytestmark = pytest.mark.slow


def _drop(tmp_path: Path, files: dict[str, int | None]) -> None:
    stage = tmp_path / "stage"
    stage.mkdir(exist_ok=True)
    for name, frames in files.items():
        if frames is None:
            (stage / name).write_bytes(b"\0\0\0\x18ftypmp42 truncated")
        else:
            make_clip(stage / name, frames=frames, seed=frames)
        (stage / name).rename(tmp_path / "inbox" / name)


def _accounted(tmp_path: Path) -> dict[str, list[str]]:
    return {
        "done": sorted(p.name for p in (tmp_path / "outbox").glob("*.summary.json")),
        "failed": sorted(p.name for p in (tmp_path / "failed").glob("*.error.json")),
    }


def test_sigkill_mid_file_then_restart(tmp_path, folder_cfg, notify):
    (tmp_path / "inbox").mkdir()
    with running_daemon(folder_cfg, tmp_path / "log1.jsonl", notify) as proc:
        notify.wait_for("READY=1")
        assert any("EXTEND_TIMEOUT_USEC" in m for m in notify.messages)
        _drop(tmp_path, {"long.mp4": 40, "broken.mp4": None, "short.mp4": 3})
        # kill while long.mp4 is half done: its outputs exist only under temporary names
        assert wait_until(
            lambda: (
                any((tmp_path / "outbox").glob(".long.verdicts.jsonl.part"))
                and (tmp_path / "outbox" / ".long.verdicts.jsonl.part").stat().st_size
            ),
            60,
        )
        proc.kill()
        proc.wait(10)
        assert not (tmp_path / "outbox" / "long.summary.json").exists()
        assert list((tmp_path / "state" / "claimed" / "0").iterdir())
    with running_daemon(folder_cfg, tmp_path / "log2.jsonl", notify) as proc:
        notify.wait_for("READY=1")
        assert wait_until(lambda: sum(map(len, _accounted(tmp_path).values())) == 3, 90)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(30) == 0
    acc = _accounted(tmp_path)
    assert acc == {
        "done": ["long.summary.json", "short.summary.json"],
        "failed": ["broken.error.json"],
    }
    assert list((tmp_path / "inbox").iterdir()) == []
    assert list((tmp_path / "state" / "claimed" / "0").iterdir()) == []
    assert not list((tmp_path / "outbox").glob(".*"))  # no half-written file anywhere
    verdicts = (tmp_path / "outbox" / "long.verdicts.jsonl").read_text().splitlines()
    assert [json.loads(v)["seq"] for v in verdicts] == list(range(40))
    err = json.loads((tmp_path / "failed" / "broken.error.json").read_text())
    assert err["input"] == "broken.mp4" and err["reason"] == "decode"
    logs = [
        json.loads(x) for n in (1, 2) for x in (tmp_path / f"log{n}.jsonl").read_text().splitlines()
    ]
    assert any(x["event"] == "resuming claimed files" for x in logs)
    assert any(x["event"] == "file failed" and x.get("file") == "broken.mp4" for x in logs)


def test_sigterm_drains_file_and_sighup_reloads(tmp_path, folder_cfg, notify):
    cfg = folder_cfg
    (tmp_path / "inbox").mkdir()
    with running_daemon(cfg, tmp_path / "log.jsonl", notify) as proc:
        notify.wait_for("READY=1")
        cfg.write_text(
            cfg.read_text()
            .replace('level = "info"', 'level = "debug"')
            .replace("batch_size = 4", "batch_size = 2")
            .replace("[guard]", "[guard]\nmax_faces = 3")
        )
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", 10)
        notify.wait_for("READY=1", 10)
        _drop(tmp_path, {"clip.mp4": 24})
        assert wait_until(lambda: (tmp_path / "outbox" / ".clip.verdicts.jsonl.part").exists(), 60)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 10)
        assert proc.wait(60) == 0
    assert _accounted(tmp_path) == {"done": ["clip.summary.json"], "failed": []}
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    reload = next(x for x in logs if x["event"] == "config reloaded")
    assert set(reload["applied"]) == {"logging.level", "guard.batch_size"}
    restart = next(x for x in logs if x["event"] == "changed keys need a restart to take effect")
    assert restart["keys"] == ["guard.max_faces"]
    assert any(x["level"] == "debug" for x in logs)  # the new level took effect
    assert logs[-1]["event"] == "stopped"


def test_bad_config_stops_start_up_with_key_path(tmp_path, tiny_models):
    cfg = write_config(tmp_path / "c.toml", tiny_models, zmq_source(5555, socket="pub"))
    r = run_daemon("run", "--config", str(cfg), timeout=60)
    assert r.returncode == 2
    assert "sources[0].socket: expected one of sub|pull|rep, got 'pub'" in r.stderr
