"""sd_notify over ``$NOTIFY_SOCKET`` (systemd ``Type=notify``), without libsystemd.

The protocol is one AF_UNIX datagram per message, ``KEY=VALUE`` lines; a socket name that starts
with ``@`` is in the abstract namespace (a leading NUL byte). Outside systemd ``NOTIFY_SOCKET``
is unset and every call is a no-op.

The watchdog is pinged only while the pipeline makes progress: workers call
:meth:`Notifier.beat` from their loops, and :meth:`Notifier.watchdog_loop` sends ``WATCHDOG=1``
only when every registered loop has beaten within the watchdog period, so a hung guard call or a
dead thread lets systemd restart the service.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import structlog

log = structlog.get_logger()


def sd_notify(state: str, env: dict[str, str] | None = None) -> bool:
    r"""Send one notification; return whether a socket was there to take it.

    Args:
        state: newline-separated ``KEY=VALUE`` pairs, e.g. ``"READY=1\nSTATUS=running"``.
        env: the environment to read ``NOTIFY_SOCKET`` from (``os.environ`` by default).
    """
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed", error=str(e), state=state.split("\n", 1)[0])
        return False


def watchdog_usec(env: dict[str, str] | None = None) -> int:
    """``$WATCHDOG_USEC`` when it is meant for this process (``$WATCHDOG_PID``), else 0."""
    env = env if env is not None else os.environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0
    try:
        return int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0


class Notifier:
    """READY/STOPPING/STATUS/EXTEND_TIMEOUT plus a progress-gated watchdog."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env
        self._beats: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def send(self, state: str) -> bool:  # noqa: D102
        return sd_notify(state, self.env)

    def ready(self, status: str = "running") -> None:  # noqa: D102
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def stopping(self, status: str = "draining") -> None:  # noqa: D102
        self.send(f"STOPPING=1\nSTATUS={status}")

    def extend(self, seconds: float, status: str = "") -> None:
        """Ask systemd for more start-up/stop time (model loading, draining)."""
        msg = f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}"
        self.send(msg + (f"\nSTATUS={status}" if status else ""))

    def beat(self, name: str, grace: float = 0.0) -> None:
        """Mark that loop ``name`` made progress (or is idle but alive) now.

        Args:
            name: the loop.
            grace: extra seconds this beat stays fresh: a loop about to start one long call
                (a guard batch on a CPU) says how long that call may take before it counts as
                a stall.
        """
        with self._lock:
            self._beats[name] = (time.monotonic(), grace)

    def forget(self, name: str) -> None:  # noqa: D102
        with self._lock:
            self._beats.pop(name, None)

    def healthy(self, max_age: float) -> bool:
        """Every registered loop beat within ``max_age`` seconds."""
        now = time.monotonic()
        with self._lock:
            return all(now - t <= max_age + g for t, g in self._beats.values())

    def watchdog_loop(self, stop: threading.Event) -> None:
        """Ping at half the watchdog period while healthy; return at stop (or if unset)."""
        usec = watchdog_usec(self.env)
        if usec <= 0:
            return
        period = usec / 1e6
        while not stop.wait(period / 2):
            if self.healthy(period):
                self.send("WATCHDOG=1")
            else:
                log.error("pipeline stalled; withholding watchdog ping", period_s=period)
