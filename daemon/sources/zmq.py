"""ZeroMQ source: SUB (connect or bind), PULL, and REP for imagezmq's REQ senders (DESIGN §6).

Two threads per source. The receiver owns the socket (ZeroMQ sockets are not thread-safe): it
decodes each message strictly (:mod:`daemon.wire`) and puts the frame on a bounded queue with
the configured policy — ``drop-oldest`` for live SUB streams (a late frame is worth less than a
new one), ``block`` for PULL/REP (back-pressure reaches the sender), or ``drop-newest``. The
worker takes frames off the queue into the shared :class:`~daemon.pipeline.FramePipeline` with a
bounded number in flight, so a slow guard fills the queue and the policy decides. Every drop and
every malformed message is counted (``magdr_frames_dropped_total{reason}``,
``magdr_bad_input_total{reason}``) and logged; none is fatal.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import structlog
import zmq

from daemon import logging as dlog
from daemon import wire
from daemon.config import ZmqSourceConfig
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.pipeline import FramePipeline, Guarded
from daemon.web.state import OperatorView

log = structlog.get_logger()

SOCKET_TYPES = {"sub": zmq.SUB, "pull": zmq.PULL, "rep": zmq.REP}


class _ClientKeys:
    """ZAP credentials provider: the client public keys each socket's domain lets in."""

    def __init__(self) -> None:
        self.allowed: dict[str, set[bytes]] = {}
        self._told: dict[bytes, float] = {}

    def callback(self, domain: str, key: bytes) -> bool:  # noqa: D102
        keys = self.allowed.get(domain)
        ok = keys is None or key in keys
        # a refused client retries every 100 ms: one line per key and minute
        if not ok and time.monotonic() - self._told.get(key, -60.0) >= 60.0:
            if len(self._told) > 1000:
                self._told.clear()
            self._told[key] = time.monotonic()
            log.warning("curve client refused", domain=domain, client_key=key.decode()[:40])
        return ok


#: one ZAP authenticator per context (libzmq asks the one handler of a context).
_ZAP: dict[int, tuple[Any, _ClientKeys]] = {}
_ZAP_LOCK = threading.Lock()


def _allow_clients(sock: zmq.Socket, keys: list[str]) -> None:
    """Let only ``keys`` (Z85 public keys) complete the CURVE handshake on server ``sock``."""
    from zmq.auth.thread import ThreadAuthenticator

    ctx = sock.context
    with _ZAP_LOCK:
        if id(ctx) not in _ZAP:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            provider = _ClientKeys()
            # sockets without a list of their own (domain '') keep "any client with the key"
            auth.configure_curve_callback("*", provider)
            _ZAP[id(ctx)] = (auth, provider)
        auth, provider = _ZAP[id(ctx)]
        domain = f"magdr-{len(provider.allowed)}"
        provider.allowed[domain] = {k.encode() for k in keys}
        auth.configure_curve_callback(domain, provider)
    sock.zap_domain = domain.encode()


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the context's ZAP authenticator thread, if one was started (before destroying)."""
    with _ZAP_LOCK:
        entry = _ZAP.pop(id(ctx), None)
    if entry is not None:
        entry[0].stop()


def apply_curve(
    sock: zmq.Socket, secret: str, server_key: str, server: bool, clients: list[str] | None = None
) -> None:
    """CurveZMQ: a binding socket is the server (own secret key); a connecting one a client.

    A server with ``clients`` lets only those public keys in (ZAP); without, any client that
    knows the server's public key gets through the handshake.
    """
    if not secret:
        return
    public = zmq.curve_public(secret.encode())
    sock.curve_secretkey = secret.encode()
    sock.curve_publickey = public
    if server:
        sock.curve_server = True
        if clients:
            _allow_clients(sock, clients)
    else:
        sock.curve_serverkey = server_key.encode()


