"""Security: CurveZMQ on every socket kind (clients without the right key are refused), message
and frame size limits, checkpoints from the config loaded without pickle execution, the systemd
unit's exposure score, and no path from a message header or a file name out of the configured
folders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import cv2
import numpy as np
import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from daemon import wire
from tests.daemon.helpers import (
    ROOT,
    connect,
    folder_io,
    free_port,
    make_clip,
    run_daemon,
    wait_until,
    write_config,
    zmq_sink,
    zmq_source,
)

pytestmark = pytest.mark.slow


class Handshakes:
    """Counts a socket's CurveZMQ handshake outcomes (ZeroMQ's socket monitor)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.mon = sock.get_monitor_socket()
        self.ok = self.failed = 0

    def poll(self, seconds: float) -> None:  # noqa: D102
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.mon.poll(50):
                continue
            ev = recv_monitor_message(self.mon)["event"]
            if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.ok += 1
            elif ev in (
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_DISCONNECTED,
            ):
                self.failed += 1


def _client(ctx: zmq.Context, kind: int, endpoint: str, server_pub: bytes | None) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if server_pub is not None:
        pub, sec = zmq.curve_keypair()
        s.curve_secretkey, s.curve_publickey, s.curve_serverkey = sec, pub, server_pub
    s.connect(endpoint)
    return s


def test_curve_on_every_socket_refuses_clients_without_the_key(service):
    """Bound PULL source and PUB sink are CURVE servers; a SUB source connects as a client."""
    src_pub, src_sec = zmq.curve_keypair()
    sink_pub, sink_sec = zmq.curve_keypair()
    cam_pub, cam_sec = zmq.curve_keypair()  # a camera publishing, the daemon subscribing
    p_in, p_out, p_cam = free_port(), free_port(), free_port()
    svc = service(
        zmq_source(
            p_in,
            socket="pull",
            bind=True,
            max_message_bytes=100000,
            curve_secret_key=src_sec.decode(),
        )
        + zmq_source(
            p_cam,
            socket="sub",
            curve_secret_key=zmq.curve_keypair()[1].decode(),
            curve_server_key=cam_pub.decode(),
        )
        + zmq_sink(p_out, frames=False, curve_secret_key=sink_sec.decode())
    )
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        ep_in, ep_out = f"tcp://127.0.0.1:{p_in}", f"tcp://127.0.0.1:{p_out}"
        # subscribers of the sink: plaintext, wrong server key, right key
        subs = {
            name: _client(ctx, zmq.SUB, ep_out, key)
            for name, key in [
                ("plain", None),
                ("wrong", zmq.curve_keypair()[0]),
                ("right", sink_pub),
            ]
        }
        for s in subs.values():
            s.setsockopt(zmq.SUBSCRIBE, b"")
        # senders into the PULL source
        pushes = {
            name: _client(ctx, zmq.PUSH, ep_in, key)
            for name, key in [
                ("plain", None),
                ("wrong", zmq.curve_keypair()[0]),
                ("right", src_pub),
            ]
        }
        mons = {f"push-{k}": Handshakes(s) for k, s in pushes.items()}
        mons.update({f"sub-{k}": Handshakes(s) for k, s in subs.items()})
        # a camera PUB server with the key the daemon expects, and an impostor with another
        cam = ctx.socket(zmq.PUB)
        cam.curve_secretkey, cam.curve_publickey, cam.curve_server = cam_sec, cam_pub, True
        cam.bind(f"tcp://127.0.0.1:{p_cam}")
        socks += [*subs.values(), *pushes.values(), cam]
        time.sleep(0.5)
        img = np.zeros((8, 8, 3), np.uint8)
        for name, s in pushes.items():
            for i in range(5):
                try:
                    s.send_multipart(wire.encode_frame(name, i, img, "rgb24")[1:], zmq.NOBLOCK)
                except zmq.Again:  # no connection completed: nowhere to queue
                    pass
        for i in range(3):
            cam.send_multipart(wire.encode_frame("cam", i, img, "rgb24"))
        got: dict[str, set[str]] = {k: set() for k in subs}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and got["right"] != {"right", "cam"}:
            for k, s in subs.items():
                while s.poll(0):
                    got[k].add(json.loads(s.recv_multipart()[1])["stream"])
            time.sleep(0.05)
        for m in mons.values():
            m.poll(0.3)
        assert got == {"plain": set(), "wrong": set(), "right": {"right", "cam"}}
        m = svc.metrics
        assert m.frames_in.value(source="zmq0") == 5  # only the keyed sender's frames
        for name in ("push-plain", "push-wrong", "sub-plain", "sub-wrong"):
            assert mons[name].ok == 0, name
        assert mons["push-right"].ok >= 1 and mons["sub-right"].ok >= 1
        refused = sum(mons[n].ok == 0 for n in mons)
        # the daemon's SUB client refuses an impostor camera with another key
        cam.close(0)
        time.sleep(0.3)
        fake_pub, fake_sec = zmq.curve_keypair()
        fake = ctx.socket(zmq.PUB)
        fake.curve_secretkey, fake.curve_publickey, fake.curve_server = fake_sec, fake_pub, True
        fake.setsockopt(zmq.LINGER, 0)
        fake_mon = Handshakes(fake)
        fake.bind(f"tcp://127.0.0.1:{p_cam}")
        socks.append(fake)
        before = m.frames_in.value(source="zmq1")
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            fake.send_multipart(wire.encode_frame("cam", 99, img, "rgb24"))
            fake_mon.poll(0.1)
        assert m.frames_in.value(source="zmq1") == before and fake_mon.ok == 0
        refused += 1
        # size limit: a message over max_message_bytes is dropped by ZeroMQ before any decode
        pushes["right"].send_multipart([b"", json.dumps({"v": 1}).encode(), b"\0" * 200_000])
        time.sleep(0.5)
        assert m.frames_in.value(source="zmq0") == 5
        assert m.bad_input.total() == 0
        print(
            f"\nsecurity: {refused} unauthenticated or impostor peers refused (plain and "
            "wrong-key PUSH into the source, plain and wrong-key SUB on the sink, impostor "
            "camera for the SUB source); keyed peers served"
        )
    finally:
        for s in socks:
            s.close(0)
        ctx.destroy(linger=0)  # monitor sockets included


