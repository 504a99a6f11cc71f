"""Prometheus metrics in the text exposition format (0.0.4), served over ``http.server``.

No dependency: three metric types (counter, gauge, histogram) with labels, one registry, and a
``/metrics`` endpoint bound to 127.0.0.1 by default. Names follow Prometheus conventions
(``_total`` for counters, ``_seconds`` for durations).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    return "+Inf" if v == float("inf") else repr(float(v)) if v != int(v) else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            got = sorted(labels)
            raise ValueError(f"{self.name}: expected labels {self.label_names}, got {got}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:  # noqa: D102
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:  # noqa: D102
        if amount < 0:
            raise ValueError("counters only go up")
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels: str) -> float:  # noqa: D102
        return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        """Sum over all label sets (for summaries and tests)."""
        with self._lock:
            return sum(self._values.values())

    def render(self) -> list[str]:  # noqa: D102
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [
            f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items
        ]


class Gauge(Counter):
    """A value that goes up and down (queue depth)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:  # noqa: D102
        k = self._key(labels)
        with self._lock:
            self._values[k] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:  # noqa: D102
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount


class Histogram(_Metric):
    """Cumulative-bucket histogram (``_bucket``, ``_sum``, ``_count``)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple[str, ...], list[float]] = {}  # counts per bucket + [sum, count]

    def observe(self, value: float, **labels: str) -> None:  # noqa: D102
        k = self._key(labels)
        with self._lock:
            d = self._data.setdefault(k, [0.0] * (len(self.buckets) + 2))
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                d[i] += 1
            d[-2] += value
            d[-1] += 1

    def count(self, **labels: str) -> float:  # noqa: D102
        d = self._data.get(self._key(labels))
        return d[-1] if d else 0.0

    def render(self) -> list[str]:  # noqa: D102
        out = self.header()
        with self._lock:
            items = sorted((k, list(d)) for k, d in self._data.items())
        for k, d in items:
            acc = 0.0
            for b, c in zip(self.buckets, d, strict=False):
                acc += c
                le = _labels(self.label_names, k, 'le="' + _num(b) + '"')
                out.append(f"{self.name}_bucket{le} {_num(acc)}")
            le = _labels(self.label_names, k, 'le="+Inf"')
            out.append(f"{self.name}_bucket{le} {_num(d[-1])}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_num(d[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {_num(d[-1])}")
        return out


class Metrics:
    """The daemon's metrics, one registry per service instance."""

    def __init__(self) -> None:
        self.frames_in = Counter("magdr_frames_in_total", "Frames received", ["source"])
        self.frames_out = Counter("magdr_frames_out_total", "Frames guarded, emitted",
                                  ["source"])
        self.frames_dropped = Counter(
            "magdr_frames_dropped_total", "Frames dropped, by reason", ["source", "reason"]
        )
        self.sink_dropped = Counter(
            "magdr_sink_dropped_total", "Messages a PUB sink could not send, by reason",
            ["sink", "topic", "reason"],
        )
        self.faces = Counter("magdr_faces_total", "Faces guarded")
        self.disrupted = Counter("magdr_disrupted_total", "Faces found disrupted")
        self.chains_reused = Counter(
            "magdr_chains_reused_total", "Disrupted faces cured by the previous frame's chain"
        )
        self.bad_input = Counter(
            "magdr_bad_input_total", "Malformed messages or failed files", ["source", "reason"]
        )
        self.files = Counter("magdr_files_total", "Files finished, by outcome", ["outcome"])
        self.queue_depth = Gauge("magdr_queue_depth", "Frames waiting", ["queue"])
        self.batch_size = Histogram("magdr_batch_faces", "Faces per guard call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.guard_seconds = Histogram("magdr_guard_seconds", "Guard call time per batch")
        self.latency = Histogram(
            "magdr_frame_latency_seconds", "Frame receipt to emission", ["source"]
        )

    def all(self) -> list[_Metric]:  # noqa: D102
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        """The whole registry in the Prometheus text format."""
        lines: list[str] = []
        for m in self.all():
            lines += m.render()
        return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on a background thread; ``port=0`` picks a free port."""

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 9464) -> None:
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes are not worth a log line
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       daemon=True)

    def start(self) -> None:  # noqa: D102
        self.thread.start()

    def stop(self) -> None:  # noqa: D102
        self.httpd.shutdown()
        self.httpd.server_close()
