"""``python -m bench.soak --minutes 30``: the daemon under steady load, watched from outside.

Starts ``magdr-guard run`` as a subprocess with one ZeroMQ PULL source per stream (a bounded
queue with a drop policy), a PUB sink and the metrics endpoint; one sender thread per stream
pushes numbered frames at a fixed rate, one subscriber collects the verdicts, and a sampler reads
the daemon's resident memory (``/proc/PID/status``) and ``/metrics`` every second. At the end the
senders stop, the daemon settles (every frame it received is out or dropped by its counters), the
subscriber listens until every published verdict has arrived, and only then do we stop listening
and stop the daemon. Every frame is accounted for::

    sent = verdicts received + frames the daemon logged as dropped (with their reason)

per stream and by sequence number (the ``frame dropped`` log lines of the sources and the
``message dropped`` lines of the PUB sink carry stream and seq), so the drop counters must explain
every missing frame. Queue depths are checked against their limits.

Memory: reconstruction bursts make RSS a sawtooth (hundreds of MiB up and back within a minute),
so a least-squares slope over all samples measures where the bursts fall, not a leak. The check is
the slope of the per-minute *minimum* RSS after the warm-up: a leak raises the floor the sawtooth
returns to. On a busy CPU one burst can cover a whole minute, so the slope is Theil-Sen's (the
median of the slopes between every two minima), which a few such minutes do not move. It must
stay under ``--max-floor-slope`` (1 MiB/min by default: 30 MiB over the 30-minute run).

The models are a tiny random StarGAN (32 px), a tiny parser and a detection-only profile by
default (``--models tiny``: this measures the daemon, not the method), or the shipped defaults
(``--models default``). ``tests/daemon/test_soak.py`` runs a 40-second version.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def scrape(port: int) -> dict[str, float]:
    """The daemon's ``/metrics`` as ``{'name{labels}': value}``."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def slope_per_min(t: list[float], y: list[float]) -> float:
    """Least-squares slope of ``y`` over ``t`` (seconds), per minute."""
    if len(t) < 3:
        return float("nan")
    return float(np.polyfit(np.asarray(t) / 60.0, np.asarray(y), 1)[0])


def robust_slope_per_min(t: list[float], y: list[float]) -> float:
    """Theil-Sen slope of ``y`` over ``t`` (seconds), per minute: the median pairwise slope."""
    pairs = [(i, j) for i in range(len(t)) for j in range(i + 1, len(t)) if t[j] != t[i]]
    if len(t) < 3 or not pairs:
        return float("nan")
    return float(np.median([(y[j] - y[i]) / (t[j] - t[i]) * 60.0 for i, j in pairs]))


