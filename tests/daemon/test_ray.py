"""``[engine] backend = "ray"`` on a real Ray instance on this machine (2 CPUs, loopback only):
verdicts equal to the local backend's, two workers named, a replica killed mid-batch, the
cluster going away under the daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.helpers import (
    daemon_env,
    folder_io,
    free_port,
    make_clip,
    read_pts,
    running_daemon,
    wait_until,
    write_config,
)

ray = pytest.importorskip("ray")

#: Ray resolves 127.0.0.1 to the machine's network address unless told to stay on loopback.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One Ray instance for the module; the engines under test join it."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        namespace="magdr-guard-tests",
    )
    yield
    ray.shutdown()


def _cfg(tmp_path: Path, tiny_models: dict[str, Path], backend: str, profile: str = "profile"):
    from daemon.config import load_config

    engine = f'\n[engine]\nbackend = "{backend}"\nreplicas = 2\nmax_inflight = 1\n'
    models = {**tiny_models, "profile": tiny_models[profile]}
    return load_config(write_config(tmp_path / f"{backend}.toml", models, engine, guard=True))


def _rounded(v):
    """``v`` with every float rounded to 6 significant digits (JSON-like nesting)."""
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def _verdicts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_verdicts_equal_local_and_name_two_workers(tmp_path, tiny_models):
    from daemon.cli import process_paths

    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames=12)
    got = {}
    for backend in ("local", "ray"):
        summaries, failures = process_paths(
            _cfg(tmp_path, tiny_models, backend), [clip], tmp_path / backend, bars=False
        )
        assert not failures and summaries[0]["frames"] == 12
        got[backend] = _verdicts(tmp_path / backend / "clip.verdicts.jsonl")
    workers = [v.pop("worker") for v in got["ray"]]
    assert len(set(workers)) == 2 and all(w.endswith(("/0", "/1")) for w in workers)
    assert "worker" not in got["local"][0]
    for v in got["local"] + got["ray"]:
        v.pop("latency_ms")
    # Equal up to float rounding: the replicas batch the frames differently, and oneDNN's
    # convolutions round the last bits differently for another batch size.
    assert _rounded(got["ray"]) == _rounded(got["local"])
    assert [v["seq"] for v in got["ray"]] == list(range(12))
    assert read_pts(tmp_path / "ray" / "clip.mp4")[0] == read_pts(clip)[0]


def test_reloaded_paste_back_keys_reach_the_replicas(tmp_path, tiny_models):
    """``publish_purified`` and ``edit_lowpass`` change live (SIGHUP); the replicas follow."""
    import torch

    from daemon.engine import Engine
    from daemon.metrics import Metrics
    from daemon.ray_engine import RayEngine

    cfg = _cfg(tmp_path, tiny_models, "ray")
    local = Engine(cfg)
    engine = RayEngine(cfg, Metrics())
    try:
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        c = torch.zeros(2, 5)
        got = []
        for publish, lowpass in ((False, 0.0), (True, 0.0), (False, 2.0)):
            cfg.guard.publish_purified, cfg.guard.edit_lowpass = publish, lowpass  # as reload()
            faces, _ = engine.submit(x, c).result(timeout=60)
            want, _ = local.guard_faces(x, c)
            torch.testing.assert_close(faces, want, atol=1e-4, rtol=0)
            got.append(faces)
        # The three settings paste different pixels (G's output, the input, the low-passed edit).
        assert all(
            (a - b).abs().max() > 1e-2
            for a, b in ((got[0], got[1]), (got[0], got[2]), (got[1], got[2]))
        )
    finally:
        engine.close(10)


def test_replica_killed_mid_batch_is_guarded_by_another(tmp_path, tiny_models):
    import torch

    from daemon.metrics import Metrics
    from daemon.ray_engine import RayEngine

    metrics = Metrics()
    engine = RayEngine(_cfg(tmp_path, tiny_models, "ray"), metrics)
    try:
        x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        c = torch.zeros(3, 5)
        first = engine.submit(x, c)
        victim = next(r for r in engine.replicas if r.inflight)  # the batch is on it
        ray.kill(victim.actor)
        faces, per = first.result(timeout=60)
        assert faces.shape == x.shape and len(per) == 3
        assert {p["worker"] for p in per} == {engine.replicas[1 - victim.index].name}
        assert metrics.replica_retries.value(worker=victim.name) == 1
        assert wait_until(lambda: not any(r.probing for r in engine.replicas), 30)
        assert not victim.up  # killed for good: it stays out
        again = engine.submit(x, c).result(timeout=60)  # the survivor takes everything now
        assert again[1][0]["worker"] != victim.name
        survivor = engine.replicas[1 - victim.index].name
        assert metrics.replica_batches.value(worker=survivor) == 2
        assert metrics.replica_faces.value(worker=survivor) == 6
        assert metrics.replica_seconds.value(worker=survivor) == 2  # the histogram's count
        assert metrics.replica_queue.value(worker=survivor) == 0
        text = metrics.render().decode()  # what /metrics serves
        assert f'magdr_replica_retries_total{{worker="{victim.name}"}} 1.0' in text
    finally:
        engine.close(10)


def test_file_complete_when_a_replica_dies_while_guarding(tmp_path, tiny_models):
    """Every frame once, in order, though replica 0 was killed with a batch on it."""
    from daemon.metrics import Metrics
    from daemon.pipeline import process_file
    from daemon.service import build_pipeline

    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames=30)
    metrics = Metrics()
    cfg = _cfg(tmp_path, tiny_models, "ray", profile="flag_all")
    _, _, pipe = build_pipeline(cfg, metrics)
    killed: list[str] = []

    def kill_replica_0(done: int) -> None:
        r = pipe.remote.replicas[0]
        if not killed and r.inflight:
            killed.append(r.name)
            ray.kill(r.actor)

    try:
        (tmp_path / "out").mkdir()
        summary = process_file(
            clip, "clip", tmp_path / "out", pipe, window=8, progress=kill_replica_0
        )
    finally:
        pipe.close(30)
    assert killed and metrics.replica_retries.value(worker=killed[0]) >= 1
    verdicts = _verdicts(tmp_path / "out" / "clip.verdicts.jsonl")
    assert [v["seq"] for v in verdicts] == list(range(30)) and summary["frames"] == 30
    assert all(v["disrupted"] for v in verdicts)
    assert len(read_pts(tmp_path / "out" / "clip.mp4")[0]) == 30


def test_start_up_errors_name_the_cause(tmp_path, tiny_models):
    from daemon.metrics import Metrics
    from daemon.ray_engine import EngineError, RayEngine

    cfg = _cfg(tmp_path, tiny_models, "ray")
    cfg.engine.replicas = 3  # 3 x 1 CPU on a 2-CPU instance could never be placed
    with pytest.raises(
        EngineError,
        match=r"3 replicas x 1 CPU need 3 CPUs; the Ray cluster "
        r"has 2 \(lower \[engine\] replicas or num_cpus",
    ):
        RayEngine(cfg, Metrics())
    cfg.engine.replicas, cfg.model.profile = 1, str(tmp_path / "missing.json")
    with pytest.raises(EngineError, match="did not start: .*missing.json"):
        RayEngine(cfg, Metrics())  # the replica's own models fail to load


@pytest.mark.slow
def test_cluster_gone_stops_daemon_and_file_resumes(tmp_path, tiny_models, monkeypatch):
    """A head node killed under the daemon: exit 1 with a clear error, the file still
    claimed (not failed); the next start (local backend) finishes it."""
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)  # the head's and the daemon's
    port = free_port()
    env = daemon_env()
    head_log = tmp_path / "head.log"
    with open(head_log, "wb") as f:
        head = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=1",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        assert wait_until(lambda: b"Ray runtime started" in head_log.read_bytes(), 60), (
            head_log.read_text()
        )
        engine = f'\n[engine]\nbackend = "ray"\naddress = "127.0.0.1:{port}"\n'
        cfg = write_config(
            tmp_path / "c.toml",
            {**tiny_models, "profile": tiny_models["flag_all"]},
            folder_io(tmp_path) + engine,
            guard=True,
        )
        (tmp_path / "inbox").mkdir()
        make_clip(tmp_path / "clip.mp4", frames=200)
        log = tmp_path / "daemon.log"
        with running_daemon(cfg, log) as proc:
            assert wait_until(lambda: b"ray replicas ready" in log.read_bytes(), 90), (
                log.read_text()
            )
            (tmp_path / "clip.mp4").rename(tmp_path / "inbox" / "clip.mp4")
            claimed = tmp_path / "state" / "claimed"
            assert wait_until(lambda: list(claimed.rglob("clip.mp4")), 30), log.read_text()
            os.killpg(head.pid, signal.SIGKILL)
            assert proc.wait(90) == 1
        text = log.read_text()
        assert "guard engine lost" in text and "stays claimed" in text, text
        assert list(claimed.rglob("clip.mp4")) and not list((tmp_path / "failed").iterdir())
        assert not (tmp_path / "outbox" / "clip.summary.json").exists()
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(10)
    # restart (here on the local backend): the claimed file is resumed and committed
    text = (tmp_path / "c.toml").read_text().replace('backend = "ray"', 'backend = "local"')
    (tmp_path / "c.toml").write_text(text)
    with running_daemon(tmp_path / "c.toml", log):
        assert wait_until(lambda: (tmp_path / "outbox" / "clip.summary.json").exists(), 120), (
            log.read_text()
        )
    assert len(_verdicts(tmp_path / "outbox" / "clip.verdicts.jsonl")) == 200
