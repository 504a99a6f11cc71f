"""The daemon's Prometheus metrics, through ``prometheus-client``.

One :class:`~prometheus_client.CollectorRegistry` per :class:`Metrics` (a service, a ``process``
run, a test), holding the daemon's counters, gauges and histograms plus the library's process,
platform and garbage-collector collectors. The ``[http]`` server (:mod:`daemon.web.server`)
serves it at ``/metrics`` with :func:`prometheus_client.generate_latest`. Metric names are the
ones the daemon always had (``_total`` counters, ``_seconds`` durations).
"""

from __future__ import annotations

from typing import Any

import prometheus_client as prom

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = prom.CONTENT_TYPE_LATEST


class Family:
    """One metric in the daemon's call style, ``m.frames_in.inc(source="zmq0")``.

    prometheus-client wants ``.labels(...).inc()``; its registry has no per-metric read-back
    but :meth:`~prometheus_client.CollectorRegistry.get_sample_value`, which the shutdown log
    line and the tests use through :meth:`value` and :meth:`total`.
    """

    def __init__(self, metric: Any, sample: str, registry: prom.CollectorRegistry) -> None:
        self.metric, self.sample, self.registry = metric, sample, registry

    def _child(self, labels: dict[str, str]) -> Any:
        return self.metric.labels(**labels) if labels else self.metric

    def inc(self, amount: float = 1.0, **labels: str) -> None:  # noqa: D102
        self._child(labels).inc(amount)

    def set(self, value: float, **labels: str) -> None:  # noqa: D102
        self._child(labels).set(value)

    def observe(self, value: float, **labels: str) -> None:  # noqa: D102
        self._child(labels).observe(value)

    def value(self, **labels: str) -> float:
        """The count (a histogram's ``_count``) or value of one label set; 0 when unseen."""
        return self.registry.get_sample_value(self.sample, labels) or 0.0

    def total(self) -> float:
        """Sum over all label sets."""
        return sum(
            s.value for m in self.metric.collect() for s in m.samples if s.name == self.sample
        )


class Metrics:
    """The daemon's metrics and their registry, one per service instance."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        for collector in (prom.ProcessCollector, prom.PlatformCollector, prom.GCCollector):
            collector(registry=self.registry)
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.frames_in = counter("magdr_frames_in_total", "Frames received", "source")
        self.frames_out = counter("magdr_frames_out_total", "Frames guarded, emitted", "source")
        self.frames_dropped = counter(
            "magdr_frames_dropped_total", "Frames dropped, by reason", "source", "reason"
        )
        self.sink_dropped = counter(
            "magdr_sink_dropped_total",
            "Messages a PUB sink could not send, by reason",
            "sink",
            "topic",
            "reason",
        )
        self.faces = counter("magdr_faces_total", "Faces guarded")
        self.disrupted = counter("magdr_disrupted_total", "Faces found disrupted")
        self.chains_reused = counter(
            "magdr_chains_reused_total", "Disrupted faces cured by the previous frame's chain"
        )
        self.bad_input = counter(
            "magdr_bad_input_total", "Malformed messages or failed files", "source", "reason"
        )
        self.files = counter("magdr_files_total", "Files finished, by outcome", "outcome")
        self.queue_depth = gauge("magdr_queue_depth", "Frames waiting", "queue")
        self.batch_size = histogram(
            "magdr_batch_faces", "Faces per guard call", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
        )
        self.guard_seconds = histogram("magdr_guard_seconds", "Guard call time per batch")
        self.latency = histogram(
            "magdr_frame_latency_seconds", "Frame receipt to emission", "source"
        )
        # [engine] backend = "ray": one label value per replica ("<node id>/<replica>")
        self.replica_batches = counter(
            "magdr_replica_batches_total", "Guard batches done by a Ray replica", "worker"
        )
        self.replica_faces = counter(
            "magdr_replica_faces_total", "Faces guarded by a Ray replica", "worker"
        )
        self.replica_seconds = histogram(
            "magdr_replica_batch_seconds", "Batch sent to result back, per Ray replica", "worker"
        )
        self.replica_queue = gauge(
            "magdr_replica_queue_depth", "Batches sent to a Ray replica and not back yet", "worker"
        )
        self.replica_retries = counter(
            "magdr_replica_retries_total",
            "Batches sent again to another replica after this one failed",
            "worker",
        )

    def _counter(self, name: str, doc: str, *labels: str) -> Family:
        # prometheus-client keeps the "_total" suffix off the family name and on the sample
        m = prom.Counter(name, doc, labels, registry=self.registry)
        return Family(m, name, self.registry)

    def _gauge(self, name: str, doc: str, *labels: str) -> Family:
        return Family(prom.Gauge(name, doc, labels, registry=self.registry), name, self.registry)

    def _histogram(
        self, name: str, doc: str, *labels: str, buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> Family:
        m = prom.Histogram(name, doc, labels, buckets=buckets, registry=self.registry)
        return Family(m, f"{name}_count", self.registry)

    def render(self) -> bytes:
        """The whole registry in the Prometheus text format."""
        return prom.generate_latest(self.registry)
