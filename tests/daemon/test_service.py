"""The service in-process: folder and ZeroMQ sources through the guard to both sinks."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import numpy as np
import pytest
import zmq

from daemon import wire
from daemon.notify import Notifier
from tests.daemon.helpers import (
    connect,
    folder_io,
    free_port,
    make_clip,
    read_pts,
    wait_until,
    zmq_sink,
    zmq_source,
)


def _sub(ctx: zmq.Context, port: int) -> zmq.Socket:
    return connect(ctx, zmq.SUB, port, SUBSCRIBE=b"", RCVTIMEO=10000)


def test_folder_to_outbox_and_pub(service, tmp_path):
    out_port = free_port()
    svc = service(
        folder_io(tmp_path)
        + zmq_sink(out_port, format="png")
        + """
[metrics]
enabled = true
port = 0
"""
    )
    ctx = zmq.Context()
    sub = _sub(ctx, out_port)
    time.sleep(0.3)  # PUB/SUB joins are asynchronous
    stage = tmp_path / "stage"
    stage.mkdir()
    pts = make_clip(stage / "clip.mp4", frames=5, rate=10, time_base=Fraction(1, 12800))
    (stage / "broken.mkv").write_bytes(b"\x1aE\xdf\xa3 not really matroska")
    import cv2

    cv2.imwrite(str(stage / "still.png"), np.full((20, 24, 3), 128, np.uint8))
    for p in stage.iterdir():
        p.rename(tmp_path / "inbox" / p.name)
    outbox, failed = tmp_path / "outbox", tmp_path / "failed"
    assert wait_until(
        lambda: (
            (outbox / "clip.summary.json").exists()
            and (outbox / "still.summary.json").exists()
            and (failed / "broken.error.json").exists()
        ),
        20,
    )
    # the cleaned video: same frame count and timestamps, verdicts one line per frame in order
    got, tb = read_pts(outbox / "clip.mp4")
    assert len(got) == 5
    np.testing.assert_allclose([float(p * tb) for p in got], [i / 10 for i in range(5)], atol=1e-3)
    lines = [json.loads(x) for x in (outbox / "clip.verdicts.jsonl").read_text().splitlines()]
    assert [v["seq"] for v in lines] == list(range(5))
    assert [v["pts"] for v in lines] == pts
    assert set(lines[0]) == {
        "v",
        "stream",
        "seq",
        "pts",
        "disrupted",
        "score",
        "s_dist",
        "s_cons",
        "threshold",
        "faces",
        "latency_ms",
        "model",
        "profile",
    }
    assert lines[0]["faces"][0]["box"] == [0, 0, 48, 32]
    summary = json.loads((outbox / "clip.summary.json").read_text())
    assert summary["frames"] == 5 and summary["input"] == "clip.mp4"
    assert (outbox / "still.png").exists()
    err = json.loads((failed / "broken.error.json").read_text())
    assert err["reason"] == "decode" and (failed / "broken.mkv").exists()
    assert not list(outbox.glob(".*.part")) and not list(svc.folder_sources[0].work.iterdir())
    assert svc.metrics.bad_input.value(source="folder0", reason="decode") == 1
    # the PUB sink saw verdicts and clean frames
    topics = set()
    while len(topics) < 2:
        msg = sub.recv_multipart()
        topics.add(msg[0].split(b".")[0])
        if msg[0].startswith(b"clean."):
            assert wire.decode_v1([b"frame." + msg[0][6:], *msg[1:]], 1 << 30).image.ndim == 3
    assert topics == {b"verdict", b"clean"}
    sub.close(0)
    ctx.term()
    import urllib.request

    # the deprecated [metrics] section still serves /metrics (now the [http] server)
    url = f"http://127.0.0.1:{svc.http_server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    assert 'magdr_frames_out_total{source="folder0"} 6.0' in text  # 5 video frames + 1 image
    assert 'magdr_bad_input_total{reason="decode",source="folder0"} 1.0' in text
    assert 'magdr_files_total{outcome="failed"} 1.0' in text
    assert "magdr_frame_latency_seconds_bucket" in text


def test_zmq_sources_sub_pull_rep(service, tmp_path):
    p_pub, p_pull, p_rep, p_out = (free_port() for _ in range(4))
    svc = service(
        zmq_source(p_pub, socket="sub")
        + zmq_source(p_pull, socket="pull", bind=True)
        + zmq_source(p_rep, socket="rep", bind=True, protocol="imagezmq", stream="pi")
        + zmq_sink(p_out, frames=False),
        guard=True,
    )
    ctx = zmq.Context()
    sub = _sub(ctx, p_out)
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{p_pub}")
    push = connect(ctx, zmq.PUSH, p_pull)
    req = connect(ctx, zmq.REQ, p_rep, RCVTIMEO=10000)
    time.sleep(0.5)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for i in range(3):
        pub.send_multipart(
            wire.encode_frame("cam", i, img, "jpeg", pts=i * 100, time_base=(1, 1000))
        )
        push.send_multipart(wire.encode_frame("line", i, img, "rgb24", cond={"Black_Hair": 1}))
        # imagezmq's ImageSender.send_image, written out with plain pyzmq
        req.send_json(dict(msg="pi-1", dtype=str(img.dtype), shape=img.shape), zmq.SNDMORE)
        req.send(img)
        assert req.recv() == b"OK"
    # malformed input on every kind of socket: counted, never fatal
    push.send_multipart([b"frame.line", b"{not json", b""])
    pub.send_multipart([b"frame.cam", json.dumps({"v": 9}).encode(), b""])
    req.send_json(dict(msg="pi-1", dtype="uint8", shape=[32, 32, 3]), zmq.SNDMORE)
    req.send(b"short")
    assert req.recv().startswith(b"ERROR bad_payload")
    seen: dict[str, list[int]] = {}
    while sum(map(len, seen.values())) < 9:
        topic, body = sub.recv_multipart()
        v = json.loads(body)
        assert topic == b"verdict." + v["stream"].encode()
        seen.setdefault(v["stream"], []).append(v["seq"])
        assert v["profile"] == "test-detect-only" and v["score"] is not None
        assert v["disrupted"] is False and len(v["faces"]) == 1
    assert seen == {"cam": [0, 1, 2], "line": [0, 1, 2], "pi": [1, 2, 3]}
    assert wait_until(lambda: svc.metrics.bad_input.total() == 3, 5)
    m = svc.metrics
    assert m.bad_input.value(source="zmq1", reason="bad_json") == 1
    assert m.bad_input.value(source="zmq0", reason="bad_version") == 1
    assert m.bad_input.value(source="zmq2", reason="bad_payload") == 1
    assert m.frames_out.value(source="zmq0") == 3
    # an unknown attribute in a header's cond is a bad message, not a crash
    push.send_multipart(wire.encode_frame("line", 9, img, "rgb24", cond={"Purple_Hair": 1}))
    assert wait_until(lambda: m.bad_input.value(source="zmq1", reason="bad_condition") == 1, 5)
    for s in (sub, pub, push, req):
        s.close(0)
    ctx.term()


def test_drop_oldest_counts_drops(tmp_path, tiny_models):
    """A full queue under drop-oldest keeps the newest frames and counts the rest."""
    from daemon.config import ZmqSourceConfig
    from daemon.metrics import Metrics
    from daemon.sources.zmq import ZmqSource

    cfg = ZmqSourceConfig(endpoint="tcp://127.0.0.1:1", queue_size=2)
    m = Metrics()
    src = ZmqSource(
        0,
        cfg,
        zmq.Context.instance(),
        None,
        lambda g: None,
        m,  # type: ignore
        Notifier(env={}),
        1 << 20,
    )
    img = np.zeros((4, 4, 3), np.uint8)
    for i in range(5):
        assert src._handle(wire.encode_frame("s", i, img, "rgb24")) == b"OK"
    assert [src.q.get_nowait()[0].seq for _ in range(2)] == [3, 4]
    assert m.frames_dropped.value(source="zmq0", reason="queue_full") == 3
    assert m.frames_in.value(source="zmq0") == 5
    # huge frames are refused by their declared size, before any allocation
    big = {"v": 1, "stream": "s", "seq": 9, "format": "rgb24", "width": 5000, "height": 5000}
    assert src._handle([b"frame.s", json.dumps(big).encode(), b""]).startswith(b"ERROR too_large")
    assert m.bad_input.value(source="zmq0", reason="too_large") == 1


def test_curve_encrypted_pull(service, tmp_path):
    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    port, out = free_port(), free_port()
    import os

    os.environ["MAGDR_TEST_CURVE"] = server_sec.decode()
    try:
        svc = service(
            zmq_source(port, socket="pull", bind=True, curve_secret_key="env:MAGDR_TEST_CURVE")
            + zmq_sink(out, frames=False)
        )
    finally:
        del os.environ["MAGDR_TEST_CURVE"]
    ctx = zmq.Context()
    sub = _sub(ctx, out)
    push = connect(
        ctx,
        zmq.PUSH,
        port,
        CURVE_SECRETKEY=client_sec,
        CURVE_PUBLICKEY=client_pub,
        CURVE_SERVERKEY=server_pub,
    )
    time.sleep(0.3)
    push.send_multipart(wire.encode_frame("sec", 0, np.zeros((8, 8, 3), np.uint8), "rgb24"))
    assert json.loads(sub.recv_multipart()[1])["stream"] == "sec"
    assert svc.metrics.frames_out.value(source="zmq0") == 1
    for s in (sub, push):
        s.close(0)
    ctx.term()


@pytest.mark.parametrize("guard", [False, True])
def test_what_is_pasted_back(service, guard):
    """``[guard] edit_lowpass``: x + the low-passed edit; 0: G's own pixels; x* when asked."""
    import torch

    from magdr.transforms import lowpass_edit

    svc = service(zmq_source(free_port(), socket="pull", bind=True), guard=guard)
    engine = svc.engine
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = engine.default_cond.expand(2, -1)
    y = engine.G(x, c)  # the tiny test profile flags none of these: y* = G(x)
    engine.cfg.guard.edit_lowpass = 0.0
    torch.testing.assert_close(engine.guard_faces(x, c)[0], y)
    engine.cfg.guard.edit_lowpass = 1.5
    torch.testing.assert_close(engine.guard_faces(x, c)[0], lowpass_edit(y, x, 1.5))
    engine.cfg.guard.publish_purified = True
    torch.testing.assert_close(engine.guard_faces(x, c)[0], x)


