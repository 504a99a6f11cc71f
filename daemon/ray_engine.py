"""The guard on a Ray cluster (``[engine] backend = "ray"``): replicas fed batches, none lost.

:class:`RayEngine` starts or joins Ray and places ``replicas`` :class:`GuardReplica` actors, each
an :class:`~daemon.engine.Engine` in its own process (G, the parser and the profile loaded once;
:meth:`~daemon.engine.Engine.guard_faces` stays the one adapter to ``magdr``), so verdicts are
the local backend's. The batcher hands every batch to :meth:`RayEngine.submit`, which sends it
to the least busy replica and returns a future; it blocks while every replica already has
``max_inflight`` batches (backpressure up to the sources).

Faults: a replica that dies (its process killed, its node lost) fails its batches with a
``RayActorError``; they are sent again to another replica, and the dead one is probed: Ray
restarts a crashed replica (``max_restarts=-1``) and it takes batches again once it answers; one
killed for good stays out. When no replica is left, or Ray itself is gone, every batch fails
with :class:`EngineLost` and ``on_lost`` is called once: the daemon stops with that error and a
file in progress stays claimed, to be resumed at the next start.

Ray Core actors rather than Ray Serve: the daemon already batches across frames and streams
(``daemon/batching.py``) and needs per-batch retries and backpressure that it controls; Serve
adds an HTTP proxy and controller processes the daemon would not use (``docs/deploy.md``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from daemon.config import PASTE_KEYS, Config
from daemon.metrics import Metrics

if TYPE_CHECKING:  # torch is heavy; the CLI imports this module for its error type
    import torch

log = structlog.get_logger()

#: Longest wait for the replicas to load their models at start-up.
START_TIMEOUT_S = 300.0


class EngineError(RuntimeError):
    """The Ray engine cannot start: Ray missing or unreachable, replicas that cannot be placed."""


class EngineLost(EngineError):
    """No replica can guard any more (all dead, or the Ray cluster is gone)."""


class GuardReplica:
    """One guard worker: the local engine inside a Ray actor (wrapped by :class:`RayEngine`).

    Args:
        cfg: the daemon's configuration.
        index: the replica's number, for its worker name.
    """

    def __init__(self, cfg: Config, index: int) -> None:
        import ray

        from daemon import logging as dlog
        from daemon.engine import Engine

        dlog.configure(cfg.logging.level, "json")  # into the Ray worker's log file
        self.engine = Engine(cfg)
        self.name = f"{ray.get_runtime_context().get_node_id()}/{index}"

    def info(self) -> dict[str, Any]:
        """The worker's name and what it guards with (for the verdicts)."""
        e = self.engine
        return {
            "worker": self.name,
            "profile_name": e.profile_name,
            "purifier_name": e.purifier_name,
            "threshold": e.threshold,
        }

    def guard(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        hints: list[Any] | None = None,
        paste: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, list[dict]]:
        """:meth:`Engine.guard_faces`, each face's verdict naming this worker.

        ``paste``: the daemon's live ``[guard]`` keys of what goes back into the frame
        (``daemon.config.PASTE_KEYS``); they come with every batch, so a SIGHUP
        reload reaches the replicas (an actor runs one call at a time).
        """
        for k, v in (paste or {}).items():
            setattr(self.engine.cfg.guard, k, v)
        faces, per = self.engine.guard_faces(x, c, hints)
        for p in per:
            p["worker"] = self.name
        return faces, per


@dataclass
class _Replica:
    index: int
    actor: Any
    name: str = ""
    up: bool = False  # answering; takes new batches
    probing: bool = False  # died once; waiting to hear whether Ray restarted it
    inflight: int = 0


@dataclass
class _Batch:
    x: torch.Tensor
    c: torch.Tensor
    hints: list[Any] | None
    out: Future = field(default_factory=Future)
    tried: set[int] = field(default_factory=set)
    t0: float = field(default_factory=time.monotonic)