def test_curve_client_allow_list_refuses_unknown_client_keys(service):
    """With ``curve_client_keys`` a client that knows the server key but holds another key of
    its own is refused too (ZAP), on the source and on the sink."""
    src_pub, src_sec = zmq.curve_keypair()
    sink_pub, sink_sec = zmq.curve_keypair()
    sender_pub, sender_sec = zmq.curve_keypair()
    reader_pub, reader_sec = zmq.curve_keypair()
    p_in, p_out = free_port(), free_port()
    svc = service(
        zmq_source(
            p_in,
            socket="pull",
            bind=True,
            curve_secret_key=src_sec.decode(),
            curve_client_keys=[sender_pub.decode()],
        )
        + zmq_sink(
            p_out,
            frames=False,
            curve_secret_key=sink_sec.decode(),
            curve_client_keys=[reader_pub.decode()],
        )
    )
    ctx = zmq.Context()
    try:

        def client(kind: int, port: int, server: bytes, own: tuple[bytes, bytes] | None):
            s = ctx.socket(kind)
            pub, sec = own or zmq.curve_keypair()
            s.curve_secretkey, s.curve_publickey, s.curve_serverkey = sec, pub, server
            s.connect(f"tcp://127.0.0.1:{port}")
            return s, Handshakes(s)

        good_sub, good_sub_m = client(zmq.SUB, p_out, sink_pub, (reader_pub, reader_sec))
        bad_sub, bad_sub_m = client(zmq.SUB, p_out, sink_pub, None)
        for sub in (good_sub, bad_sub):
            sub.setsockopt(zmq.SUBSCRIBE, b"")
        good, good_m = client(zmq.PUSH, p_in, src_pub, (sender_pub, sender_sec))
        bad, bad_m = client(zmq.PUSH, p_in, src_pub, None)
        time.sleep(0.5)
        img = np.zeros((8, 8, 3), np.uint8)
        for name, s in (("bad", bad), ("good", good)):
            try:
                s.send_multipart(wire.encode_frame(name, 0, img, "rgb24")[1:], zmq.NOBLOCK)
            except zmq.Again:
                pass
        assert good_sub.poll(10000)
        assert json.loads(good_sub.recv_multipart()[1])["stream"] == "good"
        time.sleep(0.5)
        assert not bad_sub.poll(0)
        for m in (good_m, bad_m, good_sub_m, bad_sub_m):
            m.poll(0.3)
        assert good_m.ok >= 1 and good_sub_m.ok >= 1
        assert bad_m.ok == 0 and bad_sub_m.ok == 0
        assert svc.metrics.frames_in.value(source="zmq0") == 1
    finally:
        ctx.destroy(linger=0)


