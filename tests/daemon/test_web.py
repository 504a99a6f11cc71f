"""The ``[http]`` server in-process: the JSON API over a real ZeroMQ stream, flagged faces, the
token, hostile stream ids, which files it serves, and the bounds on its state."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import quote

import cv2
import numpy as np
import structlog
import zmq

from daemon import wire
from daemon.pipeline import Guarded
from daemon.web import state as S
from daemon.web.state import OperatorView
from tests.daemon.helpers import connect, folder_io, free_port, make_clip, wait_until, zmq_source

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">/../../etc'


def http_section(**keys: object) -> str:
    """Config body: ``[http]`` on a free port with ``keys``."""
    lines = ["enabled = true", "port = 0"] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n[http]\n" + "\n".join(lines) + "\n"


def get(port: int, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """``GET path`` on the daemon's server: status, headers, body (errors included)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(port: int, path: str, token: str | None = None) -> object:
    status, _, body = get(port, path, token)
    assert status == 200, (path, status, body[:200])
    return json.loads(body)


def send(push: zmq.Socket, stream: str, frames: int, side: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(frames):
        img = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        push.send_multipart(wire.encode_frame(stream, i, img, "rgb24"))


def test_api_over_a_zmq_stream(service):
    port = free_port()
    svc = service(
        zmq_source(port, socket="pull", bind=True) + http_section(), guard=True, profile="flag_all"
    )
    web = svc.http_server.port
    ctx = zmq.Context()
    push = connect(ctx, zmq.PUSH, port)
    try:
        send(push, "cam", 4)
        send(push, HOSTILE, 1, seed=1)
        assert wait_until(lambda: sum(s["frames"] for s in get_json(web, "/api/streams")) == 5, 30)
    finally:
        push.close(0)
        ctx.term()
    rows = {s["id"]: s for s in get_json(web, "/api/streams")}
    cam = rows["cam"]
    assert {"id", "source", "frames", "faces", "flagged", "dropped", "fps", "last_verdict"} <= set(
        cam
    )
    assert (
        cam["source"],
        cam["frames"],
        cam["frames_in"],
        cam["faces"],
        cam["flagged"],
        cam["dropped"],
    ) == ("zmq0", 4, 4, 4, 4, 0)  # the flag-all profile flags every face
    assert cam["last_verdict"]["seq"] == 3 and cam["last_verdict"]["disrupted"] is True
    one = get_json(web, "/api/streams/cam")
    assert [v["seq"] for v in one["verdicts"]] == [0, 1, 2, 3]
    assert one["frame_size"] == [32, 32] and one["frame_seq"] == 3
    flagged = one["flagged_faces"]
    assert [f["seq"] for f in flagged] == [0, 1, 2, 3] and "pictures" not in flagged[0]
    assert isinstance(flagged[0]["chain"], list) and isinstance(flagged[0]["regions"], list)
    assert flagged[0]["threshold"] == -1e6
    # the latest cleaned frame and a flagged face's side by side, as JPEG
    status, headers, body = get(web, "/api/streams/cam/frame.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (32, 32, 3)
    n = flagged[-1]["n"]
    pictures = {}
    for kind in S.DETAIL_IMAGES:
        status, _, body = get(web, f"/api/streams/cam/flagged/{n}/{kind}.jpg")
        assert status == 200, kind
        pictures[kind] = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert pictures[kind].shape == (32, 32, 3), kind  # G's crop side
    assert not np.array_equal(pictures["input"], pictures["output_before"])
    # a hostile id is only a key: percent-encoded, it finds its stream and nothing else
    assert get_json(web, "/api/streams/" + quote(HOSTILE, safe=""))["id"] == HOSTILE
    for path in (
        "/api/streams/nope",
        "/api/streams/cam/flagged/999/input.jpg",
        "/api/streams/cam/flagged/0/../../x.jpg",
        "/api/streams/cam/flagged/0/x.jpg",
        "/api/nope",
        "/static/../config.py",
        "/etc/passwd",
    ):
        assert get(web, path)[0] == 404, path
    # the page and /metrics from the same server
    status, headers, page = get(web, "/")
    assert status == 200 and b"<title>magdr-guard</title>" in page
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'self' only
    text = get(web, "/metrics")[2].decode()
    assert 'magdr_frames_in_total{source="zmq0"} 5.0' in text
    assert "process_resident_memory_bytes" in text


def test_events_stream(service):
    svc = service(http_section())
    web = svc.http_server.port
    svc.view.frame_in("cam", "zmq0")
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/events", timeout=10) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = json.loads(r.readline().decode().removeprefix("data: "))
        assert [s["id"] for s in first["streams"]] == ["cam"] and first["jobs"] == []
        assert r.readline() == b"\n"
        svc.view.frame_in("cam", "zmq0")
        second = json.loads(r.readline().decode().removeprefix("data: "))
        assert second["streams"][0]["frames_in"] == 2


def test_token(service, monkeypatch):
    monkeypatch.setenv("MAGDR_TEST_HTTP_TOKEN", "s3cret")
    svc = service(http_section(token="env:MAGDR_TEST_HTTP_TOKEN"))
    web = svc.http_server.port
    for path in ("/", "/api/streams", "/api/events", "/metrics", "/nope"):
        for token in (None, "wrong", "s3cre"):
            status, headers, _ = get(web, path, token)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
    assert get(web, "/api/streams", "s3cret")[0] == 200
    assert get(web, "/", "s3cret")[0] == 200


def test_jobs_serve_only_the_outbox(service, tmp_path):
    svc = service(folder_io(tmp_path) + http_section(), guard=True)
    web = svc.http_server.port
    stage = tmp_path / "stage"
    stage.mkdir()
    make_clip(stage / "clip.mp4", frames=3)
    (stage / "broken.mkv").write_bytes(b"\x1aE\xdf\xa3 not really matroska")
    for name in ("clip.mp4", "broken.mkv"):
        (stage / name).rename(tmp_path / "inbox" / name)
    assert wait_until(
        lambda: {j["state"] for j in get_json(web, "/api/jobs")} == {"done", "failed"}, 30
    )
    jobs = {j["input"]: j for j in get_json(web, "/api/jobs")}
    done, failed = jobs["clip.mp4"], jobs["broken.mkv"]
    assert done["frames"] == 3 and done["summary"]["frames"] == 3
    assert failed["error"].startswith("decode:") and failed["summary"] is None
    outbox = tmp_path / "outbox"
    for key, file in done["summary"]["outputs"].items():
        status, _, body = get(web, f"/api/jobs/{done['name']}/{key}")
        assert status == 200 and body == (outbox / file).read_bytes(), key
    for path in (
        "/api/jobs/clip/source",
        "/api/jobs/broken/media",
        "/api/jobs/nope/media",
        "/api/jobs/clip/..%2F..%2Fc.toml",
        "/api/jobs/clip/media/x",
    ):
        assert get(web, path)[0] == 404, path
    # an output replaced by a link out of the outbox is not followed
    (outbox / "clip.mp4").unlink()
    (outbox / "clip.mp4").symlink_to(tmp_path / "c.toml")
    assert get(web, f"/api/jobs/{done['name']}/media")[0] == 404


def test_deprecated_metrics_section(service):
    with structlog.testing.capture_logs() as logs:
        svc = service("\n[metrics]\nenabled = true\nport = 0\n")
    assert get(svc.http_server.port, "/api/streams")[0] == 200
    assert any(x["event"] == "deprecated config" and "[metrics]" in x["detail"] for x in logs)


def _guarded(stream: str, seq: int, side: int = 2000) -> Guarded:
    v = {
        "stream": stream,
        "seq": seq,
        "disrupted": False,
        "score": 0.1,
        "threshold": 0.5,
        "faces": [{"box": [0, 0, 8, 8], "disrupted": False, "score": 0.1, "chain": []}],
    }
    return Guarded(np.zeros((side // 2, side, 3), np.uint8), v, source="zmq0")


def test_state_is_bounded(monkeypatch):
    monkeypatch.setattr(S, "MAX_STREAMS", 5)
    view = OperatorView()
    for i in range(12):
        for seq in range(S.VERDICTS + 3):
            view.guarded(_guarded(f"s{i}", seq, side=2000 if seq == 0 else 64))
    assert [s["id"] for s in view.streams()] == [f"s{i}" for i in range(11, 6, -1)]
    assert view.evicted == 7
    one = view.stream("s11")
    assert len(one["verdicts"]) == S.VERDICTS and one["verdicts"][-1]["seq"] == S.VERDICTS + 2
    view.guarded(_guarded("big", 0, side=4000))
    assert max(view._streams["big"].image.shape) == S.FRAME_SIDE  # kept downscaled
    assert view.stream("big")["frame_size"] == [4000, 2000]  # the boxes' coordinates
    for i in range(S.MAX_JOBS + 10):
        view.job_started(f"f{i}", "folder0", f"f{i}.mp4")
    assert len(view.jobs()) == S.MAX_JOBS and view.jobs()[0]["name"] == f"f{S.MAX_JOBS + 9}"


def test_wait_changed_wakes_on_an_update():
    view = OperatorView()
    assert view.wait_changed(view.version, 0.05) == 0
    view.dropped("cam", "zmq0")
    assert view.wait_changed(0, 5) == 1 and view.streams()[0]["dropped"] == 1


def test_job_output_needs_an_outbox():
    view = OperatorView(None)
    view.job_started("x", "folder0", "x.mp4")
    view.job_finished("x", "done", {"outputs": {"media": "passwd"}})
    assert view.job_output("x", "media") is None


def test_rate_over_the_window():
    r = S.Rate(window_s=5.0)
    assert r.per_s(100.0) == 0.0
    for t in (100.0, 100.01, 100.02):  # a batch's burst at the start
        r.tick(t)
    assert r.per_s(101.0) == 3.0  # one second of life so far
    for i in range(10):
        r.tick(101.0 + 0.5 * i)
    assert r.per_s(106.0) == 2.0  # 10 frames in the last 5 s
    assert r.per_s(200.0) == 0.0