def test_bfloat16_precision_hands_back_float32_faces_close_to_float32s(service):
    """``[model] precision = "bfloat16"``: G and the parser run under autocast inside the guard
    (emulated where the CPU has no BF16), hand back float32, and stay near the float32 faces;
    outside the guard G runs in float32 as before."""
    import torch

    svc = service(zmq_source(free_port(), socket="pull", bind=True), guard=True,
                  precision="bfloat16")  # fmt: skip
    engine = svc.engine
    engine.cfg.guard.edit_lowpass = 0.0  # G's own pixels
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = engine.default_cond.expand(2, -1)
    with torch.no_grad():
        y = engine.G(x, c)
    assert y.dtype == torch.float32
    out = engine.guard_faces(x, c)[0]
    assert out.dtype == torch.float32
    assert not torch.equal(out, y)  # bfloat16 arithmetic ran
    torch.testing.assert_close(out, y, atol=0.05, rtol=0)


def test_reload_applies_the_paste_back_keys_live(service, tmp_path):
    """SIGHUP's reload sets every ``PASTE_KEYS`` entry on the running engine, and names them
    applied (not "needs a restart"); the Ray replicas are sent the same keys per batch."""
    from daemon.config import PASTE_KEYS
    from daemon.service import LIVE_KEYS

    svc = service(zmq_source(free_port(), socket="pull", bind=True))
    assert PASTE_KEYS == ("publish_purified", "edit_lowpass")
    assert {f"guard.{k}" for k in PASTE_KEYS} <= LIVE_KEYS
    guard = svc.engine.cfg.guard
    assert (guard.publish_purified, guard.edit_lowpass) == (False, 1.5)  # the defaults
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        cfg.read_text().replace(
            "[guard]\n", "[guard]\npublish_purified = true\nedit_lowpass = 0.5\n"
        )
    )
    svc.reload()
    assert (guard.publish_purified, guard.edit_lowpass) == (True, 0.5)