class ZmqSource:
    """Frames from one ZeroMQ endpoint into the pipeline.

    Args:
        index: position in ``[[sources]]`` (names threads, labels metrics).
        cfg: ``[[sources]] kind = "zmq"``.
        ctx: the service's ZeroMQ context.
        pipeline: the shared frame pipeline.
        emit: called with each guarded frame (the sinks).
        metrics: counters.
        notifier: progress beats for the watchdog.
        max_pixels: larger frames are refused.
        inflight: frames of this source in the pipeline at once.
        view: the operator page's state, told of each frame in and each drop.
    """

    def __init__(
        self,
        index: int,
        cfg: ZmqSourceConfig,
        ctx: zmq.Context,
        pipeline: FramePipeline,
        emit: Callable[[Guarded], None],
        metrics: Metrics,
        notifier: Notifier,
        max_pixels: int,
        inflight: int = 16,
        view: OperatorView | None = None,
    ) -> None:
        self.index, self.cfg, self.ctx = index, cfg, ctx
        self.pipeline, self.emit, self.metrics = pipeline, emit, metrics
        self.notifier, self.max_pixels, self.view = notifier, max_pixels, view
        self.name = f"zmq{index}"
        self.policy = cfg.effective_policy
        self.q: queue.Queue[tuple[wire.FrameMsg, float]] = queue.Queue(cfg.queue_size)
        self._slots = threading.Semaphore(inflight)
        self._pending: set[Future] = set()
        self._plock = threading.Lock()
        self._stop_rx = threading.Event()
        self._stop_work = threading.Event()
        self._ready = threading.Event()
        self._seq = 0
        self.bound_endpoint = ""
        self.error: Exception | None = None
        self._rx = threading.Thread(target=self._receive, name=f"{self.name}-rx", daemon=True)
        self._work = threading.Thread(target=self._worker, name=f"{self.name}-work", daemon=True)

    # ---- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Open the socket (in its own thread) and wait until it is bound or connected."""
        self._rx.start()
        self._ready.wait(10)
        if self.error:
            raise self.error
        self._work.start()

    def stop_receiving(self) -> None:
        """Stop taking new messages (first step of a drain)."""
        self._stop_rx.set()
        self._rx.join(5)

    def drain(self, timeout: float) -> None:
        """Guard what is queued and in flight, then stop the worker."""
        deadline = time.monotonic() + timeout
        while not self.q.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop_work.set()
        self._work.join(max(0.0, deadline - time.monotonic()))
        with self._plock:
            pending = list(self._pending)
        for f in pending:
            try:
                f.result(max(0.0, deadline - time.monotonic()))
            except Exception:  # counted where it failed
                pass
        self.notifier.forget(f"{self.name}-work")
        self.metrics.queue_depth.set(self.q.qsize(), queue=self.name)

    # ---- receiving ----------------------------------------------------------------------
    def _open(self) -> zmq.Socket:
        c = self.cfg
        sock = self.ctx.socket(SOCKET_TYPES[c.socket])
        sock.setsockopt(zmq.RCVHWM, c.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, c.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        apply_curve(sock, c.curve_secret_key, c.curve_server_key, c.bind, c.curve_client_keys)
        if c.socket == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, c.topic.encode() if c.protocol == "magdr-v1" else b"")
        if c.bind:
            sock.bind(c.endpoint)
            self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            sock.connect(c.endpoint)
            self.bound_endpoint = c.endpoint
        return sock

    def _receive(self) -> None:
        try:
            sock = self._open()
        except zmq.ZMQError as e:
            self.error = RuntimeError(f"sources[{self.index}].endpoint: {self.cfg.endpoint}: {e}")
            self._ready.set()
            return
        self._ready.set()
        log.info(
            "zmq source ready",
            source=self.name,
            endpoint=self.bound_endpoint,
            socket=self.cfg.socket,
            protocol=self.cfg.protocol,
            policy=self.policy,
        )
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop_rx.is_set():
                self.notifier.beat(f"{self.name}-rx")
                if not poller.poll(200):
                    continue
                parts = sock.recv_multipart()
                try:
                    reply = self._handle(parts)
                except Exception as e:  # a message must never end the receiver (or a REP)
                    log.exception("message handling failed", source=self.name)
                    reply = self._bad("error", f"{type(e).__name__}: {e}")
                if self.cfg.socket == "rep":
                    sock.send(reply)
        finally:
            self.notifier.forget(f"{self.name}-rx")
            sock.close(0)

    def _bad(self, reason: str, message: str) -> bytes:
        self.metrics.bad_input.inc(source=self.name, reason=reason)
        log.warning("malformed message", source=self.name, reason=reason, error=message)
        return f"ERROR {reason}: {message}".encode()[:512]

    def _handle(self, parts: list[bytes]) -> bytes:
        size = sum(len(p) for p in parts)
        if size > self.cfg.max_message_bytes:
            return self._bad("too_large", f"{size} bytes > {self.cfg.max_message_bytes}")
        try:
            if self.cfg.protocol == "imagezmq":
                self._seq += 1
                msg = wire.decode_imagezmq(
                    parts, self.max_pixels, self._seq, self.cfg.stream, bgr=self.cfg.color == "bgr"
                )
            else:
                msg = wire.decode_v1(parts, self.max_pixels)
        except wire.WireError as e:
            return self._bad(e.reason, str(e))
        self.metrics.frames_in.inc(source=self.name)
        if self.view is not None:
            self.view.frame_in(msg.stream, self.name)
        self._enqueue(msg)
        return b"OK"

    def _drop(self, reason: str, msg: wire.FrameMsg) -> None:
        self.metrics.frames_dropped.inc(source=self.name, reason=reason)
        if self.view is not None:
            self.view.dropped(msg.stream, self.name)
        log.warning(
            "frame dropped", source=self.name, reason=reason, stream=msg.stream, seq=msg.seq
        )

    def _enqueue(self, msg: wire.FrameMsg) -> None:
        item = (msg, time.monotonic())
        if self.policy == "block":
            while not self._stop_rx.is_set():
                try:
                    self.q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    self.notifier.beat(f"{self.name}-rx")  # waiting on the guard is progress
            else:
                self._drop("stopping", msg)
        else:
            try:
                self.q.put_nowait(item)
            except queue.Full:
                if self.policy == "drop-newest":
                    self._drop("queue_full", msg)
                else:
                    try:
                        old, _ = self.q.get_nowait()
                        self._drop("queue_full", old)
                    except queue.Empty:
                        pass
                    self.q.put_nowait(item)
        self.metrics.queue_depth.set(self.q.qsize(), queue=self.name)

    # ---- guarding -----------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            self.notifier.beat(f"{self.name}-work")
            try:
                msg, t0 = self.q.get(timeout=0.2)
            except queue.Empty:
                if self._stop_work.is_set():
                    return
                continue
            self.metrics.queue_depth.set(self.q.qsize(), queue=self.name)
            while not self._slots.acquire(timeout=0.5):
                self.notifier.beat(f"{self.name}-work")
            with dlog.bound(source=self.name, stream=msg.stream, seq=msg.seq):
                try:
                    fut = self.pipeline.submit(
                        msg.image,
                        stream=msg.stream,
                        seq=msg.seq,
                        source=self.name,
                        pts=msg.pts,
                        time_base=msg.time_base,
                        cond=msg.cond,
                        t0=t0,
                    )
                except (KeyError, ValueError) as e:
                    self._slots.release()
                    self._bad("bad_condition" if isinstance(e, KeyError) else "bad_frame", str(e))
                    continue
            with self._plock:
                self._pending.add(fut)
            fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._plock:
            self._pending.discard(fut)
        self._slots.release()
        try:
            g = fut.result()
        except Exception as e:
            self.metrics.frames_dropped.inc(source=self.name, reason="guard_error")
            log.error("frame not guarded", source=self.name, error=str(e))
            return
        self.metrics.frames_out.inc(source=self.name)
        try:
            self.emit(g)
        except Exception:
            log.exception("sink failed", source=self.name)
