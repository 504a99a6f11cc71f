"""The ``[http]`` server: the operator page, its JSON API, live events and ``/metrics``.

Standard library only (``http.server``), one thread per connection. Routes (docs/http-api.md)::

    /                                         the page (static/index.html, app.js, style.css)
    /metrics                                  Prometheus text format (prometheus-client)
    /api/streams                              every stream's counters and last verdict
    /api/streams/{id}                         one stream: its last verdicts, its flagged faces
    /api/streams/{id}/frame.jpg               its latest cleaned frame
    /api/streams/{id}/flagged/{n}/{kind}.jpg  a flagged face's side-by-side pictures
    /api/jobs                                 files in progress and done, with their summaries
    /api/jobs/{name}/{media|verdicts|summary} a finished file's outputs (from the outbox only)
    /api/events                               server-sent events: streams and jobs, <= 4 per s

With a token every request, the page included, needs ``Authorization: Bearer <token>``;
without, 401. Path segments are percent-decoded one by one, so a stream id may hold any
character; ids only ever select entries of :class:`~daemon.web.state.OperatorView`, never paths.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

from daemon.metrics import CONTENT_TYPE, Metrics
from daemon.web.state import DETAIL_IMAGES, OperatorView

log = structlog.get_logger()

STATIC = Path(__file__).resolve().parent / "static"
#: the only files served from ``static/`` (no path from a request reaches the file system).
PAGES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "static/style.css": ("style.css", "text/css; charset=utf-8"),
}
OUTPUT_TYPES = {
    "media": "application/octet-stream",
    "verdicts": "application/x-ndjson",
    "summary": "application/json",
}
#: server-sent event clients at once (each holds a thread); more get 503.
MAX_EVENT_CLIENTS = 16
EVENT_PERIOD_S = 0.25
HEADERS = {
    # the page loads nothing from elsewhere and runs no inline script: a stream id that slips
    # into markup could not run even then
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Handler(BaseHTTPRequestHandler):
    server: OperatorServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may sit idle (or not read an event) before it is closed

    def log_message(self, *args: object) -> None:  # a page polls often: no line per request
        pass

    def _send(
        self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for k, v in {
            **HEADERS,
            "Content-Type": ctype,
            "Content-Length": str(len(body)),
            **(extra or {}),
        }.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: HTTPStatus, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": status.phrase}).encode()
        self._send(status, body, "application/json", extra)

    def do_GET(self) -> None:  # noqa: N802
        token = self.server.token
        if token and not hmac.compare_digest(
            self.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()
        ):
            self._error(HTTPStatus.UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="magdr"'})
            return
        parts = [
            unquote(p, errors="surrogateescape")
            for p in urlsplit(self.path).path.strip("/").split("/")
        ]
        try:
            self._route(parts)
        except (BrokenPipeError, ConnectionResetError):  # the browser went away
            pass

    def _route(self, p: list[str]) -> None:
        page = PAGES.get("/".join(p))
        if page:
            self._send(200, (STATIC / page[0]).read_bytes(), page[1])
        elif p == ["metrics"]:
            self._send(200, self.server.metrics.render(), CONTENT_TYPE)
        elif p[0] != "api" or len(p) < 2:
            self._error(HTTPStatus.NOT_FOUND)
        elif p[1] == "events" and len(p) == 2:
            self._events()
        elif p[1] == "streams":
            self._streams(p[2:])
        elif p[1] == "jobs":
            self._jobs(p[2:])
        else:
            self._error(HTTPStatus.NOT_FOUND)

    def _streams(self, p: list[str]) -> None:
        view = self.server.view
        if not p:
            self._json(view.streams())
        elif len(p) == 1:
            self._found_json(view.stream(p[0]))
        elif p[1:] == ["frame.jpg"]:
            self._found_jpeg(view.frame_jpeg(p[0]))
        elif (
            len(p) == 4
            and p[1] == "flagged"
            and p[2].isdigit()
            and p[3].removesuffix(".jpg") in DETAIL_IMAGES
        ):
            self._found_jpeg(view.flagged_picture(p[0], int(p[2]), p[3].removesuffix(".jpg")))
        else:
            self._error(HTTPStatus.NOT_FOUND)

    def _jobs(self, p: list[str]) -> None:
        if not p:
            self._json(self.server.view.jobs())
            return
        path = self.server.view.job_output(p[0], p[1]) if len(p) == 2 else None
        if path is None:
            self._error(HTTPStatus.NOT_FOUND)
            return
        name = json.dumps(path.name, ensure_ascii=True)  # quoted, any byte escaped
        self._send(
            200,
            path.read_bytes(),
            OUTPUT_TYPES[p[1]],
            {"Content-Disposition": f"inline; filename={name}"},
        )

    def _found_json(self, obj: Any) -> None:
        if obj is None:
            self._error(HTTPStatus.NOT_FOUND)
        else:
            self._json(obj)

    def _found_jpeg(self, data: bytes | None) -> None:
        if data is None:
            self._error(HTTPStatus.NOT_FOUND)
        else:
            self._send(200, data, "image/jpeg")

    def _events(self) -> None:
        """Server-sent events: ``{"streams", "jobs"}`` whenever they change, 4 per s at most."""
        if not self.server.event_slots.acquire(blocking=False):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE)
            return
        try:
            self.send_response(200)
            for k, v in {**HEADERS, "Content-Type": "text/event-stream"}.items():
                self.send_header(k, v)
            self.end_headers()
            view, stop, version = self.server.view, self.server.stopping, -1
            while not stop.is_set():
                new = view.wait_changed(version, 10.0)
                if new == version:  # a comment keeps proxies from closing an idle stream
                    self.wfile.write(b": idle\n\n")
                else:
                    version = new
                    data = json.dumps({"streams": view.streams(), "jobs": view.jobs()})
                    self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()
                stop.wait(EVENT_PERIOD_S)
        finally:
            self.server.event_slots.release()
            self.close_connection = True


class OperatorServer(ThreadingHTTPServer):
    """The ``[http]`` server on a background thread; ``port=0`` picks a free port.

    Args:
        view: the operator state.
        metrics: the registry served at ``/metrics``.
        host: listen address.
        port: listen port.
        token: the bearer token every request must carry ("" = none).
    """

    daemon_threads = True

    def __init__(
        self,
        view: OperatorView,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 9464,
        token: str = "",
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.view, self.metrics, self.token = view, metrics, token
        self.stopping = threading.Event()
        self.event_slots = threading.Semaphore(MAX_EVENT_CLIENTS)
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)

    def start(self) -> None:  # noqa: D102
        self._thread.start()

    def stop(self) -> None:  # noqa: D102
        self.stopping.set()
        self.view.wake()  # event streams waiting for a change see the stop
        self.shutdown()
        self.server_close()
