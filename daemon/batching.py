"""Cross-frame, cross-stream batcher: a batch goes when it is full or when a timeout passes.

Callers submit items of F rows (the faces of one frame) with :meth:`Batcher.submit` and get a
:class:`concurrent.futures.Future`; one worker thread concatenates items in arrival order until
``batch_size`` rows are collected or ``timeout_s`` has passed since the oldest waiting item, calls
``fn`` once, and splits its results back per item. An item larger than ``batch_size`` goes alone.
Batches are formed in FIFO order. ``fn`` may also return a :class:`~concurrent.futures.Future`
of its results (the Ray engine: several batches in flight on several replicas, finishing in any
order; ``fn`` itself blocks while they are all busy); the frame pipeline puts each stream's
frames back in order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

log = structlog.get_logger()

#: ``fn(x, c[, hints=...]) -> (rows, per_row)``: x ``(N, 3, S, S)``, c ``(N, c_dim)``, hints
#: one entry per row (only passed when some item has them); rows ``(N, ...)``. Or a Future of
#: ``(rows, per_row)``.
BatchFn = Callable[..., tuple[torch.Tensor, list[Any]] | Future]


@dataclass
class _Item:
    x: torch.Tensor
    c: torch.Tensor
    hints: list[Any] | None = None
    future: Future = field(default_factory=Future)
    t: float = field(default_factory=time.monotonic)


_STOP = object()


class Batcher:
    """Run ``fn`` on batches gathered across frames and streams.

    Args:
        fn: the batch function (the guard adapter).
        batch_size: rows per call (faces).
        timeout_s: longest wait of the oldest item before a partial batch goes.
        on_batch: called with ``(rows, seconds)`` after every call (metrics).
        beat: called on every loop turn (the watchdog's progress signal), and with
            ``grace=call_grace_s`` just before each call.
        call_grace_s: how long one call may run before the watchdog counts it as a stall.
    """

    def __init__(
        self,
        fn: BatchFn,
        batch_size: int,
        timeout_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        beat: Callable[..., None] | None = None,
        call_grace_s: float = 600.0,
    ) -> None:
        self.fn, self.batch_size, self.timeout_s = fn, batch_size, timeout_s
        self.on_batch, self.beat, self.call_grace_s = on_batch, beat, call_grace_s
        self._q: queue.Queue[Any] = queue.Queue()
        self._carry: _Item | None = None
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._closed = False

    def start(self) -> None:  # noqa: D102
        self._thread.start()

    def submit(self, x: torch.Tensor, c: torch.Tensor, hints: list[Any] | None = None) -> Future:
        """Queue F rows ``x`` ``(F, ...)`` with conditions ``c`` ``(F, c_dim)`` (and F hints)."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        item = _Item(x, c, hints)
        self._q.put(item)
        return item.future

    def wait(
        self, fut: Future, timeout: float | None = None, tick: Callable[[], None] | None = None
    ) -> Any:
        """``fut.result()``, but raise instead of hanging if the worker thread is gone.

        ``tick`` is called about twice a second while waiting (the waiter's own heartbeat: it
        is alive, the batcher's heartbeat says whether the batch is progressing).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return fut.result(timeout=0.5)
            except TimeoutError:
                if tick:
                    tick()
                if not self._thread.is_alive() and not fut.done():
                    raise RuntimeError("the batcher thread is gone") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise

    def pending(self) -> int:
        """Items waiting (queue depth)."""
        return self._q.qsize() + (self._carry is not None)

    def close(self, timeout: float | None = None) -> None:
        """Finish every item already submitted, then stop the worker (drain)."""
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout)

    def _next(self, timeout: float) -> Any:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return self._q.get(timeout=timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            if self.beat:
                self.beat()
            try:
                first = self._next(0.5)
            except queue.Empty:
                continue
            if first is _STOP:
                break
            items, rows = [first], first.x.shape[0]
            while rows < self.batch_size:
                left = first.t + self.timeout_s - time.monotonic()
                try:
                    item = self._next(max(left, 0.0)) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True  # finish this batch, then stop
                    break
                if rows + item.x.shape[0] > self.batch_size:
                    self._carry = item
                    break
                items.append(item)
                rows += item.x.shape[0]
            self._call(items)
        if self._carry is not None:  # a carried item never waits on a stop
            self._call([self._carry])
            self._carry = None

    def _call(self, items: list[_Item]) -> None:
        if self.beat:
            self.beat(grace=self.call_grace_s)
        t0 = time.monotonic()
        try:
            x, c = torch.cat([i.x for i in items]), torch.cat([i.c for i in items])
            if any(i.hints is not None for i in items):
                hints = [h for i in items for h in (i.hints or [None] * i.x.shape[0])]
                result = self.fn(x, c, hints=hints)
            else:
                result = self.fn(x, c)
        except torch.OutOfMemoryError as e:
            # magdr.Guard already split down to one face; what escapes is retried per frame,
            # so that only the frame(s) that cannot fit fail, each with this error
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(items) > 1:
                log.warning(
                    "out of memory on a batch: retrying it in halves",
                    frames=len(items),
                    faces=sum(i.x.shape[0] for i in items),
                )
                h = len(items) // 2
                self._call(items[:h])
                self._call(items[h:])
                return
            log.error(
                "out of memory on one frame: the frame fails",
                faces=items[0].x.shape[0],
                error=str(e)[:200],
            )
            items[0].future.set_exception(e)
            return
        except Exception as e:  # a failing batch fails its frames, never the daemon
            log.exception("guard batch failed", faces=sum(i.x.shape[0] for i in items))
            _fail(items, e)
            return
        if isinstance(result, Future):
            result.add_done_callback(lambda f: self._landed(items, f, t0))
        else:
            self._split(items, *result, t0)

    def _landed(self, items: list[_Item], fut: Future, t0: float) -> None:
        """A batch handed to ``fn`` as a future finished (on the engine's own thread)."""
        try:
            rows, per_row = fut.result()
        except Exception as e:
            log.error(
                "guard batch failed",
                faces=sum(i.x.shape[0] for i in items),
                error=f"{type(e).__name__}: {e}"[:500],
            )
            _fail(items, e)
            return
        self._split(items, rows, per_row, t0)

    def _split(self, items: list[_Item], rows: torch.Tensor, per_row: list[Any], t0: float) -> None:
        """Hand each item its rows of the batch's results."""
        if self.on_batch:
            self.on_batch(rows.shape[0], time.monotonic() - t0)
        start = 0
        for i in items:
            n = i.x.shape[0]
            i.future.set_result((rows[start : start + n], per_row[start : start + n]))
            start += n


def _fail(items: list[_Item], error: Exception) -> None:
    for i in items:
        i.future.set_exception(error)
