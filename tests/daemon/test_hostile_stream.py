"""Hostile ZeroMQ input: a fuzzed wire decoder, and 10,000+ malformed messages against a running
daemon (a subprocess) that must stay up, count and log each kind, keep its memory bounded, and
still give a verdict for a valid frame sent afterwards (DESIGN §6: malformed messages are
counted and logged, never fatal)."""

from __future__ import annotations

import json
import struct
import time
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import wire
from daemon.wire import WireError
from tests.daemon.helpers import (
    connect,
    free_port,
    png_header_only,
    start_daemon,
    stop_process,
    wait_until,
    write_config,
    zmq_sink,
    zmq_source,
)

MAX = 1 << 16  # pixels: 256 x 256


# ---- hostile payloads --------------------------------------------------------------------------


def png_bomb(w: int, h: int) -> bytes:
    """A complete, valid PNG of ``w x h`` black pixels: kilobytes on the wire, ``3wh`` decoded."""
    raw = zlib.compress(b"".join(b"\0" + b"\0" * (3 * w) for _ in range(h)), 9)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _img(h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _hdr(**kw) -> bytes:
    h = {"v": 1, "stream": "s", "seq": 0, "format": "rgb24", "width": 16, "height": 16}
    h.update(kw)
    return json.dumps({k: v for k, v in h.items() if v is not ...}).encode()


JPEG = wire.encode_image(_img(), "jpeg")
PNG = wire.encode_image(_img(), "png")


def hostile_v1(rng: np.random.Generator) -> dict[str, list[list[bytes]]]:
    """Malformed magdr-v1 messages by the reason the daemon must count them under."""
    rgb = _img().tobytes()
    noise = bytes(rng.integers(0, 256, 200, dtype=np.uint8))
    # 2-part messages are [header, payload] on PULL; 1, 4 and 5 parts are wrong everywhere.
    return {
        "bad_parts": [
            [b"frame.s"],
            [b"frame.s", _hdr(), rgb, b"x"],
            [b"a", b"b", b"c", b"d", b"e"],
        ],
        "bad_json": [
            [b"", b"{not json", rgb],
            [b"", b"\xff\xfe\x00", rgb],
            [b"", b"", rgb],
            [b"", b"[" * 100_000, rgb],  # nesting: the parser's recursion limit
            [b"", b'{"v": 1, "stream": "s"', rgb],
        ],
        "bad_version": [
            [b"", _hdr(v=2), rgb],
            [b"", _hdr(v=...), rgb],
            [b"", _hdr(v="1"), rgb],
            [b"", _hdr(v=0), rgb],
        ],
        "bad_header": [
            [b"", b"[1, 2]", rgb],
            [b"", b"null", rgb],
            [b"", _hdr(seq=-1), rgb],
            [b"", _hdr(seq=True), rgb],
            [b"", _hdr(width=0), rgb],
            [b"", _hdr(stream=""), rgb],
            [b"", _hdr(stream="x" * 300), rgb],
            [b"", _hdr(stream=7), rgb],
            [b"", _hdr(format="gif"), rgb],
            [b"", _hdr(extra=1), rgb],
            [b"", _hdr(height=...), rgb],
            [b"", _hdr(pts="soon"), rgb],
            [b"", _hdr(time_base=[1, 0]), rgb],
            [b"", _hdr(cond={"Blond_Hair": "yes"}), rgb],
            [b"", _hdr(stream="cam\udc80"), rgb],  # lone surrogate (valid JSON)
            [b"", _hdr(stream="cam\x00../x"), rgb],
        ],  # control characters
        "bad_topic": [[b"frame.other", _hdr(), rgb]],
        "too_large": [
            [b"", _hdr(width=1 << 30, height=1 << 30), b""],
            [b"", _hdr(width=10**40, height=10**40, format="jpeg"), JPEG],
            [b"", _hdr(width=4000, height=4000, format="png"), png_header_only(4000, 4000)],
            [b"", _hdr(width=16, height=16, format="png"), png_header_only(30000, 30000)],
            [b"", _hdr(width=16, height=16, format="png"), png_bomb(2000, 2000)],
        ],
        "bad_payload": [
            [b"", _hdr(), rgb[:-1]],
            [b"", _hdr(), rgb + b"\0"],
            [b"", _hdr(), b""],
            [b"", _hdr(format="jpeg"), JPEG[: len(JPEG) // 2]],
            [b"", _hdr(format="jpeg"), JPEG[:20]],
            [b"", _hdr(format="png"), PNG[: len(PNG) // 2]],
            [b"", _hdr(format="png"), PNG[:33]],
            [b"", _hdr(format="jpeg"), PNG],  # a PNG declared as JPEG
            [b"", _hdr(format="jpeg"), b"GIF89a" + noise[:64]],
            [b"", _hdr(format="jpeg", width=8, height=8), JPEG],  # size mismatch
            [b"", _hdr(format="png"), noise],
        ],
    }


# ---- the decoder, fuzzed -----------------------------------------------------------------------

_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
_header = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), _json_scalar),
        "stream": st.one_of(st.text(min_size=0, max_size=40), _json_scalar),
        "seq": st.one_of(st.integers(-5, 2**64), _json_scalar),
        "format": st.sampled_from(["jpeg", "png", "rgb24", "gif", ""]),
        "width": st.one_of(st.integers(-2, 40), st.integers(0, 2**40), _json_scalar),
        "height": st.one_of(st.integers(-2, 40), st.integers(0, 2**40), _json_scalar),
    },
    optional={
        "pts": _json_scalar,
        "time_base": st.lists(st.integers(-2, 10**6), max_size=3),
        "cond": st.dictionaries(st.text(max_size=12), _json_scalar, max_size=3),
        "junk": _json_scalar,
    },
)


def _payload(draw_bytes: bytes, kind: int) -> bytes:
    return [
        draw_bytes,
        JPEG[: len(draw_bytes) % len(JPEG)],
        PNG[: len(draw_bytes) % len(PNG)],
        JPEG,
        PNG,
        png_header_only(len(draw_bytes) * 997 + 1, 300),
        _img(4, 4).tobytes(),
    ][kind]


def _check(msg: wire.FrameMsg) -> None:
    assert msg.image.dtype == np.uint8 and msg.image.ndim == 3 and msg.image.shape[2] == 3
    assert msg.image.shape[0] * msg.image.shape[1] <= MAX
    assert isinstance(msg.stream, str) and msg.stream.isprintable()
    msg.stream.encode()  # every accepted stream id can become a topic


@settings(
    max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    h=_header,
    body=st.binary(max_size=300),
    kind=st.integers(0, 6),
    topic=st.sampled_from([b"", b"frame.s", b"frame."]),
    raw=st.booleans(),
)
def test_fuzz_v1_decoder_raises_only_wire_errors(h, body, kind, topic, raw):
    """Whatever arrives, decode_v1 returns a sane frame or raises WireError — nothing else."""
    header = body if raw else json.dumps(h).encode()
    try:
        _check(wire.decode_v1([topic, header, _payload(body, kind)], MAX))
    except WireError as e:
        assert e.reason and str(e)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(parts=st.lists(st.binary(max_size=200), min_size=0, max_size=5))
def test_fuzz_v1_decoder_raw_parts(parts):
    try:
        _check(wire.decode_v1(parts, MAX))
    except WireError:
        pass


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    md=st.dictionaries(
        st.sampled_from(["msg", "dtype", "shape", "x"]),
        st.one_of(_json_scalar, st.lists(st.integers(-3, 2**33), max_size=4)),
        max_size=4,
    ),
    body=st.binary(max_size=300),
    kind=st.integers(0, 6),
    raw=st.booleans(),
)
def test_fuzz_imagezmq_decoder(md, body, kind, raw):
    meta = body if raw else json.dumps(md).encode()
    try:
        _check(wire.decode_imagezmq([meta, _payload(body, kind)], MAX, 1))
    except WireError as e:
        assert e.reason