def test_disrupted_faces_are_reconstructed(service, tmp_path):
    """The guard's disrupted path end to end: verdict, chain, and x* pasted when asked."""
    port, out = free_port(), free_port()
    svc = service(
        zmq_source(port, socket="pull", bind=True) + zmq_sink(out, format="rgb24"),
        guard=True,
        profile="flag_all",
    )
    svc.engine.cfg.guard.publish_purified = True
    ctx = zmq.Context()
    sub = _sub(ctx, out)
    push = connect(ctx, zmq.PUSH, port)
    time.sleep(0.3)
    img = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    push.send_multipart(wire.encode_frame("adv", 0, img, "rgb24"))
    got = {}
    while len(got) < 2:
        msg = sub.recv_multipart()
        got[msg[0]] = msg
    v = json.loads(got[b"verdict.adv"][1])
    assert v["disrupted"] is True and v["faces"][0]["disrupted"] is True
    assert v["profile"] == "test-flag-all" and v["threshold"] == -1e6
    assert isinstance(v["faces"][0]["chain"], list)
    clean = wire.decode_v1([b"frame.adv", *got[b"clean.adv"][1:]], 1 << 20).image
    assert clean.shape == img.shape
    assert svc.metrics.disrupted.total() == 1
    for s in (sub, push):
        s.close(0)
    ctx.term()


def test_release_free_memory_gives_freed_heap_pages_back():
    """Freed C-heap memory below a live block stays resident until it is trimmed."""
    import ctypes
    import os

    from bench.soak import rss_mib
    from daemon.service import release_free_memory

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunk = 64 << 10  # under glibc's mmap threshold: from the heap
    blocks = [libc.malloc(chunk) for _ in range(3200)]  # 200 MiB
    for b in blocks:
        ctypes.memset(b, 1, chunk)
    pin = libc.malloc(chunk)  # keeps the heap's top above the freed blocks
    for b in blocks:
        libc.free(b)
    before = rss_mib(os.getpid())
    assert release_free_memory()
    after = rss_mib(os.getpid())
    libc.free(pin)
    assert before - after > 150, (before, after)
