from __future__ import annotations

import urllib.request

import pytest

from daemon.metrics import Counter, Histogram, Metrics, MetricsServer


def test_counter_text():
    c = Counter("x_total", "Things", ["source"])
    c.inc(source='a"b')
    c.inc(2, source="c")
    assert c.render() == ["# HELP x_total Things", "# TYPE x_total counter",
                          'x_total{source="a\\"b"} 1', 'x_total{source="c"} 2']
    with pytest.raises(ValueError):
        c.inc(-1, source="c")
    with pytest.raises(ValueError):
        c.inc(source="c", other="d")


def test_histogram_cumulative():
    h = Histogram("lat_seconds", "Latency", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    lines = h.render()
    assert 'lat_seconds_bucket{le="0.1"} 1' in lines
    assert 'lat_seconds_bucket{le="1"} 2' in lines
    assert 'lat_seconds_bucket{le="+Inf"} 3' in lines
    assert "lat_seconds_count 3" in lines and "lat_seconds_sum 5.55" in lines


def test_http_endpoint():
    m = Metrics()
    m.frames_in.inc(source="zmq0")
    m.frames_dropped.inc(source="zmq0", reason="queue_full")
    srv = MetricsServer(m, "127.0.0.1", 0)
    srv.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'magdr_frames_in_total{source="zmq0"} 1' in body
        assert 'magdr_frames_dropped_total{reason="queue_full",source="zmq0"}' not in body
        assert 'magdr_frames_dropped_total{source="zmq0",reason="queue_full"} 1' in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/nope", timeout=5)
    finally:
        srv.stop()
