from __future__ import annotations

import threading
import time

import pytest
import torch

from daemon.batching import Batcher
from tests.daemon.helpers import wait_until


class Recorder:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls: list[int] = []
        self.delay, self.fail = delay, fail

    def __call__(self, x, c):
        self.calls.append(x.shape[0])
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        return x * 2, [{"i": float(v)} for v in x[:, 0, 0, 0]]


def _x(n: int, v: float) -> torch.Tensor:
    return torch.full((n, 3, 2, 2), v)


def test_full_batch_goes_without_waiting():
    rec = Recorder()
    b = Batcher(rec, batch_size=4, timeout_s=5.0)
    b.start()
    t0 = time.monotonic()
    futs = [b.submit(_x(2, i), torch.zeros(2, 5)) for i in range(2)]
    rows, per = futs[1].result(2)
    assert time.monotonic() - t0 < 2.0  # did not wait for the 5 s timeout
    assert rec.calls == [4]
    assert torch.equal(rows, _x(2, 2.0)) and per == [{"i": 1.0}, {"i": 1.0}]
    b.close(2)


def test_partial_batch_goes_after_timeout_and_order_is_kept():
    rec = Recorder()
    b = Batcher(rec, batch_size=100, timeout_s=0.05)
    b.start()
    futs = [b.submit(_x(1, i), torch.zeros(1, 5)) for i in range(5)]
    out = [f.result(2)[1][0]["i"] for f in futs]
    assert out == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sum(rec.calls) == 5
    b.close(2)


def test_oversized_item_and_carry():
    rec = Recorder()
    b = Batcher(rec, batch_size=4, timeout_s=0.05)
    b.start()
    f1 = b.submit(_x(3, 1), torch.zeros(3, 5))
    f2 = b.submit(_x(3, 2), torch.zeros(3, 5))  # does not fit: next batch
    f3 = b.submit(_x(9, 3), torch.zeros(9, 5))  # larger than a batch: goes alone
    for f in (f1, f2, f3):
        f.result(2)
    assert rec.calls == [3, 3, 9]
    b.close(2)


def test_failure_fails_only_its_batch():
    rec = Recorder(fail=True)
    b = Batcher(rec, batch_size=2, timeout_s=0.01)
    b.start()
    with pytest.raises(RuntimeError, match="boom"):
        b.submit(_x(1, 0), torch.zeros(1, 5)).result(2)
    rec.fail = False
    assert b.submit(_x(1, 0), torch.zeros(1, 5)).result(2)[0].shape == (1, 3, 2, 2)
    b.close(2)


def test_close_drains_everything():
    rec = Recorder(delay=0.02)
    b = Batcher(rec, batch_size=2, timeout_s=0.5)
    b.start()
    futs = [b.submit(_x(1, i), torch.zeros(1, 5)) for i in range(7)]
    b.close(5)
    assert all(f.done() and not f.exception() for f in futs)
    with pytest.raises(RuntimeError):
        b.submit(_x(1, 0), torch.zeros(1, 5))


def test_streams_share_batches():
    rec = Recorder()
    b = Batcher(rec, batch_size=8, timeout_s=0.2)
    b.start()
    go = threading.Barrier(2)
    futs = []

    def stream(v):
        go.wait()
        futs.extend(b.submit(_x(1, v), torch.zeros(1, 5)) for _ in range(4))

    ts = [threading.Thread(target=stream, args=(v,)) for v in (1, 2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for f in futs:
        f.result(2)
    assert max(rec.calls) > 4  # at least one batch mixed both streams
    b.close(2)


def test_hints_ride_along_per_row_and_only_when_given():
    seen: list = []

    def fn(x, c, **kw):
        seen.append(kw.get("hints", "absent"))
        return x, [None] * x.shape[0]

    b = Batcher(fn, batch_size=5, timeout_s=5.0)
    b.start()
    futs = [b.submit(_x(2, 0), torch.zeros(2, 5), ["a", None]),
            b.submit(_x(1, 1), torch.zeros(1, 5)),
            b.submit(_x(2, 2), torch.zeros(2, 5), [None, "e"])]  # fmt: skip
    futs[-1].result(2)
    fut = b.submit(_x(5, 3), torch.zeros(5, 5))
    fut.result(2)
    b.close(2)
    assert seen == [["a", None, None, None, "e"], "absent"]


def test_fn_returning_a_future_batches_in_flight_finish_in_any_order():
    """The Ray engine's shape: ``fn`` returns at once; results land later, newest first."""
    from concurrent.futures import Future

    pending: list[tuple[Future, torch.Tensor]] = []

    def fn(x, c):
        f = Future()
        pending.append((f, x))
        return f

    seen: list[int] = []
    b = Batcher(fn, batch_size=2, timeout_s=5.0, on_batch=lambda rows, s: seen.append(rows))
    b.start()
    futs = [b.submit(_x(1, i), torch.zeros(1, 5)) for i in range(4)]
    assert wait_until(lambda: len(pending) == 2, 5)
    for f, x in reversed(pending):  # the second batch lands first
        f.set_result((x * 2, [{"i": float(v)} for v in x[:, 0, 0, 0]]))
    assert [f.result(2)[1][0]["i"] for f in futs] == [0.0, 1.0, 2.0, 3.0]
    assert seen == [2, 2]
    b.close(2)


def test_fn_future_failure_fails_its_items_only():
    from concurrent.futures import Future

    def fn(x, c):
        f = Future()
        if x[0, 0, 0, 0] == 0:
            f.set_exception(RuntimeError("replica gone"))
        else:
            f.set_result((x, [{}] * x.shape[0]))
        return f

    b = Batcher(fn, batch_size=1, timeout_s=0.01)
    b.start()
    bad, good = b.submit(_x(1, 0), torch.zeros(1, 5)), b.submit(_x(1, 1), torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match="replica gone"):
        bad.result(2)
    assert good.result(2)[1] == [{}]
    b.close(2)
