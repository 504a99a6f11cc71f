from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from daemon.notify import Notifier, sd_notify, watchdog_usec


@pytest.fixture
def listener(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    s.settimeout(5)
    yield s, path
    s.close()


def test_sends_to_a_path_socket(listener):
    s, path = listener
    assert sd_notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"READY=1\nSTATUS=ok"


def test_abstract_socket():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"magdr-test-{os.getpid()}"
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"STOPPING=1"
    finally:
        s.close()


def test_no_socket_is_a_no_op():
    assert sd_notify("READY=1", {}) is False
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/sock"}) is False


def test_watchdog_usec_respects_pid():
    assert watchdog_usec({"WATCHDOG_USEC": "2000000"}) == 2000000
    assert watchdog_usec({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) == 0
    assert watchdog_usec({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2000000


def test_watchdog_pings_only_while_progressing(listener):
    s, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    stop = threading.Event()
    alive = threading.Event()

    def worker():
        while not alive.wait(0.02) and not stop.is_set():
            n.beat("worker")

    n.beat("worker")
    threading.Thread(target=worker, daemon=True).start()
    t = threading.Thread(target=n.watchdog_loop, args=(stop,), daemon=True)
    t.start()
    assert s.recv(64) == b"WATCHDOG=1"
    alive.set()  # the worker hangs: no more beats
    time.sleep(0.4)
    s.settimeout(0.5)
    try:
        while True:
            s.recv(64)  # drain pings sent before the stall was visible
    except TimeoutError:
        pass
    with pytest.raises(TimeoutError):
        s.recv(64)
    stop.set()
    t.join(2)


def test_ready_stopping_extend(listener):
    s, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.extend(30, "loading")
    assert s.recv(256) == b"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=loading"
    n.ready()
    assert s.recv(256).startswith(b"READY=1\nSTATUS=running\nMAINPID=")
    n.stopping()
    assert s.recv(256) == b"STOPPING=1\nSTATUS=draining"


def test_grace_covers_one_long_call():
    n = Notifier({})
    n.beat("batcher", grace=5.0)
    time.sleep(0.2)
    assert n.healthy(0.1)  # inside a long call that is allowed 5 s
    n.beat("batcher")
    time.sleep(0.2)
    assert not n.healthy(0.1)
