"""The PUB sink on real sockets: a subscriber that falls past ``hwm`` loses messages, and every
lost message is counted and logged by stream and seq (plain PUB drops them without a trace)."""

from __future__ import annotations

import json

import numpy as np
import zmq
from structlog.testing import capture_logs

from daemon.config import ZmqSinkConfig
from daemon.metrics import Metrics
from daemon.pipeline import Guarded
from daemon.sinks.zmq import ZmqSink
from tests.daemon.helpers import connect, free_port, wait_until


def test_messages_past_hwm_are_counted_and_logged_by_seq():
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    metrics = Metrics()
    ctx = zmq.Context()
    sink = ZmqSink(ZmqSinkConfig(endpoint=endpoint, hwm=2, format="rgb24"), ctx, metrics)
    sub = connect(ctx, zmq.SUB, port, RCVHWM=2, SUBSCRIBE=b"")
    try:
        # the subscription has reached the PUB once a message gets through
        probe = Guarded(np.zeros((2, 2, 3), np.uint8), {"stream": "probe", "seq": 0})
        assert wait_until(lambda: sink.publish(probe) or sub.poll(50), 5)
        while sub.poll(200):
            sub.recv_multipart()
        # 200 frames of 192 KiB to a subscriber that does not read: far past socket buffers
        image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
        n = 200
        with capture_logs() as logs:
            for seq in range(n):
                sink.publish(Guarded(image, {"stream": "cam", "seq": seq}))
        verdicts, frames = set(), set()
        while sub.poll(500):
            msg = sub.recv_multipart()
            seq = json.loads(msg[1])["seq"]
            (verdicts if msg[0] == b"verdict.cam" else frames).add(seq)
    finally:
        sink.close()
        sub.close(0)
        ctx.term()
    dropped = {"verdict": set(), "clean": set()}
    for e in logs:
        assert e["event"] == "message dropped" and e["reason"] == "hwm", e
        assert e["sink"] == endpoint and e["stream"] == "cam", e
        dropped[e["topic"]].add(e["seq"])
    assert dropped["clean"], "the subscriber kept up: the drop path went untested"
    # every message either arrived or was counted and logged, never both
    for topic, got in (("verdict", verdicts), ("clean", frames)):
        assert got | dropped[topic] == set(range(n)) and not got & dropped[topic], topic
        counted = metrics.sink_dropped.value(sink=endpoint, topic=topic, reason="hwm")
        assert counted == len(dropped[topic]), topic