class RayEngine:
    """Guard replicas on Ray, and the batch dispatch to them.

    Args:
        cfg: the configuration (``[engine]`` says where and how many).
        metrics: the daemon's metrics (per-replica batches, faces, latency, queue depth).
        on_lost: called once with the reason when no replica is left.

    Raises:
        EngineError: Ray is not installed, cannot be reached, or cannot place the replicas.
    """

    def __init__(
        self, cfg: Config, metrics: Metrics, on_lost: Callable[[str], None] | None = None
    ) -> None:
        try:
            import ray
        except ImportError:
            raise EngineError(
                "[engine] backend = 'ray' needs Ray: pip install 'magdr-guard[ray]'"
            ) from None
        self.ray, self.cfg, self.metrics, self.on_lost = ray, cfg.engine, metrics, on_lost
        self.guard_cfg = cfg.guard  # the live paste-back keys are read from it per batch
        self.lost: str | None = None
        self.replicas: list[_Replica] = []
        self._cond = threading.Condition()
        self._parked: deque[_Batch] = deque()  # batches waiting for a replica being probed
        self._refs: dict[Any, Callable[[Any], None]] = {}  # calls in flight -> their handler
        self._closing = False
        self._turn = 0  # the replica a tie goes to
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            self._connect()
        try:
            self._check_resources()
            actor = ray.remote(GuardReplica).options(
                num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus, max_restarts=-1
            )
            self.replicas = [_Replica(i, actor.remote(cfg, i)) for i in range(self.cfg.replicas)]
            infos = ray.get([r.actor.info.remote() for r in self.replicas], timeout=START_TIMEOUT_S)
        except BaseException as e:
            self._shutdown()
            if isinstance(e, ray.exceptions.RayError):  # the traceback's last line says why
                why = [line for line in str(e).splitlines() if line.strip()][-1:]
                raise EngineError(
                    f"engine: the Ray replicas did not start: {why[0] if why else type(e).__name__}"
                ) from None
            raise
        for r, info in zip(self.replicas, infos, strict=True):
            r.name, r.up = info["worker"], True
            self.metrics.replica_queue.set(0, worker=r.name)
        self.info = infos[0]
        self._collector = threading.Thread(target=self._collect, name="ray-collect", daemon=True)
        self._collector.start()
        log.info(
            "ray replicas ready",
            workers=[r.name for r in self.replicas],
            num_cpus=self.cfg.num_cpus,
            num_gpus=self.cfg.num_gpus,
        )

    # ---- start-up -----------------------------------------------------------------------
    def _connect(self) -> None:
        a = self.cfg.address
        kw: dict[str, Any] = {
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "namespace": "magdr-guard",
        }
        if a == "":  # a private instance, reachable from this machine only
            kw.update(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
        else:
            kw.update(address=a)
        try:
            self.ray.init(**kw)
        except Exception as e:  # ConnectionError, a bad address, an auth token mismatch
            raise EngineError(
                f"engine.address: cannot reach Ray at {a or 'a new instance'}: "
                f"{type(e).__name__}: {e}"
            ) from None
        log.info("ray connected", address=a or "local", resources=self.ray.cluster_resources())

    def _check_resources(self) -> None:
        """Replicas that can never be placed would wait forever: say so at start-up."""
        have, e = self.ray.cluster_resources(), self.cfg
        for res, per in (("CPU", e.num_cpus), ("GPU", e.num_gpus)):
            if e.replicas * per > have.get(res, 0.0):
                raise EngineError(
                    f"engine: {e.replicas} replicas x {per:g} {res} need {e.replicas * per:g} "
                    f"{res}s; the Ray cluster has {have.get(res, 0.0):g} (lower [engine] "
                    f"replicas or num_{res.lower()}s, or add nodes)"
                )

    # ---- dispatch -----------------------------------------------------------------------
    def submit(self, x: torch.Tensor, c: torch.Tensor, hints: list[Any] | None = None) -> Future:
        """Send a batch to the least busy replica; waits while all have ``max_inflight``.

        Returns:
            A future of ``(faces, per_face)`` as :meth:`Engine.guard_faces` returns them, each
            face's dict with a ``"worker"``; or of :class:`EngineLost`.
        """
        b = _Batch(x, c, hints)
        with self._cond:
            while self.lost is None and not any(
                r.up and r.inflight < self.cfg.max_inflight for r in self.replicas
            ):
                self._cond.wait(0.5)
        self._send(b)
        return b.out

    def _pick(self, b: _Batch) -> _Replica | None:
        """The least busy replica that is up (ties go round), not one the batch failed on."""
        up = [r for r in self.replicas if r.up]
        fresh = [r for r in up if r.index not in b.tried] or up
        n = len(self.replicas)
        r = min(fresh, key=lambda r: (r.inflight, (r.index - self._turn) % n), default=None)
        if r is not None:
            self._turn = r.index + 1
        return r

    def _send(self, b: _Batch) -> None:
        with self._cond:
            if self.lost is not None:
                b.out.set_exception(EngineLost(self.lost))
                return
            r = self._pick(b)
            if r is None:  # every replica is being probed: wait for one
                self._parked.append(b)
                return
            r.inflight += 1
            self.metrics.replica_queue.set(r.inflight, worker=r.name)
            paste = {k: getattr(self.guard_cfg, k) for k in PASTE_KEYS}
            self._call(
                r.actor.guard, (b.x, b.c, b.hints, paste), lambda ref: self._landed(r, b, ref)
            )

    def _call(self, method: Any, args: tuple, handler: Callable[[Any], None]) -> None:
        """Call a replica method; ``handler(ref)`` runs on the collector thread when it ends."""
        with self._cond:
            try:
                self._refs[method.remote(*args)] = handler
            except Exception as e:  # the Ray connection itself is gone
                self._refs[_Raises(e)] = handler
            self._cond.notify_all()

    def _collect(self) -> None:
        """The one thread that waits on Ray and runs the handlers (retries, results)."""
        while True:
            with self._cond:
                if self._closing and not self._refs:
                    return
                if not self._refs:
                    self._cond.wait(0.2)
                    continue
                refs = list(self._refs)
            failed = [r for r in refs if isinstance(r, _Raises)]
            try:
                ready = (
                    failed
                    or self.ray.wait(
                        [r for r in refs if not isinstance(r, _Raises)], num_returns=1, timeout=0.1
                    )[0]
                )
            except Exception as e:  # Ray itself is gone
                self._lose(f"Ray stopped answering: {type(e).__name__}: {e}"[:300])
                ready = refs
            for ref in ready:
                with self._cond:
                    handler = self._refs.pop(ref, None)  # None: dropped by close()
                if handler is not None:
                    handler(ref)

    def _result(self, ref: Any) -> Any:
        if isinstance(ref, _Raises):
            raise ref.error
        return self.ray.get(ref, timeout=10)

    def _landed(self, r: _Replica, b: _Batch, ref: Any) -> None:
        exc = self.ray.exceptions
        with self._cond:
            r.inflight -= 1
            self.metrics.replica_queue.set(r.inflight, worker=r.name)
            self._cond.notify_all()
        try:
            faces, per = self._result(ref)
        except exc.RayTaskError as e:  # the guard itself raised: the batch fails, as locally
            b.out.set_exception(e.as_instanceof_cause())
            return
        except Exception as e:  # the replica or Ray failed, not the batch: send it again
            self._retry(r, b, e)
            return
        self.metrics.replica_batches.inc(worker=r.name)
        self.metrics.replica_faces.inc(b.x.shape[0], worker=r.name)
        self.metrics.replica_seconds.observe(time.monotonic() - b.t0, worker=r.name)
        b.out.set_result((faces, per))

    def _retry(self, r: _Replica, b: _Batch, e: Exception) -> None:
        log.warning(
            "ray replica failed; its batch goes to another replica",
            worker=r.name,
            faces=b.x.shape[0],
            error=f"{type(e).__name__}: {e}"[:300],
        )
        self.metrics.replica_retries.inc(worker=r.name)
        b.tried.add(r.index)
        self._down(r)
        with self._cond:
            # Every replica failed on this batch and one is back: the batch kills replicas.
            poison = len(b.tried) >= len(self.replicas) and any(x.up for x in self.replicas)
        if poison:
            b.out.set_exception(RuntimeError(f"the batch failed on every replica: {e}"))
        else:
            self._send(b)

    # ---- replica health -----------------------------------------------------------------
    def _down(self, r: _Replica) -> None:
        """Take ``r`` out of the rotation and ask it whether Ray brought it back."""
        with self._cond:
            if not r.up:
                return
            r.up, r.probing = False, True
            self._call(r.actor.info, (), lambda ref: self._probed(r, ref))

    def _probed(self, r: _Replica, ref: Any) -> None:
        try:
            info = self._result(ref)
        except Exception as e:
            log.error("ray replica gone", worker=r.name, error=f"{type(e).__name__}: {e}"[:300])
            info = None
        with self._cond:
            r.probing = False
            if info is not None:
                r.name, r.up = info["worker"], True
                log.info("ray replica back", worker=r.name)
            gone = not any(x.up or x.probing for x in self.replicas)
            parked = [] if gone else list(self._parked)  # if gone, _lose fails them
            if not gone:
                self._parked.clear()
            self._cond.notify_all()
        if gone:
            self._lose(
                f"no Ray replica left of {len(self.replicas)} (the cluster at "
                f"{self.cfg.address or 'this machine'} is gone, or every replica died)"
            )
        for b in parked:
            self._send(b)

    def _lose(self, reason: str) -> None:
        """No replica can guard any more: fail what waits, tell the daemon once."""
        with self._cond:
            if self.lost is not None:
                return
            self.lost = reason
            parked = list(self._parked)
            self._parked.clear()
            self._cond.notify_all()
        log.error("guard engine lost", error=reason)
        for b in parked:
            b.out.set_exception(EngineLost(reason))
        if self.on_lost is not None:
            self.on_lost(reason)

    # ---- stopping -----------------------------------------------------------------------
    def pending(self) -> int:
        """Batches sent and not back yet, plus those waiting for a replica."""
        with self._cond:
            return sum(r.inflight for r in self.replicas) + len(self._parked)

    def close(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout``) for the batches in flight, then end the replicas."""
        deadline = time.monotonic() + (30.0 if timeout is None else timeout)
        with self._cond:
            while self.pending() and self.lost is None and time.monotonic() < deadline:
                self._cond.wait(0.2)
            self._closing = True
            self._refs.clear()
            self._cond.notify_all()
        self._collector.join(1)  # a dead cluster can hold it in ray.wait; it is a daemon thread
        self._shutdown()

    def _shutdown(self) -> None:
        for r in self.replicas:
            try:
                self.ray.kill(r.actor)
            except Exception:  # already gone with its node or the cluster
                pass
        if self._own_ray:
            self.ray.shutdown()


@dataclass(eq=False)
class _Raises:
    """Stands in for the reference of a call that could not even be sent."""

    error: Exception