@pytest.mark.parametrize("reason", list(hostile_v1(np.random.default_rng(0))))
def test_each_hostile_kind_has_its_reason(reason):
    for parts in hostile_v1(np.random.default_rng(0))[reason]:
        with pytest.raises(WireError) as e:
            wire.decode_v1(parts, MAX)
        assert e.value.reason == reason, (parts[1][:80], str(e.value))


def test_image_bombs_refused_before_decoding():
    """A small message whose image header declares a huge frame is refused from the header."""
    assert wire.image_size(png_header_only(30000, 20000), "png") == (30000, 20000)
    assert wire.image_size(JPEG, "jpeg") == (16, 16)
    with pytest.raises(WireError, match="over 65536 pixels") as e:
        wire.decode_image(png_bomb(2000, 2000), "png", 0, 0, MAX)
    assert e.value.reason == "too_large"
    with pytest.raises(WireError) as e:
        wire.decode_image(b"BM" + bytes(60), "jpeg", 0, 0, MAX)  # a BMP is not a JPEG
    assert e.value.reason == "bad_payload"


# ---- a running daemon under 10,000+ hostile messages -------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of a process (``VmRSS`` in /proc), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}``."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


@pytest.mark.slow
def test_daemon_survives_10000_hostile_messages(tmp_path, tiny_models):
    rng = np.random.default_rng(1234)
    p_pull, p_sub, p_rep, p_out, p_metrics = (free_port() for _ in range(5))
    max_bytes = 1 << 20
    body = (
        zmq_source(p_pull, socket="pull", bind=True, max_message_bytes=max_bytes)
        + zmq_source(p_sub, socket="sub", bind=True, queue_size=4, hwm=50)
        + zmq_source(p_rep, socket="rep", bind=True, protocol="imagezmq")
        + zmq_sink(p_out, frames=False, hwm=0)
        + f"""
[metrics]
enabled = true
port = {p_metrics}
"""
    )
    cfg = write_config(tmp_path / "c.toml", tiny_models, body, guard=True, max_frame_pixels=MAX)
    log = tmp_path / "log.jsonl"
    proc = start_daemon(cfg, log)
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        assert wait_until(lambda: b'"ready"' in log.read_bytes() or proc.poll() is not None, 60)
        assert proc.poll() is None, log.read_text()[-3000:]
        sub = connect(ctx, zmq.SUB, p_out, SUBSCRIBE=b"verdict.")
        push = connect(ctx, zmq.PUSH, p_pull, SNDHWM=0)
        pub = connect(ctx, zmq.PUB, p_sub, SNDHWM=1000)
        req = connect(ctx, zmq.REQ, p_rep, RCVTIMEO=10000)
        socks += [sub, push, pub, req]
        time.sleep(0.5)
        sub.setsockopt(zmq.RCVTIMEO, 20000)

        def verdict_of(stream: str) -> dict:
            while True:
                topic, body = sub.recv_multipart()
                if topic == b"verdict." + stream.encode():
                    return json.loads(body)

        # warm up (first guard call, allocator pools), then take the memory baseline
        push.send_multipart(wire.encode_frame("warm", 0, _img(seed=4), "rgb24")[1:])
        verdict_of("warm")

        kinds = hostile_v1(rng)
        sent: Counter[str] = Counter()
        rss = []
        n_v1 = 9000
        names = sorted(kinds)
        for i in range(n_v1):
            reason = names[i % len(names)]
            parts = kinds[reason][(i // len(names)) % len(kinds[reason])]
            push.send_multipart(parts)
            sent[reason] += 1
            if i % 1000 == 0:
                rss.append(rss_kib(proc.pid))
        # imagezmq over REQ/REP: every reply says what was wrong, and the socket keeps serving
        iz = [
            (
                [
                    json.dumps({"msg": "pi", "dtype": "float32", "shape": [4, 4, 3]}).encode(),
                    b"\0" * 192,
                ],
                "bad_header",
            ),
            (
                [json.dumps({"msg": "pi", "dtype": "uint8", "shape": [4, -4, 3]}).encode(), b""],
                "bad_shape",
            ),
            (
                [
                    json.dumps({"msg": "pi", "dtype": "uint8", "shape": [100000, 100000]}).encode(),
                    b"",
                ],
                "too_large",
            ),
            (
                [json.dumps({"msg": "pi", "dtype": "uint8", "shape": [4, 4, 3]}).encode(), b"\0"],
                "bad_payload",
            ),
            ([json.dumps({"msg": "pi"}).encode(), JPEG[:40]], "bad_payload"),
            ([json.dumps({"msg": "pi"}).encode(), png_header_only(5000, 5000)], "bad_payload"),
            ([b"[" * 50_000, b""], "bad_json"),
            ([b"only one part"], "bad_parts"),
        ]
        iz_sent: Counter[str] = Counter()
        for i in range(800):
            parts, reason = iz[i % len(iz)]
            req.send_multipart(parts)
            reply = req.recv()
            assert reply.startswith(b"ERROR "), reply
            iz_sent[reply.split(b":")[0][6:].decode()] += 1
        # a flood of valid frames far over the SUB queue and ZeroMQ's high-water mark
        good = wire.encode_frame("flood", 0, _img(), "rgb24")
        for i in range(3000):
            good[1] = json.dumps({**json.loads(good[1]), "seq": i}).encode()
            pub.send_multipart(good)
        # larger than max_message_bytes: ZeroMQ drops the connection, the daemon never sees it
        big = connect(ctx, zmq.PUSH, p_pull)
        socks.append(big)
        for _ in range(5):
            big.send_multipart([b"", _hdr(), b"\0" * (max_bytes + 10)])
        total = n_v1 + 800 + 3000 + 5
        assert total >= 10_000

        m = {}

        def counted() -> bool:
            nonlocal m
            m = scrape(p_metrics)
            got = sum(
                v
                for k, v in m.items()
                if k.startswith("magdr_bad_input_total") and 'source="zmq0"' in k
            )
            return got >= sum(sent.values())

        assert wait_until(counted, 60), (sent, {k: v for k, v in m.items() if "bad_input" in k})
        for reason, n in sent.items():
            assert m[f'magdr_bad_input_total{{reason="{reason}",source="zmq0"}}'] == n, reason
        for reason, n in iz_sent.items():
            assert m[f'magdr_bad_input_total{{reason="{reason}",source="zmq2"}}'] == n, reason
        assert iz_sent == Counter(
            {r: n for r, n in Counter(iz[i % len(iz)][1] for i in range(800)).items()}
        )
        # every flooded frame that reached the daemon is guarded or counted as dropped
        flood_in = m.get('magdr_frames_in_total{source="zmq1"}', 0)

        def flood_done() -> bool:
            nonlocal m
            m = scrape(p_metrics)
            out = m.get('magdr_frames_out_total{source="zmq1"}', 0)
            dropped = sum(
                v
                for k, v in m.items()
                if k.startswith("magdr_frames_dropped_total") and 'source="zmq1"' in k
            )
            return out + dropped == m.get('magdr_frames_in_total{source="zmq1"}', -1)

        assert wait_until(flood_done, 60), {k: v for k, v in m.items() if "zmq1" in k}
        flood_in = m['magdr_frames_in_total{source="zmq1"}']
        assert flood_in > 0
        assert m['magdr_frames_dropped_total{reason="queue_full",source="zmq1"}'] > 0
        assert m['magdr_queue_depth{queue="zmq1"}'] <= 4

        # still alive, memory bounded, and a valid frame gets its verdict
        assert proc.poll() is None
        rss.append(rss_kib(proc.pid))
        while True:  # drain verdicts of the flood
            try:
                sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        push.send_multipart(wire.encode_frame("after", 1, _img(seed=5), "rgb24")[1:])
        v = verdict_of("after")
        assert v["seq"] == 1 and v["score"] is not None and len(v["faces"]) == 1
        growth_mib = (max(rss) - rss[0]) / 1024
        assert growth_mib < 64, rss
        # each kind is logged with its reason
        logged = Counter(
            json.loads(x).get("reason")
            for x in log.read_text().splitlines()
            if '"malformed message"' in x
        )
        for reason in sent:
            assert logged[reason] >= sent[reason], reason
        print(
            f"\nhostile stream: {total} messages sent ({sum(sent.values())} malformed v1 by "
            f"kind {dict(sent)}, 800 imagezmq {dict(iz_sent)}, 3000 flood frames of which "
            f"{int(flood_in)} reached the queue, 5 oversize); daemon up; RSS "
            f"{rss[0] / 1024:.0f} -> {rss[-1] / 1024:.0f} MiB (max growth {growth_mib:.1f} MiB)"
        )
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        stop_process(proc)
