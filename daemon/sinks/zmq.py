"""ZeroMQ PUB sink: ``verdict.<stream>`` JSON and ``clean.<stream>`` frames (DESIGN §6).

A PUB socket is not thread-safe and results arrive from several threads, so sends take a lock.
PUB never blocks. Past ``hwm`` plain PUB drops a slow subscriber's messages without telling
anyone, so the socket is set to ``XPUB_NODROP``: a send that would overflow a subscriber's queue
fails with EAGAIN instead, and that message (for every subscriber) is counted
(``magdr_sink_dropped_total{sink,topic,reason}``) and logged with its stream and seq.
"""

from __future__ import annotations

import threading

import structlog
import zmq

from daemon import wire
from daemon.config import ZmqSinkConfig
from daemon.metrics import Metrics
from daemon.pipeline import Guarded
from daemon.sources.zmq import apply_curve

log = structlog.get_logger()


class ZmqSink:
    """Publish verdicts (and cleaned frames) of every guarded frame.

    Args:
        cfg: ``[[sinks]] kind = "zmq"``.
        ctx: the service's ZeroMQ context.
        metrics: counters (messages not sent).
    """

    def __init__(self, cfg: ZmqSinkConfig, ctx: zmq.Context, metrics: Metrics) -> None:
        self.cfg, self.metrics = cfg, metrics
        self._lock = threading.Lock()
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full subscriber queue: EAGAIN, not silence
        self.sock.setsockopt(zmq.LINGER, 500)
        apply_curve(
            self.sock, cfg.curve_secret_key, cfg.curve_server_key, cfg.bind, cfg.curve_client_keys
        )
        (self.sock.bind if cfg.bind else self.sock.connect)(cfg.endpoint)
        self.sent = 0
        log.info("zmq sink ready", endpoint=cfg.endpoint, bind=cfg.bind)

    def publish(self, g: Guarded) -> None:
        """Send ``verdict.<stream>`` and, when configured, ``clean.<stream>``."""
        v = g.verdict
        parts = [("verdict", wire.encode_verdict(v))]
        if self.cfg.frames:
            parts.append(
                (
                    "clean",
                    wire.encode_frame(
                        v["stream"],
                        v["seq"],
                        g.image,
                        self.cfg.format,
                        pts=g.pts,
                        time_base=g.time_base,
                        topic="clean.",
                        jpeg_quality=self.cfg.jpeg_quality,
                    ),
                )
            )
        with self._lock:
            for topic, msg in parts:
                try:
                    self.sock.send_multipart(msg, flags=zmq.NOBLOCK)
                except zmq.ZMQError as e:
                    reason = "hwm" if e.errno == zmq.EAGAIN else "error"
                    self.metrics.sink_dropped.inc(
                        sink=self.cfg.endpoint, topic=topic, reason=reason
                    )
                    log.warning(
                        "message dropped",
                        sink=self.cfg.endpoint,
                        topic=topic,
                        reason=reason,
                        stream=v["stream"],
                        seq=v["seq"],
                    )
            self.sent += 1

    def close(self) -> None:  # noqa: D102
        with self._lock:
            self.sock.close()