class Evil:
    """Pickles to a call that creates a directory: a stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("key", ["generator", "parser"])
def test_config_pointing_at_a_malicious_checkpoint_fails_start_up(tmp_path, tiny_models, key):
    marker = tmp_path / "pwned"
    sd = torch.load(tiny_models["G" if key == "generator" else "parser"], weights_only=True)
    evil = tmp_path / f"evil-{key}.pt"
    torch.save({**sd, "payload": Evil(str(marker))}, evil)
    if key == "generator":
        shutil.copy(tiny_models["G"].with_suffix(".json"), evil.with_suffix(".json"))
    models = {**tiny_models, "G" if key == "generator" else "parser": evil}
    cfg = write_config(tmp_path / "c.toml", models, zmq_source(free_port()), guard=True)
    r = run_daemon("run", "--config", str(cfg), timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert not marker.exists()  # the payload never ran
    failure = next(
        json.loads(x)
        for x in r.stdout.splitlines()
        if x.startswith("{") and '"start-up failed"' in x
    )
    assert evil.name in failure["error"] and "refused" in failure["error"], failure
    assert "Traceback" not in r.stderr, out[-2000:]
    # control: the file really carries a payload that a plain pickle load runs
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_systemd_unit_exposure_score():
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    r = subprocess.run(
        [exe, "security", "--offline=true", str(ROOT / "systemd" / "magdr-guard.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"systemd-analyze gave no score: {(r.stdout + r.stderr)[-300:]}")
    score = float(m.group(1))
    print(f"\nsystemd-analyze security: {score} (0 = most restricted, 10 = exposed)")
    assert score <= 3.0, r.stdout[-3000:]


def test_no_path_from_stream_ids_or_file_names_leaves_the_folders(service, tmp_path):
    p_in, p_out = free_port(), free_port()
    root = tmp_path / "root"  # everything configured lives under here
    svc = service(
        folder_io(root) + zmq_source(p_in, socket="pull", bind=True) + zmq_sink(p_out, frames=False)
    )
    configured = {root, tmp_path / "state"}  # folders, work_dir

    def outside() -> set:
        return {
            p
            for p in tmp_path.rglob("*")
            if p not in configured and not configured & set(p.parents)
        }

    before = outside()
    ctx = zmq.Context()
    sub = connect(ctx, zmq.SUB, p_out, SUBSCRIBE=b"verdict.", RCVTIMEO=10000)
    push = connect(ctx, zmq.PUSH, p_in)
    img = np.zeros((8, 8, 3), np.uint8)
    try:
        time.sleep(0.4)
        accepted = ["../../etc/x", "/etc/passwd", "..", "C:\\Windows\\x", "%2e%2e%2fx"]
        refused = ["a\x00b", "x" * 5000, "tab\there", "new\nline", "\udcff"]
        for i, sid in enumerate(accepted + refused):
            header = {"v": 1, "stream": sid, "seq": i, "format": "rgb24", "width": 8, "height": 8}
            push.send_multipart([json.dumps(header).encode(), img.tobytes()])
        seen = set()
        while len(seen) < len(accepted):
            topic, body = sub.recv_multipart()
            seen.add(json.loads(body)["stream"])
            assert topic == b"verdict." + json.loads(body)["stream"].encode()
        assert seen == set(accepted)  # labels only: echoed in the verdict, never a path
        assert wait_until(
            lambda: svc.metrics.bad_input.value(source="zmq1", reason="bad_header") == len(refused),
            5,
        )

        # file names: long, odd characters, not UTF-8, leading dash, backslash, dots
        inbox, outbox = root / "inbox", root / "outbox"
        stage = tmp_path / "stage"
        stage.mkdir()
        names = [
            "a" * 240 + ".png",
            "new\nline.png",
            "sp ace;rm -rf.png",
            "-dash.png",
            "back\\slash.png",
            "%2e%2e%2f..%2fetc.png",
            os.fsdecode(b"\xff\xfebytes.png"),
            "ünïcödé.png",
        ]
        for n in names:
            cv2.imwrite(str(stage / "x.png"), np.full((16, 16, 3), 100, np.uint8))
            os.rename(stage / "x.png", inbox / n)
        make_clip(stage / "v.mp4", frames=2, size=(32, 32))
        os.rename(stage / "v.mp4", inbox / ("b" * 250 + ".mp4"))
        assert wait_until(lambda: len(list(outbox.glob("*.summary.json"))) == len(names) + 1, 60), [
            p.name
            for d in (outbox, inbox, root / "failed", tmp_path / "state" / "claimed" / "0")
            if d.exists()
            for p in d.iterdir()
            if not p.name.startswith("a")
        ]
        summaries = [json.loads(p.read_text()) for p in outbox.glob("*.summary.json")]
        assert sorted(s["input"] for s in summaries) == sorted(names + ["b" * 250 + ".mp4"])
        for p in outbox.iterdir():
            assert len(os.fsencode(p.name)) <= 255 and p.parent == outbox
        assert not (root / "failed").exists() or not list((root / "failed").iterdir())
        assert list(inbox.iterdir()) == []
        # nothing was written anywhere but the configured folders
        after = outside()
        assert after - before <= {stage} | set(stage.iterdir()), after - before
        assert all(t.is_alive() for t in svc._workers)
    finally:
        ctx.destroy(linger=0)


def test_curve_client_keys_config_rules():
    from daemon.config import ConfigError, parse_config

    pub, sec = (k.decode() for k in zmq.curve_keypair())
    base = {"kind": "zmq", "endpoint": "tcp://127.0.0.1:1", "socket": "pull"}
    with pytest.raises(ConfigError, match=r"sources\[0\].curve_client_keys: only for a binding"):
        parse_config({"sources": [{**base, "curve_client_keys": [pub]}]})
    with pytest.raises(ConfigError, match=r"curve_client_keys\[0\]: expected a 40-character"):
        parse_config(
            {
                "sources": [
                    {**base, "bind": True, "curve_secret_key": sec, "curve_client_keys": ["short"]}
                ]
            }
        )
    cfg = parse_config(
        {"sources": [{**base, "bind": True, "curve_secret_key": sec, "curve_client_keys": [pub]}]}
    )
    assert cfg.sources[0].curve_client_keys == [pub]
