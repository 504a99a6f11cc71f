from __future__ import annotations

import pytest

from daemon.metrics import Metrics


def test_names_and_exposition():
    m = Metrics()
    m.frames_in.inc(source='a"b')
    m.frames_in.inc(2, source="zmq0")
    m.frames_dropped.inc(source="zmq0", reason="queue_full")
    m.faces.inc(3)
    m.queue_depth.set(5, queue="batcher")
    for v in (0.004, 0.3, 40.0):
        m.latency.observe(v, source="zmq0")
    text = m.render().decode()
    assert "# TYPE magdr_frames_in_total counter" in text
    assert 'magdr_frames_in_total{source="a\\"b"} 1.0' in text
    assert 'magdr_frames_in_total{source="zmq0"} 2.0' in text
    # prometheus-client writes label names in sorted order
    assert 'magdr_frames_dropped_total{reason="queue_full",source="zmq0"} 1.0' in text
    assert "magdr_faces_total 3.0" in text
    assert 'magdr_queue_depth{queue="batcher"} 5.0' in text
    assert 'magdr_frame_latency_seconds_bucket{le="0.005",source="zmq0"} 1.0' in text
    assert 'magdr_frame_latency_seconds_bucket{le="0.5",source="zmq0"} 2.0' in text
    assert 'magdr_frame_latency_seconds_bucket{le="+Inf",source="zmq0"} 3.0' in text
    assert 'magdr_frame_latency_seconds_count{source="zmq0"} 3.0' in text
    assert 'magdr_batch_faces_bucket{le="128.0"} 0.0' in text
    # the library's collectors: this process's memory and CPU, the interpreter, the GC
    for name in ("process_resident_memory_bytes", "python_info", "python_gc_objects_collected"):
        assert name in text, name


def test_read_back_and_label_checks():
    m = Metrics()
    m.bad_input.inc(source="zmq0", reason="bad_json")
    m.bad_input.inc(2, source="zmq1", reason="too_large")
    m.guard_seconds.observe(0.2)
    assert m.bad_input.value(source="zmq1", reason="too_large") == 2
    assert m.bad_input.value(source="zmq9", reason="none") == 0
    assert m.bad_input.total() == 3 and m.guard_seconds.value() == 1
    with pytest.raises(ValueError):
        m.frames_in.inc(-1, source="zmq0")
    with pytest.raises(ValueError):
        m.frames_in.inc(source="zmq0", other="x")
    # one registry per instance: two services in one process do not share counts
    assert Metrics().bad_input.total() == 0
