"""The daemon: a flat list of ``init_*`` / ``start_*`` steps, one stop event, a drain (Frigate).

Start-up (each step is small and logs what it did)::

    init_dirs -> init_engine (EXTEND_TIMEOUT_USEC while models load) -> init_pipeline
    -> init_sinks -> init_sources -> start_http -> start_sources -> start_workers
    -> start_watchdog -> READY=1

SIGTERM/SIGINT set the one stop event; :meth:`Service.stop` undoes the steps in reverse: stop
taking input, finish the file in progress and the queued frames (up to ``drain_timeout_s``;
an unfinished file stays claimed and is resumed at the next start), close the batcher, sinks
and sockets. SIGHUP reloads the config file: keys that can change live are applied, the others
are named in a warning (they need a restart). Once a minute the main loop hands the C heap's free
memory back to the OS (:func:`release_free_memory`), so RSS follows what is in use.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from daemon import logging as dlog
from daemon import media
from daemon.batching import Batcher
from daemon.config import PASTE_KEYS, Config, ConfigError, load_config
from daemon.engine import Engine
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.pipeline import (
    Aborted,
    FramePipeline,
    Guarded,
    frames_in_flight,
    process_file,
)
from daemon.ray_engine import EngineLost
from daemon.sinks.folder import FolderSink
from daemon.sinks.zmq import ZmqSink
from daemon.sources.folder import FolderSource
from daemon.sources.zmq import ZmqSource, stop_authenticator
from daemon.web.server import OperatorServer
from daemon.web.state import OperatorView

log = structlog.get_logger()

#: keys SIGHUP applies without a restart.
LIVE_KEYS = {
    "logging.level",
    "model.condition",
    "guard.batch_timeout_ms",
    "guard.batch_size",
    *(f"guard.{k}" for k in PASTE_KEYS),
    "daemon.rescan_s",
    "daemon.drain_timeout_s",
    "daemon.keep_inputs",
}

#: seconds between two returns of the heap's free memory to the OS (see release_free_memory).
TRIM_INTERVAL_S = 60.0


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> bool:
    """Give the free pages of the C heap back to the OS (glibc's ``malloc_trim``).

    Torch's CPU tensors live on the C heap, and after a burst of reconstructions glibc keeps
    the freed memory in its arenas: resident, reused, never returned, so RSS reads like a leak.
    Measured after a 5-minute soak in-process: 395 MiB free in the arenas, RSS 1083 -> 688 MiB
    on one trim. Returns False where there is no glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def build_pipeline(
    cfg: Config,
    metrics: Metrics,
    notifier: Notifier | None = None,
    on_lost: Callable[[str], None] | None = None,
) -> tuple[Engine, Batcher, FramePipeline]:
    """Load the models and start the batcher (shared by the daemon and ``process``).

    With ``[engine] backend = "ray"`` the guard runs on Ray replicas (``on_lost`` is called
    when none is left); this process keeps face location, paste-back and the sinks.
    """
    remote = None
    engine = Engine(cfg, local_guard=cfg.engine.backend == "local")
    guard_fn: Callable[..., Any] = engine.guard_faces
    if cfg.engine.backend == "ray":
        from daemon.ray_engine import RayEngine

        remote = RayEngine(cfg, metrics, on_lost)
        for name in ("profile_name", "purifier_name", "threshold"):  # for verdicts, summaries
            setattr(engine, name, remote.info[name])
        guard_fn = remote.submit

    def on_batch(rows: int, seconds: float) -> None:
        metrics.batch_size.observe(rows)
        metrics.guard_seconds.observe(seconds)

    batcher = Batcher(
        guard_fn,
        cfg.guard.batch_size,
        cfg.guard.batch_timeout_ms / 1e3,
        on_batch=on_batch,
        beat=(lambda grace=0.0: notifier.beat("batcher", grace)) if notifier else None,
        call_grace_s=cfg.daemon.max_batch_s,
    )
    batcher.start()
    return engine, batcher, FramePipeline(engine, batcher, metrics, remote)


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "condition":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class Service:
    """The ``magdr-guard run`` daemon.

    Args:
        cfg: the validated configuration.
        notifier: sd_notify sender (a fresh one reading ``$NOTIFY_SOCKET`` by default).
    """

    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.pipeline: FramePipeline | None = None
        self.folder_sink: FolderSink | None = None
        self.zmq_sinks: list[ZmqSink] = []
        self.folder_sources: list[FolderSource] = []
        self.zmq_sources: list[ZmqSource] = []
        outbox = next((s.path for s in cfg.sinks if s.kind == "folder"), None)
        # what the operator page shows; kept only when [http] serves it
        self.view = OperatorView(outbox) if cfg.http.enabled else None
        self.http_server: OperatorServer | None = None
        self.ctx: Any = None
        self._workers: list[threading.Thread] = []
        self._drain_deadline = float("inf")
        self._busy: dict[str, str] = {}
        self.fatal: str | None = None  # why the daemon stopped by itself (exit code 1)

    # ---- start-up -----------------------------------------------------------------------
    def init_dirs(self) -> None:  # noqa: D102
        Path(self.cfg.daemon.work_dir).mkdir(parents=True, exist_ok=True)

    def init_engine(self) -> None:
        """Load G, parser and profile; keep asking systemd for time while that runs."""
        loaded = threading.Event()

        def extend() -> None:
            while not loaded.wait(10):
                self.notifier.extend(30, "loading models")

        self.notifier.extend(30, "loading models")
        t = threading.Thread(target=extend, name="extend", daemon=True)
        t.start()
        try:
            self.engine, self.batcher, self.pipeline = build_pipeline(
                self.cfg, self.metrics, self.notifier, on_lost=self.engine_lost
            )
        finally:
            loaded.set()

    def init_sinks(self) -> None:  # noqa: D102
        import zmq

        self.ctx = zmq.Context()
        for s in self.cfg.sinks:
            if s.kind == "folder":
                self.folder_sink = FolderSink(s)
                self.folder_sink.start()
            else:
                self.zmq_sinks.append(ZmqSink(s, self.ctx, self.metrics))

    def init_sources(self) -> None:  # noqa: D102
        assert self.pipeline is not None
        for i, s in enumerate(self.cfg.sources):
            if s.kind == "folder":
                assert self.folder_sink is not None  # config rule
                self.folder_sources.append(
                    FolderSource(
                        i, s, self.cfg.daemon.work_dir, self.folder_sink, self.cfg.daemon.rescan_s
                    )
                )
            else:
                self.zmq_sources.append(
                    ZmqSource(
                        i,
                        s,
                        self.ctx,
                        self.pipeline,
                        self.emit,
                        self.metrics,
                        self.notifier,
                        self.cfg.guard.max_frame_pixels,
                        inflight=frames_in_flight(self.cfg),
                        view=self.view,
                    )
                )

    def start_http(self) -> None:
        """The operator page, its API and ``/metrics`` (``[http]``)."""
        h = self.cfg.http
        if self.view is not None:
            self.http_server = OperatorServer(self.view, self.metrics, h.host, h.port, h.token)
            self.http_server.start()
            host = f"[{h.host}]" if ":" in h.host else h.host
            log.info(
                "operator page",
                url=f"http://{host}:{self.http_server.port}/",
                metrics=f"http://{host}:{self.http_server.port}/metrics",
                token=bool(h.token),
            )

    def start_sources(self) -> None:  # noqa: D102
        for s in self.folder_sources:
            s.start()
        for z in self.zmq_sources:
            z.start()

    def start_workers(self) -> None:
        """One file worker per folder source (files go one at a time, frames in batches)."""
        for s in self.folder_sources:
            t = threading.Thread(
                target=self._file_worker, args=(s,), name=f"{s.name}-work", daemon=True
            )
            t.start()
            self._workers.append(t)

    def start_watchdog(self) -> None:  # noqa: D102
        if self.cfg.daemon.watchdog:
            threading.Thread(
                target=self.notifier.watchdog_loop,
                args=(self.stop_event,),
                name="watchdog",
                daemon=True,
            ).start()

    def start(self) -> None:
        """Every start-up step in order, then READY=1."""
        for line in self.cfg.deprecated:
            log.warning("deprecated config", detail=line)
        self.init_dirs()
        self.init_engine()
        self.init_sinks()
        self.init_sources()
        self.start_http()
        self.start_sources()
        self.start_workers()
        self.start_watchdog()
        self.notifier.ready("guarding")
        log.info("ready", sources=len(self.cfg.sources), sinks=len(self.cfg.sinks))

    # ---- running ------------------------------------------------------------------------
    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain and stop. Call from the main thread."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())
        try:
            self.start()
            next_trim = time.monotonic() + TRIM_INTERVAL_S
            while not self.stop_event.wait(0.5):
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    self.reload()
                self._update_gauges()
                if time.monotonic() >= next_trim:
                    release_free_memory()
                    next_trim = time.monotonic() + TRIM_INTERVAL_S
        finally:
            self.stop()
        if self.fatal:
            log.error("stopped on an error", error=self.fatal)
            return 1
        return 0

    def engine_lost(self, reason: str) -> None:
        """No guard replica is left: stop with an error.

        systemd restarts the daemon; a file in progress stays claimed and is resumed then.
        """
        self.fatal = f"guard engine lost: {reason}"
        self.stop_event.set()

    def emit(self, g: Guarded) -> None:
        """Send a guarded frame to every ZeroMQ sink (and the operator page)."""
        if self.view is not None:
            self.view.guarded(g)
        for s in self.zmq_sinks:
            try:
                s.publish(g)
            except Exception:  # a publishing problem never fails the file or the stream
                log.exception("zmq sink failed", stream=g.verdict.get("stream"))

    def _update_gauges(self) -> None:
        if self.batcher is not None:
            self.metrics.queue_depth.set(self.batcher.pending(), queue="batcher")
        if self.pipeline is not None and self.pipeline.remote is not None:
            self.metrics.queue_depth.set(self.pipeline.remote.pending(), queue="ray")
        for s in self.folder_sources:
            self.metrics.queue_depth.set(s.backlog(), queue=s.name)

    def _file_worker(self, src: FolderSource) -> None:
        beat = f"{src.name}-work"
        while not self.stop_event.is_set():
            self.notifier.beat(beat)
            job = src.next_file(0.5)
            if job is None:
                continue
            claimed, original = job
            with dlog.bound(source=src.name, file=original):
                self._busy[src.name] = original
                try:
                    self.guard_file(src, claimed, original)
                except Exception:  # e.g. a full disk while failing a file: keep the worker
                    log.exception("file left claimed after an error; retried at the next start")
                    self.metrics.files.inc(outcome="error")
                finally:
                    self._busy.pop(src.name, None)
        self.notifier.forget(beat)

    def guard_file(self, src: FolderSource, claimed: Path, original: str) -> None:
        """Guard one claimed file; it ends in the outbox, in failed/, or stays claimed."""
        assert self.pipeline is not None and self.folder_sink is not None
        sink, d = self.folder_sink, self.cfg.daemon
        keep = Path(d.work_dir) / "done" if d.keep_inputs else None
        if claimed.is_symlink() or not claimed.is_file():
            # a link could point anywhere (outside the inbox); only regular files are taken
            what = (
                f"a symbolic link to {os.readlink(claimed)}"
                if claimed.is_symlink()
                else "not a regular file"
            )
            self._failed(
                src,
                claimed,
                original,
                "not_regular",
                f"{original} is {what}; only regular files are guarded",
            )
            return
        done = sink.committed(claimed.stem)
        if (
            done
            and done.get("source", {}).get("size") == claimed.stat().st_size
            and done["source"].get("mtime_ns") == claimed.stat().st_mtime_ns
        ):
            log.info("outputs already committed; finishing the claim")
            src.done(claimed, keep)
            return
        t0 = time.monotonic()
        view = self.view
        if view is not None:
            view.job_started(claimed.stem, src.name, original)
        try:
            summary = process_file(
                claimed,
                claimed.stem,
                sink.path,
                self.pipeline,
                codec=sink.cfg.codec,
                crf=sink.cfg.crf,
                max_pixels=self.cfg.guard.max_frame_pixels,
                window=frames_in_flight(self.cfg),
                publish=self.emit if self.zmq_sinks or view else None,
                progress=lambda n: self._progress(src, claimed.stem, n),
                should_abort=lambda: time.monotonic() > self._drain_deadline,
                display_name=original,
                source=src.name,
                heartbeat=lambda: self.notifier.beat(f"{src.name}-work"),
            )
        except (Aborted, EngineLost) as e:
            log.warning(
                "stopped in the middle of a file; it stays claimed for the next start",
                reason=str(e),
            )
            if view is not None:
                view.job_finished(claimed.stem, "stopped")
            return
        except media.MediaError as e:
            self._failed(src, claimed, original, e.reason, str(e))
            return
        except Exception as e:  # anything else fails the file, never the daemon
            log.exception("file failed")
            reason = "out_of_memory" if type(e).__name__ == "OutOfMemoryError" else "error"
            self._failed(src, claimed, original, reason, f"{type(e).__name__}: {e}")
            return
        src.done(claimed, keep)
        self.metrics.files.inc(outcome="done")
        if view is not None:
            view.job_finished(claimed.stem, "done", summary)
        log.info(
            "file guarded",
            frames=summary["frames"],
            faces=summary["faces"],
            disrupted_faces=summary["disrupted_faces"],
            output=summary["outputs"]["media"],
            seconds=round(time.monotonic() - t0, 2),
        )

    def _progress(self, src: FolderSource, name: str, frames: int) -> None:
        self.notifier.beat(f"{src.name}-work")
        if self.view is not None:
            self.view.job_progress(name, frames)

    def _failed(
        self, src: FolderSource, claimed: Path, original: str, reason: str, message: str
    ) -> None:
        if self.view is not None:
            self.view.job_finished(claimed.stem, "failed", error=f"{reason}: {message}")
        self.metrics.bad_input.inc(source=src.name, reason=reason)
        self.metrics.files.inc(outcome="failed")
        where = src.fail(claimed, original, reason, message)
        log.error("file failed", reason=reason, error=message, error_file=str(where))

    def reload(self) -> None:
        """SIGHUP: re-read the config; apply the live keys, name the ones that need a restart."""
        self.notifier.send("RELOADING=1\nSTATUS=reloading config")
        try:
            new = load_config(self.cfg.path)
            assert self.engine is not None and self.batcher is not None
            new_cond = self.engine.condition(new.model.condition)
        except (ConfigError, KeyError) as e:
            log.error("config reload refused; keeping the running config", error=str(e))
            self.notifier.ready("guarding")
            return
        old_flat, new_flat = _flat(self.cfg.model_dump()), _flat(new.model_dump())
        changed = sorted(
            k for k in set(old_flat) | set(new_flat) if old_flat.get(k) != new_flat.get(k)
        )
        live = [k for k in changed if k in LIVE_KEYS]
        restart = [k for k in changed if k not in LIVE_KEYS]
        dlog.set_level(new.logging.level)
        self.engine.default_cond = new_cond
        for k in PASTE_KEYS:
            setattr(self.engine.cfg.guard, k, getattr(new.guard, k))
        self.batcher.batch_size = new.guard.batch_size
        self.batcher.timeout_s = new.guard.batch_timeout_ms / 1e3
        for k in ("rescan_s", "drain_timeout_s", "keep_inputs"):
            setattr(self.cfg.daemon, k, getattr(new.daemon, k))
        for s in self.folder_sources:
            s.rescan_s = new.daemon.rescan_s
        self.cfg.model.condition = new.model.condition
        log.info("config reloaded", applied=live)
        if restart:
            log.warning("changed keys need a restart to take effect", keys=restart)
        self.notifier.ready("guarding")

    # ---- stopping -----------------------------------------------------------------------
    def stop(self) -> None:
        """Undo the start-up in reverse and drain (bounded by ``drain_timeout_s``)."""
        self.stop_event.set()
        self.notifier.stopping("draining")
        timeout = self.cfg.daemon.drain_timeout_s
        self._drain_deadline = time.monotonic() + timeout
        self.notifier.extend(timeout + 10, "draining")
        log.info("stopping", drain_timeout_s=timeout, files_in_progress=list(self._busy.values()))
        for z in self.zmq_sources:
            z.stop_receiving()
        for s in self.folder_sources:
            s.stop()
        for t in self._workers:
            t.join(max(0.0, self._drain_deadline - time.monotonic()) + 5)
        for z in self.zmq_sources:
            z.drain(max(0.0, self._drain_deadline - time.monotonic()))
        if self.pipeline is not None:
            self.pipeline.close(max(1.0, self._drain_deadline - time.monotonic()))
        for s in self.zmq_sinks:
            s.close()
        if self.folder_sink is not None:
            self.folder_sink.close()
        if self.ctx is not None:
            stop_authenticator(self.ctx)
            self.ctx.destroy(linger=0)
        if self.http_server is not None:
            self.http_server.stop()
        log.info(
            "stopped",
            frames_out=self.metrics.frames_out.total(),
            dropped=self.metrics.frames_dropped.total(),
            bad_input=self.metrics.bad_input.total(),
        )
