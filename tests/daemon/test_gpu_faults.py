"""GPU faults at the daemon level, forced on the CPU: an out-of-memory error that escapes
``magdr.Guard`` (its own halving reached one face) is retried per frame by the daemon's batcher,
so only the frame that cannot fit fails — counted and logged — and the rest of its batch gets
verdicts; in a file it fails that file with reason ``out_of_memory``, and the daemon goes on."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
import zmq

from daemon import wire
from daemon.service import Service
from tests.daemon.helpers import (
    connect,
    folder_io,
    free_port,
    make_clip,
    wait_until,
    zmq_sink,
    zmq_source,
)

pytestmark = pytest.mark.slow


def poison_generator(svc: Service) -> list[tuple[int, bool]]:
    """Make G raise CUDA's out-of-memory error on any batch holding a white face (the GPU is
    the one thing mocked: the error is real, its cause is forced). Returns the call log
    ``[(batch rows, raised)]``."""
    G = svc.engine.G
    forward = G.forward
    calls: list[tuple[int, bool]] = []

    def oom_forward(x: torch.Tensor, *args, **kw):
        white = x.flatten(1).mean(1) > 0.95
        calls.append((x.shape[0], bool(white.any())))
        if white.any():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (forced)")
        return forward(x, *args, **kw)

    G.forward = oom_forward
    return calls


@pytest.fixture
def make_service(service):
    """Guard on, and batches wait up to 300 ms to fill, so poisoned and clean frames share one."""
    return lambda body: service(body, guard=True, batch_timeout_ms=300)


def test_oom_on_one_frame_fails_only_that_frame(make_service, capsys):
    p_in, p_out = free_port(), free_port()
    svc = make_service(zmq_source(p_in, socket="pull", bind=True) + zmq_sink(p_out, frames=False))
    calls = poison_generator(svc)
    ctx = zmq.Context()
    sub = connect(ctx, zmq.SUB, p_out, SUBSCRIBE=b"verdict.", RCVTIMEO=20000)
    push = connect(ctx, zmq.PUSH, p_in)
    try:
        time.sleep(0.4)
        rng = np.random.default_rng(0)
        poison = {2, 5}
        for i in range(8):
            img = (
                np.full((32, 32, 3), 255, np.uint8)
                if i in poison
                else rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
            )
            push.send_multipart(wire.encode_frame("cam", i, img, "rgb24")[1:])
        got = []
        while len(got) < 8 - len(poison):
            got.append(json.loads(sub.recv_multipart()[1])["seq"])
        assert sorted(got) == [0, 1, 3, 4, 6, 7]
        m = svc.metrics
        assert wait_until(
            lambda: m.frames_dropped.value(source="zmq0", reason="guard_error") == 2, 10
        )
        assert m.frames_out.value(source="zmq0") == 6
        assert m.frames_in.value(source="zmq0") == 8
    finally:
        push.close(0)
        sub.close(0)
        ctx.term()
    # magdr.Guard halved its batch first (G sees each face with its K transformed copies,
    # stacked); each white face alone raised at the smallest size
    raised = [n for n, bad in calls if bad]
    one_face = min(n for n, _ in calls)
    assert max(raised) >= 4 * one_face and raised.count(one_face) >= 2, calls
    out = capsys.readouterr().out
    assert "out of memory on a batch: retrying it in halves" in out
    assert out.count("out of memory on one frame: the frame fails") == 2
    print(
        f"\ngpu faults: {len(calls)} G calls, {len(raised)} forced OOMs "
        f"(batch sizes {raised}); 2 frames failed and counted, 6 guarded"
    )


def test_oom_in_a_file_fails_that_file_and_the_daemon_goes_on(make_service, tmp_path):
    svc = make_service(folder_io(tmp_path))
    calls = poison_generator(svc)
    stage, inbox = tmp_path / "stage", tmp_path / "inbox"
    stage.mkdir()
    import cv2

    cv2.imwrite(str(stage / "white.png"), np.full((32, 32, 3), 255, np.uint8))
    make_clip(stage / "ok.mp4", frames=5, size=(32, 32))
    os.rename(stage / "white.png", inbox / "white.png")
    failed = tmp_path / "failed"
    assert wait_until(lambda: (failed / "white.png").exists(), 30)
    err = json.loads((failed / "white.error.json").read_text())
    assert err["reason"] == "out_of_memory" and "OutOfMemoryError" in err["error"]
    os.rename(stage / "ok.mp4", inbox / "ok.mp4")
    assert wait_until(lambda: (tmp_path / "outbox" / "ok.summary.json").exists(), 30)
    assert json.loads((tmp_path / "outbox" / "ok.summary.json").read_text())["frames"] == 5
    assert svc.metrics.bad_input.value(source="folder0", reason="out_of_memory") == 1
    assert any(bad for _, bad in calls)