def window_floors(
    t: list[float], y: list[float], window_s: float = 60.0
) -> list[tuple[float, float]]:
    """``(t, y)`` of the lowest ``y`` in each ``window_s`` window of ``t`` (seconds).

    Bursts lift the peaks of a sawtooth, a leak lifts its floor. Windows with fewer than half
    the samples of the fullest one (the last, cut short) are left out.
    """
    windows: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for ti, yi in zip(t, y, strict=True):
        windows[int(ti // window_s)].append((yi, ti))
    full = max((len(w) for w in windows.values()), default=0)
    return [(ti, yi) for yi, ti in (min(w) for w in windows.values() if len(w) * 2 >= full)]


def counter(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of metric ``name`` over the label sets of ``m`` that carry all of ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if k.split("{")[0] == name and all(w in k for w in want))


class VerdictCollector:
    """A SUB socket on the daemon's PUB: the ``(stream, seq)`` of every verdict that arrives.

    Listening ends only when :meth:`stop_when` says so, never on a pause: while the daemon
    drains, a reconstruction batch can take seconds between two verdicts.

    Args:
        ctx: the ZeroMQ context.
        endpoint: the PUB endpoint (connected to at once, so the subscription is in place by
            the time the first frame is guarded).
    """

    def __init__(self, ctx: Any, endpoint: str) -> None:
        import zmq

        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"verdict.")
        self.sock.connect(endpoint)
        self.received: dict[str, set[int]] = defaultdict(set)
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verdicts", daemon=True)

    def start(self) -> None:  # noqa: D102
        self._listening.set()
        self._thread.start()

    def count(self) -> int:
        """Verdicts received so far."""
        with self._lock:
            return sum(len(s) for s in self.received.values())

    def stop_when(self, expected: float, quiet_s: float) -> bool:
        """Listen until ``expected`` verdicts are in, or none came for ``quiet_s``; then stop.

        Returns whether all ``expected`` arrived.
        """
        last, t_last = self.count(), time.monotonic()
        while last < expected and time.monotonic() - t_last < quiet_s:
            time.sleep(0.05)
            if self.count() != last:
                last, t_last = self.count(), time.monotonic()
        self._listening.clear()
        self._thread.join(5)
        self.sock.close(0)
        return last >= expected

    def _run(self) -> None:
        while self._listening.is_set():
            if self.sock.poll(100):
                v = json.loads(self.sock.recv_multipart()[1])
                with self._lock:
                    self.received[v["stream"]].add(v["seq"])


def settle(port: int, sent: list[int], stall_s: float = 120.0) -> tuple[dict[str, float], bool]:
    """Wait until each source has received what was sent and guarded or dropped all of it.

    Gives up when the counters have not moved for ``stall_s`` (a batch of reconstructions on a
    busy CPU takes tens of seconds, so there is no fixed deadline). Returns the last scrape and
    whether it settled.
    """
    last, t_last = None, time.monotonic()
    while True:
        m = scrape(port)
        ins = [counter(m, "magdr_frames_in_total", source=f"zmq{i}") for i in range(len(sent))]
        done = [
            counter(m, "magdr_frames_out_total", source=f"zmq{i}")
            + counter(m, "magdr_frames_dropped_total", source=f"zmq{i}")
            for i in range(len(sent))
        ]
        if ins == sent and ins == done:
            return m, True
        if (ins, done) != last:
            last, t_last = (ins, done), time.monotonic()
        elif time.monotonic() - t_last > stall_s:
            return m, False
        time.sleep(0.2)


def tiny_models(d: Path, profile_name: str = "soak-detect-only") -> dict[str, Path]:
    """A tiny random StarGAN (32 px), a tiny parser, and a detection-only profile (seeded)."""
    import torch

    from magdr.faces.parsenet import ParseNet
    from magdr.models.stargan import StarGAN
    from magdr.profile import Profile

    torch.manual_seed(0)
    torch.save(StarGAN(conv_dim=8, c_dim=5, repeat_num=1, image_size=32).state_dict(), d / "G.pt")
    (d / "G.json").write_text(json.dumps({"image_size": 32}))
    torch.save(ParseNet(width=4, depth=2).state_dict(), d / "parser.pt")
    Profile(
        name=profile_name,
        threshold=1e6,
        consistency=[{"name": "jpeg", "params": {"quality": 75}}],
    ).save(d / "profile.json")
    return {"G": d / "G.pt", "parser": d / "parser.pt", "profile": d / "profile.json"}


def write_config(
    d: Path,
    models: dict[str, Path] | None,
    streams: int,
    queue_size: int,
    batch_size: int,
    ports: dict[str, Any],
) -> Path:
    """The soak's daemon config: one PULL source per stream, a PUB sink, metrics."""
    model = (
        "\n".join(
            f'{k} = "{v}"'
            for k, v in (
                ("generator", models["G"]),
                ("parser", models["parser"]),
                ("profile", models["profile"]),
            )
            if models
        )
        if models
        else ""
    )
    text = f"""
[model]
{model}
device = "cpu"
threads = 1

[guard]
batch_size = {batch_size}
batch_timeout_ms = 30
faces = "frame"

[logging]
level = "info"
format = "json"

[http]
enabled = true
port = {ports["metrics"]}

[daemon]
work_dir = "{d / "state"}"
watchdog = false
drain_timeout_s = 30
"""
    for i in range(streams):
        text += f"""
[[sources]]
kind = "zmq"
endpoint = "tcp://127.0.0.1:{ports["in"][i]}"
socket = "pull"
bind = true
queue_size = {queue_size}
policy = "drop-oldest"
"""
    text += f"""
[[sinks]]
kind = "zmq"
endpoint = "tcp://127.0.0.1:{ports["out"]}"
frames = false
hwm = 0
"""
    p = d / "soak.toml"
    p.write_text(text)
    return p


def run_soak(
    seconds: float,
    streams: int = 3,
    fps: float = 15.0,
    queue_size: int = 8,
    batch_size: int = 4,
    size: int = 32,
    models: str = "tiny",
    warmup_s: float = 10.0,
    floor_window_s: float = 60.0,
    workdir: Path | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Run the soak and return its report (see the module docstring).

    Args:
        seconds: how long the senders send.
        streams: concurrent streams (one PULL source each).
        fps: frames per second per stream.
        queue_size: each source's queue (drop-oldest past it).
        batch_size: faces per guard call.
        size: frame side in pixels (rgb24).
        models: ``tiny`` or ``default``.
        warmup_s: samples before this are left out of the memory slopes.
        floor_window_s: the windows whose lowest RSS makes the floor (see the module docstring).
        workdir: folder for config, state and the daemon's log (a temporary one by default).
        log: a callable for progress lines (None: quiet).
    """
    import zmq

    say = log or (lambda *_: None)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="magdr-soak-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {"in": [_port() for _ in range(streams)], "out": _port(), "metrics": _port()}
    mdl = tiny_models(workdir) if models == "tiny" else None
    cfg = write_config(workdir, mdl, streams, queue_size, batch_size, ports)
    daemon_log = workdir / "daemon.jsonl"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    env.pop("NOTIFY_SOCKET", None)
    with open(daemon_log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(cfg)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    ctx = zmq.Context()
    verdicts = VerdictCollector(ctx, f"tcp://127.0.0.1:{ports['out']}")
    stop = threading.Event()
    sent: dict[str, int] = {}
    blocked: Counter[str] = Counter()
    samples: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 120
        while b'"ready"' not in daemon_log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start:\n" + daemon_log.read_text()[-3000:])
            time.sleep(0.1)

        def send(i: int) -> None:
            name = f"s{i}"
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(f"tcp://127.0.0.1:{ports['in'][i]}")
            rng = np.random.default_rng(i)
            seq, n_sent, t0 = 0, 0, time.monotonic()
            while not stop.is_set():
                img = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
                header = {
                    "v": 1,
                    "stream": name,
                    "seq": seq,
                    "format": "rgb24",
                    "width": size,
                    "height": size,
                }
                try:
                    s.send_multipart([json.dumps(header).encode(), img.tobytes()], zmq.NOBLOCK)
                    n_sent = seq + 1
                    seq += 1
                except zmq.Again:  # the daemon's socket is full: not sent, not its loss
                    blocked[name] += 1
                wait = t0 + seq / fps - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                else:
                    t0 = time.monotonic() - seq / fps  # late: do not burst to catch up
            sent[name] = n_sent
            s.close()

        verdicts.start()
        time.sleep(0.3)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        t_start = time.monotonic()
        senders = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(streams)]
        for t in senders:
            t.start()
        next_sample = t_start
        while time.monotonic() - t_start < seconds:
            if proc.poll() is not None:
                raise RuntimeError("the daemon died:\n" + daemon_log.read_text()[-3000:])
            m = scrape(ports["metrics"])
            samples.append(
                {
                    "t": time.monotonic() - t_start,
                    "rss_mib": rss_mib(proc.pid),
                    "load1": os.getloadavg()[0],
                    "queues": {
                        k.split('"')[1]: v
                        for k, v in m.items()
                        if k.startswith("magdr_queue_depth")
                    },
                }
            )
            if len(samples) % 30 == 0:
                say(
                    f"  {samples[-1]['t']:.0f}s rss {samples[-1]['rss_mib']:.1f} MiB "
                    f"load {samples[-1]['load1']:.2f} queues {samples[-1]['queues']}"
                )
            next_sample += 1.0
            time.sleep(max(0.0, next_sample - time.monotonic()))
        # drain: stop sending, let the daemon guard or drop what it holds, then hear every
        # verdict it published before we stop listening (stopping first lost the in-flight ones)
        stop.set()
        t_stop = time.monotonic()
        for t in senders:
            t.join(10)
        m, settled = settle(ports["metrics"], [sent[f"s{i}"] for i in range(streams)])
        drain_s = time.monotonic() - t_stop
        published = counter(m, "magdr_frames_out_total") - counter(
            m, "magdr_sink_dropped_total", topic="verdict"
        )
        all_heard = verdicts.stop_when(published, quiet_s=30.0)
        m = scrape(ports["metrics"])
        alive = proc.poll() is None
        rss_end = rss_mib(proc.pid) if alive else float("nan")
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
        wall_s = time.monotonic() - t_start
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        ctx.destroy(linger=0)

    dropped_seqs: dict[str, dict[int, str]] = defaultdict(dict)
    sink_dropped: dict[str, set[int]] = defaultdict(set)
    for line in daemon_log.read_text().splitlines():
        if '"frame dropped"' in line:
            x = json.loads(line)
            dropped_seqs[x["stream"]][x["seq"]] = x["reason"]
        elif '"message dropped"' in line and '"verdict"' in line:
            x = json.loads(line)
            sink_dropped[x["stream"]].add(x["seq"])
    per_stream = {}
    for i in range(streams):
        name, source = f"s{i}", f"zmq{i}"
        want = set(range(sent[name]))
        got, drop = verdicts.received[name], set(dropped_seqs[name]) | sink_dropped[name]
        frames_out = counter(m, "magdr_frames_out_total", source=source)
        per_stream[name] = {
            "sent": sent[name],
            "sender_blocked": blocked[name],
            "verdicts": len(got),
            "dropped": len(dropped_seqs[name]),
            "dropped_by_reason": dict(Counter(dropped_seqs[name].values())),
            "sink_dropped": len(sink_dropped[name]),
            "unexplained": len(want - got - drop),
            "both": len(got & drop),
            "unexpected": len((got | drop) - want),
            "frames_in": counter(m, "magdr_frames_in_total", source=source),
            "frames_out": frames_out,
            "published_not_received": frames_out - len(got) - len(sink_dropped[name]),
            "dropped_counter": counter(m, "magdr_frames_dropped_total", source=source),
        }
    late = [s for s in samples if s["t"] >= warmup_s] or samples
    floors = window_floors([s["t"] for s in late], [s["rss_mib"] for s in late], floor_window_s)
    queue_max: dict[str, float] = defaultdict(float)
    for s in samples:
        for q, v in s["queues"].items():
            queue_max[q] = max(queue_max[q], v)
    report = {
        "seconds": seconds,
        "streams": streams,
        "fps_per_stream": fps,
        "queue_size": queue_size,
        "batch_size": batch_size,
        "size": size,
        "models": models,
        "started": started,
        "wall_s": wall_s,
        "daemon_alive": alive,
        "exit_code": exit_code,
        "per_stream": per_stream,
        "guarded_fps": sum(p["verdicts"] for p in per_stream.values()) / seconds,
        "queue_max": dict(queue_max),
        "queue_limits": {
            **{f"zmq{i}": queue_size for i in range(streams)},
            "batcher": streams * 2 * batch_size,
        },
        "rss_mib": {
            "start": samples[0]["rss_mib"] if samples else None,
            "after_warmup": late[0]["rss_mib"] if late else None,
            "max": max(s["rss_mib"] for s in samples) if samples else None,
            "end": rss_end,
        },
        "rss_slope_mib_per_min": slope_per_min(
            [s["t"] for s in late], [s["rss_mib"] for s in late]
        ),
        "rss_floor_window_s": floor_window_s,
        "rss_floors": [(round(t, 1), round(y, 1)) for t, y in floors],
        "rss_floor_slope_mib_per_min": robust_slope_per_min(
            [t for t, _ in floors], [y for _, y in floors]
        ),
        "drain_s": drain_s,
        "settled": settled,
        "all_verdicts_heard": all_heard,
        "cpus": os.cpu_count(),
        "load1": {
            "mean": float(np.mean([s["load1"] for s in samples])) if samples else None,
            "max": max(s["load1"] for s in samples) if samples else None,
        },
        "samples": len(samples),
        "rss_trace": [(round(s["t"], 1), round(s["rss_mib"], 1)) for s in samples[::5]],
        "log": str(daemon_log) if tmp is None else None,
    }
    if tmp is not None:
        tmp.cleanup()
    return report


def failures(r: dict[str, Any], max_floor_slope: float) -> list[str]:
    """The checks a soak report fails (empty: it passed)."""
    out = []
    if not r["daemon_alive"] or r["exit_code"] != 0:
        out.append(f"daemon alive {r['daemon_alive']}, exit code {r['exit_code']}")
    for name, p in r["per_stream"].items():
        if p["unexplained"] or p["both"] or p["unexpected"]:
            out.append(
                f"{name}: {p['unexplained']} frames neither a verdict nor a counted drop, "
                f"{p['both']} both, {p['unexpected']} never sent"
            )
    for q, limit in r["queue_limits"].items():
        if r["queue_max"].get(q, 0) > limit:
            out.append(f"queue {q} reached {r['queue_max'][q]:.0f} > {limit}")
    if not r["rss_floor_slope_mib_per_min"] <= max_floor_slope:  # NaN fails too
        out.append(
            f"minimum RSS rose {r['rss_floor_slope_mib_per_min']:+.2f} MiB/min "
            f"> {max_floor_slope:+.2f}"
        )
    return out


def report_section(r: dict[str, Any], command: str, max_floor_slope: float) -> str:
    """The ``## Soak`` section of ``bench/results/REPORT.md``: every number from report ``r``."""
    import torch

    from bench.run_info import commit

    failed = failures(r, max_floor_slope)
    ps = r["per_stream"].values()
    sent, seen = sum(p["sent"] for p in ps), sum(p["verdicts"] for p in ps)
    rss, floors = r["rss_mib"], r["rss_floors"]
    lines = [
        "## Soak",
        "",
        f"- command: `{command}`",
        f"- commit: `{commit()}`; started {r['started']}, wall time {r['wall_s'] / 60:.1f} min",
        f"- machine: {r['cpus']} CPUs, torch {torch.__version__}; load average over the run "
        f"{r['load1']['mean']:.2f} mean, {r['load1']['max']:.2f} max",
        f"- load: {r['streams']} streams x {r['fps_per_stream']:g} frames/s of random "
        f"{r['size']}x{r['size']} frames for {r['seconds'] / 60:g} min, one ZeroMQ PULL source "
        f"each (queue {r['queue_size']}, drop-oldest), batch {r['batch_size']}, a PUB sink; "
        f"models `{r['models']}`",
        "",
        "| stream | sent | verdicts | dropped by the queues | dropped at the sink "
        "| unexplained | daemon's frames_out |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {p['sent']} | {p['verdicts']} | {p['dropped']} "
        f"({', '.join(f'{k} {v}' for k, v in p['dropped_by_reason'].items()) or '-'}) "
        f"| {p['sink_dropped']} | {p['unexplained']} | {p['frames_out']:.0f} |"
        for name, p in r["per_stream"].items()
    ]
    lines += [
        "",
        f"- Drain: the senders stop, the daemon guards or drops every frame it holds "
        f"({r['drain_s']:.0f} s; settled: {r['settled']}), and the subscriber listens until "
        f"every published verdict is in (all heard: {r['all_verdicts_heard']}).",
        f"- Guarded {r['guarded_fps']:.2f} frames/s; the queues dropped (and counted) "
        f"{100 * (1 - seen / max(sent, 1)):.1f}% of the frames offered. Queue maxima "
        f"{ {k: int(v) for k, v in r['queue_max'].items()} } (limits {r['queue_limits']}).",
        f"- Memory (RSS, MiB): {rss['start']:.0f} at the start, {rss['after_warmup']:.0f} after "
        f"the warm-up, {rss['max']:.0f} at the peak, {rss['end']:.0f} at the end. Minimum per "
        f"{r['rss_floor_window_s']:.0f} s after the warm-up: "
        f"{', '.join(f'{y:.0f}' for _, y in floors)}; their Theil-Sen slope "
        f"**{r['rss_floor_slope_mib_per_min']:+.2f} MiB/min** (limit {max_floor_slope:+.2f}). "
        f"The least-squares slope over all samples, {r['rss_slope_mib_per_min']:+.2f} MiB/min, "
        f"moves with the bursts and is not the check.",
        f"- Result: **{'passed' if not failed else 'FAILED: ' + '; '.join(failed)}**.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: run, print a summary, write the JSON report; exit 1 on a failed check."""
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--fps", type=float, default=15.0, help="frames per second per stream")
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=32, help="frame side in pixels")
    ap.add_argument("--models", choices=["tiny", "default"], default="tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    ap.add_argument("--workdir", type=Path, default=None, help="keep config, state and log here")
    ap.add_argument(
        "--max-floor-slope",
        type=float,
        default=1.0,
        help="MiB/min: the most the per-minute minimum RSS may rise after the warm-up",
    )
    ap.add_argument(
        "--report", type=Path, default=None, help="write the '## Soak' section of this REPORT.md"
    )
    a = ap.parse_args(argv)
    print(f"soak: {a.minutes} min, {a.streams} streams x {a.fps} fps", flush=True)
    seconds = a.minutes * 60
    warmup_s = min(60.0, seconds / 4)
    r = run_soak(
        seconds,
        a.streams,
        a.fps,
        a.queue_size,
        a.batch_size,
        a.size,
        a.models,
        warmup_s=warmup_s,
        floor_window_s=min(60.0, (seconds - warmup_s) / 5),  # five floors at least
        workdir=a.workdir,
        log=lambda s: print(s, flush=True),
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    command = "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report_section(r, command.strip(), a.max_floor_slope)
    print(text, flush=True)
    if a.report is not None:
        from bench.report import put_section

        put_section(a.report, "## Soak", text)
    ok = not failures(r, a.max_floor_slope)
    print(f"{'OK' if ok else 'FAILED'} -> {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
